"""Network in Network (Lin, Chen & Yan, ICLR 2014), in the ImageNet layout of d2l.ai (section 8.3).

A NiN block is a k x k conv followed by two 1x1 convs (a per-pixel MLP), each with the activation.
There are no FC layers: the last block has ``num_classes`` channels and global average pooling
turns its maps into logits.

  ======  ===========================================  ================
  layer   op                                           output (224 px)
  ======  ===========================================  ================
  block1  11x11 / 4 VALID, 96; 1x1, 96; 1x1, 96         54x54x96
  pool1   max 3x3 / 2                                  26x26x96
  block2  5x5 SAME, 256; 1x1, 256; 1x1, 256            26x26x256
  pool2   max 3x3 / 2                                  12x12x256
  block3  3x3 SAME, 384; 1x1, 384; 1x1, 384            12x12x384
  pool3   max 3x3 / 2                                  5x5x384
  dropout ``dropout_rate``
  block4  3x3 SAME, num_classes; 1x1; 1x1              5x5xnum_classes
  head    global average pool ('gap') or flatten + FC num_classes ('fc')
  ======  ===========================================  ================

7,439,608 params at 1000 classes, 2,015,398 at 10. ``use_1x1=False`` drops the 1x1 convs (plain
conv blocks: the ablation showing what the per-pixel MLP buys). ``width`` scales blocks 1-3; block4
keeps ``num_classes`` channels. Native geometry needs >= 67 px inputs.

``small`` geometry (28-64 px inputs): block1's 11x11/4 VALID conv becomes 3x3/1 SAME, the rest is
unchanged: 32 px -> 32, 15, 7, 3 (block4 at 3x3); 28 px -> 28, 13, 6, 2. Needs >= 15 px inputs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models.layers import Window

_STEMS = {'native': Window(11, 4, 'VALID'), 'small': Window(3, 1, 'SAME')}
_POOL = Window(3, 2, 'VALID')
HEADS = ('gap', 'fc')


class NiNBlock(nn.Module):
  """k x k conv, then (if ``use_1x1``) two 1x1 convs; activation after each.

  [N, H, W, C] -> [N, H', W', features].
  """
  features: int
  window: Window
  activation: str = 'relu'
  use_1x1: bool = True
  dtype: layers.Dtype = jnp.float32
  scores: bool = False  # its last conv outputs the class scores (layers.classifier_init)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = layers.get_activation(self.activation)
    last = layers.classifier_init(2.0) if self.scores else {}
    x = act(layers.Conv(self.features, self.window.size, self.window.stride, self.window.padding,
                        dtype=self.dtype, name='conv', **({} if self.use_1x1 else last))(x))
    if self.use_1x1:
      x = act(layers.Conv(self.features, 1, dtype=self.dtype, name='mlp1')(x))
      x = act(layers.Conv(self.features, 1, dtype=self.dtype, name='mlp2', **last)(x))
    return x


class NiN(layers.ImageClassifier):
  """Network in Network; see the module docstring.

  Attributes (besides ``layers.ImageClassifier``'s):
    use_1x1: the two 1x1 convs in every block (False = plain conv blocks).
    head: 'gap' (global average pooling, the paper) or 'fc' (flatten + Dense num_classes).
  """
  use_1x1: bool = True
  head: str = 'gap'

  def __post_init__(self):
    if self.head not in HEADS:
      raise UserError(f'Unknown nin head {self.head!r}; choose one of: {", ".join(HEADS)}.')
    super().__post_init__()

  @nn.nowrap
  def windows(self):
    return (_STEMS[self.geometry], _POOL, Window(5, 1, 'SAME'), _POOL, Window(3, 1, 'SAME'), _POOL,
            Window(3, 1, 'SAME'))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images [N, H, W, 3] -> float32 logits [N, num_classes]."""
    self.check_input(x)
    block = functools.partial(NiNBlock, activation=self.activation, use_1x1=self.use_1x1,
                              dtype=self.dtype)

    x = x.astype(self.dtype)
    x = block(self.channels(96), _STEMS[self.geometry], name='block1')(x)
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool1')(x)
    x = block(self.channels(256), Window(5, 1, 'SAME'), name='block2')(x)
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool2')(x)
    x = block(self.channels(384), Window(3, 1, 'SAME'), name='block3')(x)
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool3')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train, name='dropout')(x)
    x = block(self.num_classes, Window(3, 1, 'SAME'), scores=self.head == 'gap', name='block4')(x)
    if self.head == 'gap':
      x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    else:
      x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc', **layers.classifier_init(1.0))(
          x.reshape((x.shape[0], -1)))
    return x.astype(jnp.float32)
