"""LeNet-5 (LeCun et al. 1998) as in d2l.ai section 7.6, for 28x28 images with any channel count.

  =====  =====================================  ==============
  layer  op                                     output (28 px)
  =====  =====================================  ==============
  conv1  5x5 SAME (pad 2), 6                    28x28x6
  pool1  average 2x2 / 2                        14x14x6
  conv2  5x5 VALID, 16                          10x10x16
  pool2  average 2x2 / 2                        5x5x16
  head   FC 120, FC 84, FC num_classes          num_classes
  =====  =====================================  ==============

The activation follows every conv and hidden FC; the original used sigmoid
(``activation='sigmoid'``), the default here is relu like the other families. The original has no
dropout, so ``dropout_rate`` defaults to 0.0 here (dropout, when set, follows each hidden FC).
61,706 params for 28x28x1 inputs and 10 classes. Needs >= 12 px inputs.

``small`` geometry is the same net: LeNet is already a small-input network.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models import layers
from cnn_jax.models.layers import Window

_POOL = Window(2, 2, 'VALID')


class LeNet(layers.ImageClassifier):
  """LeNet-5; see the module docstring."""
  dropout_rate: float = 0.0

  @nn.nowrap
  def windows(self):
    return (Window(5, 1, 'SAME'), _POOL, Window(5, 1, 'VALID'), _POOL)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images [N, H, W, C] (any C) -> float32 logits [N, num_classes]."""
    self.check_input(x)
    act = layers.get_activation(self.activation)

    x = x.astype(self.dtype)
    x = act(layers.Conv(self.channels(6), 5, padding='SAME', dtype=self.dtype, name='conv1')(x))
    x = layers.AvgPool(_POOL.size, _POOL.stride, name='pool1')(x)
    x = act(layers.Conv(self.channels(16), 5, padding='VALID', dtype=self.dtype, name='conv2')(x))
    x = layers.AvgPool(_POOL.size, _POOL.stride, name='pool2')(x)
    x = layers.MLPHead((self.channels(120), self.channels(84)), self.num_classes, self.activation,
                       self.dropout_rate, self.dtype, name='head')(x, train)
    return x.astype(jnp.float32)
