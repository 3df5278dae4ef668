"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012).

Layer plan (``native`` geometry, 227x227x3 input; channels before ``width`` scaling):

  =====  ==========================================  ==============
  layer  op                                          output
  =====  ==========================================  ==============
  conv1  11x11 / 4 VALID, 96  (+ LRN if ``lrn``)     55x55x96
  pool1  max 3x3 / 2                                 27x27x96
  conv2  5x5 SAME, 256, ``groups`` (+ LRN)           27x27x256
  pool2  max 3x3 / 2                                 13x13x256
  conv3  3x3 SAME, 384                               13x13x384
  conv4  3x3 SAME, 384, ``groups``                   13x13x384
  conv5  3x3 SAME, 256, ``groups``                   13x13x256
  pool5  max 3x3 / 2                                 6x6x256
  head   FC 4096, dropout, FC 4096, dropout, FC      num_classes
  =====  ==========================================  ==============

Every conv and hidden FC is followed by the activation. 62,378,344 params at 1000 classes
(60,965,224 with ``groups=2``, the paper's two-GPU split). Native geometry needs >= 67 px inputs.

``small`` geometry (28-64 px inputs): the 11x11/4 VALID stem becomes a 3x3/1 SAME conv, so the
input is not downsampled 4x before the first pool; everything else is unchanged. At 32 px the maps
are 32 -> 15 -> 7 -> 3 (flatten 3x3x256); at 28 px 28 -> 13 -> 6 -> 2. Needs >= 15 px inputs.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models.layers import Window

_STEMS = {'native': Window(11, 4, 'VALID'), 'small': Window(3, 1, 'SAME')}
_POOL = Window(3, 2, 'VALID')  # Overlapping pooling (paper section 3.4).


class AlexNet(layers.ImageClassifier):
  """AlexNet; see the module docstring for the layer plan.

  Attributes (besides ``layers.ImageClassifier``'s):
    lrn: local response normalisation after the conv1 and conv2 activations (paper: k=2, n=5,
      alpha=1e-4, beta=0.75).
    groups: feature groups of conv2, conv4 and conv5 (2 = the paper's two-GPU split).
  """
  lrn: bool = False
  groups: int = 1

  def __post_init__(self):
    if not isinstance(self.groups, int) or self.groups < 1:
      raise UserError(f'alexnet groups must be a positive integer (1 or 2); got {self.groups!r}.')
    super().__post_init__()

  @nn.nowrap
  def windows(self):
    same3 = Window(3, 1, 'SAME')
    return (_STEMS[self.geometry], _POOL, Window(5, 1, 'SAME'), _POOL, same3, same3, same3, _POOL)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images [N, H, W, 3] -> float32 logits [N, num_classes]."""
    self.check_input(x)
    act = layers.get_activation(self.activation)
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    stem = _STEMS[self.geometry]

    x = x.astype(self.dtype)
    x = act(conv(self.channels(96), stem.size, stem.stride, stem.padding, name='conv1')(x))
    if self.lrn:
      x = layers.LocalResponseNorm(name='lrn1')(x)
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool1')(x)
    x = act(conv(self.channels(256), 5, feature_group_count=self.groups, name='conv2')(x))
    if self.lrn:
      x = layers.LocalResponseNorm(name='lrn2')(x)
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool2')(x)
    x = act(conv(self.channels(384), 3, name='conv3')(x))
    x = act(conv(self.channels(384), 3, feature_group_count=self.groups, name='conv4')(x))
    x = act(conv(self.channels(256), 3, feature_group_count=self.groups, name='conv5')(x))
    x = layers.MaxPool(_POOL.size, _POOL.stride, name='pool5')(x)
    hidden = self.channels(4096)
    x = layers.MLPHead((hidden, hidden), self.num_classes, self.activation, self.dropout_rate,
                       self.dtype, name='head')(x, train)
    return x.astype(jnp.float32)
