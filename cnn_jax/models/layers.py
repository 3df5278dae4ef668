"""Layers and helpers shared by every model family.

Convolutions and max-pooling go through :mod:`cnn_jax.ops` so that a faster kernel there speeds up
every network. Activations are NHWC, kernels HWIO. Parameters are always float32; ``dtype`` is the
compute dtype of the activations (e.g. ``jnp.bfloat16`` for mixed precision).

Also here: the spatial bookkeeping (``Window``, ``min_input_size``, ``check_input_size``) the
models use to reject a too-small input with a clear message instead of a shape traceback.
"""

import numbers
from typing import Any, Callable, Dict, NamedTuple, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_jax import ops
from cnn_jax.errors import UserError

Dtype = Any
IntPair = Union[int, Tuple[int, int]]

# Names in jax.nn that are elementwise activations (jax.nn also holds softmax, one_hot, ...).
ACTIVATIONS = tuple(name for name in (
    'relu', 'relu6', 'sigmoid', 'tanh', 'gelu', 'elu', 'selu', 'celu', 'silu', 'swish', 'mish',
    'leaky_relu', 'softplus', 'soft_sign', 'log_sigmoid', 'hard_tanh', 'hard_sigmoid', 'hard_silu',
    'hard_swish', 'squareplus', 'sparse_plus', 'identity') if hasattr(jax.nn, name))

GEOMETRIES = ('native', 'small')


