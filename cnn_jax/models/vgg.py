"""VGG-11/13/16/19 (Simonyan & Zisserman, ICLR 2015, configurations A, B, D, E), optionally with BN.

Five blocks of 3x3 SAME convs (+ activation), each block ending with a 2x2/2 max-pool, then the
AlexNet classifier head (FC 4096, dropout, FC 4096, dropout, FC num_classes). ``_bn`` variants put
BatchNorm (momentum 0.9) between each conv and its activation, like torchvision's ``vgg*_bn``; the
conv keeps its bias, so param counts match torchvision.

  =====  ==========  ==========  ==========  ==========  ==========  ===========================
  depth  block1      block2      block3      block4      block5      params (224 px, 1000 cls)
  =====  ==========  ==========  ==========  ==========  ==========  ===========================
  11     1 x 64      1 x 128     2 x 256     2 x 512     2 x 512     132,863,336
  13     2 x 64      2 x 128     2 x 256     2 x 512     2 x 512     133,047,848
  16     2 x 64      2 x 128     3 x 256     3 x 512     3 x 512     138,357,544
  19     2 x 64      2 x 128     4 x 256     4 x 512     4 x 512     143,667,240
  =====  ==========  ==========  ==========  ==========  ==========  ===========================

``native`` geometry: 224 px -> 7x7x512 before the head; the 5 VALID pools need >= 32 px inputs.

``small`` geometry (28-64 px inputs): the same layers, but the pools pad SAME (round up), so odd
maps keep their last row/column: 32 px -> 16, 8, 4, 2, 1 (identical to native); 28 px -> 14, 7, 4,
2, 1. The head then sees 1x1x512 (at width 1.0). d2l trains VGG-11 at ``width=0.25``.
"""

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models.layers import Window

# depth -> ((number of convs, paper channels) per block).
BLOCKS = {
    11: ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    13: ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    16: ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    19: ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}
_CONV = Window(3, 1, 'SAME')
_POOLS = {'native': Window(2, 2, 'VALID'), 'small': Window(2, 2, 'SAME')}


class VGG(layers.ImageClassifier):
  """VGG; see the module docstring.

  Attributes (besides ``layers.ImageClassifier``'s):
    depth: 11, 13, 16 or 19 weight layers.
    batch_norm: BatchNorm after each conv (collection 'batch_stats'; running averages in eval).
  """
  depth: int = 11
  batch_norm: bool = False

  def __post_init__(self):
    if self.depth not in BLOCKS:
      raise UserError(f'VGG depth must be one of {sorted(BLOCKS)}; got {self.depth!r}.')
    super().__post_init__()

  @nn.nowrap
  def model_name(self) -> str:
    return f'vgg{self.depth}' + ('_bn' if self.batch_norm else '')

  @nn.nowrap
  def windows(self) -> Tuple[Window, ...]:
    plan = []
    for num_convs, _ in BLOCKS[self.depth]:
      plan += [_CONV] * num_convs + [_POOLS[self.geometry]]
    return tuple(plan)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images [N, H, W, 3] -> float32 logits [N, num_classes]."""
    self.check_input(x)
    act = layers.get_activation(self.activation)
    pool = _POOLS[self.geometry]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)

    x = x.astype(self.dtype)
    for block, (num_convs, channels) in enumerate(BLOCKS[self.depth], start=1):
      for i in range(1, num_convs + 1):
        x = layers.Conv(self.channels(channels), _CONV.size, dtype=self.dtype,
                        name=f'block{block}_conv{i}')(x)
        if self.batch_norm:
          x = norm(name=f'block{block}_bn{i}')(x)
        x = act(x)
      x = layers.MaxPool(pool.size, pool.stride, pool.padding, name=f'block{block}_pool')(x)
    hidden = self.channels(4096)
    x = layers.MLPHead((hidden, hidden), self.num_classes, self.activation, self.dropout_rate,
                       self.dtype, name='head')(x, train)
    return x.astype(jnp.float32)
