"""Low-level layer kernels shared by every model.

Models call these instead of ``lax`` directly so that a faster lowering changes every network at
once. Shapes are NHWC for activations and HWIO for kernels.

Lowerings, chosen at trace time (``set_impl`` / ``impl`` / ``$CNN_JAX_CONV_IMPL``; see ``_impl``):
  * 'xla': plain ``lax.conv_general_dilated`` / ``lax.reduce_window``, differentiated by JAX.
  * 'cpu' (``conv_cpu``, ``pool_cpu``): same values; a max-pool backward without select-and-scatter,
    1x1 convolutions as GEMMs, and per-shape rewrites of other convolutions (GEMM kernel gradients,
    space-to-depth stems) where measured faster on a CPU.
  * 'gpu': XLA's convolutions (cuDNN), the max-pool backward without select-and-scatter (half the
    temporaries of a train step); 'tpu': plain XLA.
    'auto' (the default) is the default backend's.

On the CPU, jit train/eval steps with ``compiler_options=ops.compiler_options()``: it turns off
XLA's YNNPACK fusions, whose convolutions were the largest cost of a train step here (see
``_impl.compiler_options``); the CPU kernels' choices assume it.
"""

from typing import Sequence, Tuple, Union

import jax

from cnn_jax.ops import conv_cpu
from cnn_jax.ops import pool_cpu
from cnn_jax.ops._impl import (ENV_VAR, IMPLS, compiler_options, get_impl, impl, resolved_impl, set_impl,
                               use_cpu_kernels, use_mask_pool_backward)

Padding = Union[str, Sequence[Tuple[int, int]]]

__all__ = ['conv2d', 'max_pool', 'compiler_options', 'set_impl', 'get_impl', 'impl', 'resolved_impl',
           'use_cpu_kernels', 'use_mask_pool_backward', 'IMPLS', 'ENV_VAR']


def conv2d(x: jax.Array, kernel: jax.Array, strides: Tuple[int, int] = (1, 1),
           padding: Padding = "SAME", feature_group_count: int = 1) -> jax.Array:
  """2-D convolution. x: [N, H, W, Cin]; kernel: [kh, kw, Cin // groups, Cout] → [N, H', W', Cout].

  Same values and gradients as ``lax.conv_general_dilated(x, kernel, strides, padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=...)`` up to float rounding.
  """
  strides = tuple(int(s) for s in strides)
  pads = conv_cpu.explicit_pads(x.shape, kernel.shape, strides, padding)
  if use_cpu_kernels():
    return conv_cpu.conv2d(x, kernel, strides, pads, feature_group_count)
  return conv_cpu.xla_conv(x, kernel, strides, pads, feature_group_count)


def max_pool(x: jax.Array, window: Tuple[int, int], strides: Tuple[int, int],
             padding: Padding = "VALID") -> jax.Array:
  """Max pooling over H and W (-inf padding). x: [N, H, W, C] → [N, H', W', C].

  Gradients match ``jax.grad`` of ``lax.reduce_window(max)``, ties included (the first maximum in
  row-major window order gets the gradient; see ``pool_cpu``).
  """
  window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
  pads = pool_cpu.explicit_pads(x.shape, window, strides, padding)
  if use_mask_pool_backward():
    return pool_cpu.max_pool(x, window, strides, pads)
  return pool_cpu.xla_max_pool(x, window, strides, pads)