def _pair(value: IntPair) -> Tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the ``jax.nn`` activation called ``name`` (e.g. 'relu', 'sigmoid', 'gelu')."""
  if name not in ACTIVATIONS:
    raise UserError(f'Unknown activation {name!r}; choose one of: {", ".join(ACTIVATIONS)}.')
  return getattr(jax.nn, name)


def scale_width(channels: int, width: float) -> int:
  """Channel count ``channels * width`` rounded to the nearest integer, at least 1."""
  return max(1, int(round(channels * width)))


def check_common_kwargs(*, num_classes: int, activation: str, dropout_rate: float, width: float,
                        geometry: str) -> None:
  """Raises UserError for a bad value of a kwarg every model family takes."""
  if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise UserError(f'num_classes must be a positive integer; got {num_classes!r}.')
  get_activation(activation)
  if not 0.0 <= dropout_rate < 1.0:
    raise UserError(f'dropout_rate must be in [0, 1); got {dropout_rate!r}.')
  if not width > 0:
    raise UserError(f'width must be > 0 (a channel multiplier, 1.0 = paper); got {width!r}.')
  if geometry not in GEOMETRIES:
    raise UserError(f'Unknown geometry {geometry!r}; choose one of: {", ".join(GEOMETRIES)}.')


class Conv(nn.Module):
  """2-D convolution through ``cnn_jax.ops.conv2d``, with nn.Conv's parameter conventions.

  Params: 'kernel' float32 [kh, kw, Cin // feature_group_count, features] (He normal) and
  'bias' float32 [features] (zeros). Input [N, H, W, Cin] -> output [N, H', W', features] in
  ``dtype``.
  """
  features: int
  kernel_size: IntPair
  strides: IntPair = 1
  padding: str = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # He (Kaiming) normal, fan-in: keeps activation variance through ReLU stacks, which plain VGG and NiN
  # (no BatchNorm) need to start learning; LeCun normal left VGG-11 and NiN stuck at chance in our runs.
  kernel_init: Callable[..., jax.Array] = nn.initializers.kaiming_normal()
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    groups = self.feature_group_count
    if in_features % groups or self.features % groups:
      raise UserError(
          f'A grouped convolution needs input ({in_features}) and output ({self.features}) '
          f'channels divisible by groups={groups}; pick a width that keeps them divisible.')
    kh, kw = _pair(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init, (kh, kw, in_features // groups, self.features),
                        self.param_dtype)
    y = ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), _pair(self.strides),
                   self.padding, groups)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class MaxPool(nn.Module):
  """Max-pooling through ``cnn_jax.ops.max_pool``: [N, H, W, C] -> [N, H', W', C].

  A module (without params) rather than a bare function so it shows up in model summaries.
  """
  window: IntPair
  strides: IntPair
  padding: str = 'VALID'

  def __call__(self, x: jax.Array) -> jax.Array:
    return ops.max_pool(x, _pair(self.window), _pair(self.strides), self.padding)


class AvgPool(nn.Module):
  """Average pooling: [N, H, W, C] -> [N, H', W', C] (VALID windows average exactly k*k values)."""
  window: IntPair
  strides: IntPair
  padding: str = 'VALID'

  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, _pair(self.window), _pair(self.strides), self.padding)


class LocalResponseNorm(nn.Module):
  """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

  b_c = a_c / (k + alpha * sum_{j=max(0, c-n//2)}^{min(C-1, c+n//2)} a_j^2) ** beta.

  As in the paper (and tf.nn.local_response_normalization), alpha multiplies the plain sum;
  PyTorch's nn.LocalResponseNorm divides alpha by n. Computed in float32, returned in the input
  dtype.
  Shape [N, H, W, C] -> [N, H, W, C].
  """
  size: int = 5
  k: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75

  def __call__(self, x: jax.Array) -> jax.Array:
    squares = jnp.square(x.astype(jnp.float32))
    half = self.size // 2
    window_sums = lax.reduce_window(
        squares, 0.0, lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
    y = x.astype(jnp.float32) / (self.k + self.alpha * window_sums) ** self.beta
    return y.astype(x.dtype)


class Window(NamedTuple):
  """The spatial footprint of one conv or pool: square kernel ``size``, ``stride``, ``padding``."""
  size: int
  stride: int
  padding: str  # 'SAME' or 'VALID'


def output_size(size: int, window: Window) -> int:
  """Output side length (px) of ``window`` applied to an input of side ``size`` px."""
  if window.padding == 'SAME':
    return -(-size // window.stride)
  if size < window.size:
    return 0
  return (size - window.size) // window.stride + 1


def feature_map_sizes(size: int, windows: Sequence[Window]) -> Tuple[int, ...]:
  """Side length (px) after each window in turn, for an input of side ``size`` px."""
  sizes = []
  for window in windows:
    size = output_size(size, window)
    sizes.append(size)
  return tuple(sizes)


def min_input_size(windows: Sequence[Window]) -> int:
  """Smallest input side (px) that leaves every feature map at least 1 px."""
  size = 1
  # Output sizes are monotone in the input size, so the first size that works is the minimum.
  while min(feature_map_sizes(size, windows), default=1) < 1:
    size += 1
  return size


def check_input_size(model_name: str, geometry: str, height: int, width: int,
                     windows: Sequence[Window]) -> None:
  """Raises UserError when an input of ``height`` x ``width`` px is too small for ``windows``."""
  minimum = min_input_size(windows)
  if height >= minimum and width >= minimum:
    return
  hint = f'Use --config.image_size>={minimum}'
  if geometry == 'native':
    hint += ' or geometry=small'
  raise UserError(f'{model_name} ({geometry} geometry) needs inputs of at least {minimum}x{minimum}'
                  f' px; got {height}x{width}. {hint}.')


# The layer that outputs the class scores starts small: its kernel at a tenth of its family's init, its bias at
# 1. One rule for every family. Where the scores are linear (AlexNet, VGG, LeNet: a Dense layer, softmax) a
# common bias changes nothing and the small kernel starts every class at about the same score. Where a ReLU
# follows (NiN: block4's last 1x1 conv, then global average pooling), a zero-mean start leaves some classes'
# maps all negative on every image, their score stuck at 0 and their gradient at 0, and the network at chance
# for thousands of steps; at 1 + a small term every class starts alive (docs/results/recipe).
CLASSIFIER_KERNEL_SCALE = 0.1
CLASSIFIER_BIAS = 1.0


def classifier_init(fan_in_scale: float) -> Dict[str, Callable[..., jax.Array]]:
  """kernel_init / bias_init of the layer that outputs the class scores, for a family init of variance
  `fan_in_scale` / fan_in (2.0: He, conv layers; 1.0: LeCun, dense layers)."""
  return {"kernel_init": nn.initializers.variance_scaling(fan_in_scale * CLASSIFIER_KERNEL_SCALE ** 2, "fan_in",
                                                          "truncated_normal"),
          "bias_init": nn.initializers.constant(CLASSIFIER_BIAS)}


class ImageClassifier(nn.Module):
  """Fields and helpers every model family shares; subclasses define ``windows`` and ``__call__``.

  Attributes:
    num_classes: number of logits.
    activation: name of a ``jax.nn`` activation (see ``ACTIVATIONS``).
    dropout_rate: dropout probability in the classifier head (rng name 'dropout'); the default is the
      paper's for the family (0.5 here; LeNet overrides it with 0.0).
    width: multiplier of every conv's channels and of the hidden FC widths (rounded, >= 1).
    geometry: 'native' (paper) or 'small' (28-64 px inputs; see each family's docstring).
    dtype: compute dtype of the activations; params stay float32 and logits are float32.
  """
  num_classes: int
  activation: str = 'relu'
  dropout_rate: float = 0.5
  width: float = 1.0
  geometry: str = 'native'
  dtype: Dtype = jnp.float32

  # The weight init every family here uses (``Conv`` and flax's ``nn.Dense`` defaults). Not the papers'
  # N(0, 0.01): with it plain VGG-11 and NiN stayed at chance in our runs (see ``Conv``). An architecture
  # property, recorded with each run (``cnn_jax.models.architecture``), never a recipe field.
  INIT = ('conv kernels He normal (fan-in), dense kernels LeCun normal, biases 0; the layer that outputs the '
          f'class scores: kernel x{CLASSIFIER_KERNEL_SCALE:g}, bias {CLASSIFIER_BIAS:g}')

  def __post_init__(self):
    check_common_kwargs(num_classes=self.num_classes, activation=self.activation,
                        dropout_rate=self.dropout_rate, width=self.width, geometry=self.geometry)
    super().__post_init__()

  @nn.nowrap
  def model_name(self) -> str:
    """The registry name of this model (used in error messages)."""
    return type(self).__name__.lower()

  @nn.nowrap
  def windows(self) -> Tuple[Window, ...]:
    """Spatial footprint of every conv and pool, in order (for the minimum input size)."""
    raise NotImplementedError

  @nn.nowrap
  def check_input(self, x: jax.Array) -> None:
    """Raises UserError unless ``x`` is [N, H, W, C] with H and W large enough for this net."""
    if x.ndim != 4:
      raise UserError(f'{self.model_name()} expects images of shape [N, H, W, C]; got {x.shape}.')
    check_input_size(self.model_name(), self.geometry, x.shape[1], x.shape[2], self.windows())

  @nn.nowrap
  def channels(self, paper_channels: int) -> int:
    """``paper_channels`` scaled by ``width``."""
    return scale_width(paper_channels, self.width)


class MLPHead(nn.Module):
  """Flatten, then Dense+activation+dropout for each of ``hidden``, then Dense ``num_classes``.

  [N, ...] -> [N, num_classes] in ``dtype``. The AlexNet/VGG classifier with hidden=(4096, 4096).
  """
  hidden: Sequence[int]
  num_classes: int
  activation: str = 'relu'
  dropout_rate: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = get_activation(self.activation)
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.hidden):
      x = act(nn.Dense(features, dtype=self.dtype, name=f'fc{i + 1}')(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f'dropout{i + 1}')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits', **classifier_init(1.0))(x)
