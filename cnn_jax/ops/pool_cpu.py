"""CPU-tuned max pooling: XLA's forward, a backward without select-and-scatter.

Why: XLA's max-pool gradient is a select-and-scatter, which on the CPU runs ~30x slower than the
forward pass (shared/notes/cpu-conv-backward.md). Here the backward compares each window tap of the
input with the pooled output to find, per output, the first tap (row-major within the window) that
holds the maximum, and routes the incoming gradient there; the scatter back to input positions is
written in the space-to-depth view of the input so that it is plain elementwise code that XLA fuses
into one loop (AlexNet pool1 backward, 32x55x55x96: 127 ms -> 19 ms alone, 228 -> 61 ms with its
gradient input; VGG 2x2 pools 5-10x faster).

Ties: select-and-scatter with the ``ge`` select that ``jax.grad`` of ``lax.reduce_window(max)``
emits also keeps the first maximum in row-major window order, so the gradients equal lax's, ties
included (up to float summation order where windows overlap). Only NaN inputs differ: no tap
equals a NaN maximum, so its gradient is dropped.
Shapes: x [N, H, W, C] (NHWC).
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Pads = Tuple[Tuple[int, int], Tuple[int, int]]


def explicit_pads(x_shape, window, strides, padding) -> Pads:
  """'SAME' / 'VALID' / explicit pairs -> ((lo_h, hi_h), (lo_w, hi_w))."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(window), tuple(strides), padding)
  else:
    pads = padding
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def xla_max_pool(x, window, strides, pads):
  """Plain ``lax.reduce_window`` max with -inf padding."""
  # A NumPy (concrete) init value lets lax recognise the max monoid, which has an autodiff rule.
  init = np.array(-np.inf, dtype=x.dtype)
  return lax.reduce_window(x, init, lax.max, (1,) + tuple(window) + (1,),
                           (1,) + tuple(strides) + (1,), ((0, 0),) + tuple(pads) + ((0, 0),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, pads):
  """Max pooling [N, H, W, C] -> [N, OH, OW, C] with the mask-based backward (module docstring)."""
  return xla_max_pool(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
  y = xla_max_pool(x, window, strides, pads)
  return y, (x, y)


def first_max_tap(xp, y, window, strides):
  """Row-major index of the first window tap equal to the window's max: int8/int32 [N, OH, OW, C].

  xp: the -inf padded input [N, Hp, Wp, C]; y: the pooled output [N, OH, OW, C].
  """
  n, _, _, c = xp.shape
  _, oh, ow, _ = y.shape
  (kh, kw), (sh, sw) = window, strides
  num_taps = kh * kw
  index_dtype = jnp.int8 if num_taps < 127 else jnp.int32
  first = jnp.full(y.shape, num_taps, index_dtype)
  for t in reversed(range(num_taps)):
    i, j = divmod(t, kw)
    xs = lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                   (1, sh, sw, 1))
    first = jnp.where(xs == y, jnp.asarray(t, index_dtype), first)
  return first


def _max_pool_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  n, h, w, c = x.shape
  _, oh, ow, _ = y.shape
  (kh, kw), (sh, sw) = window, strides
  xp = lax.pad(x, np.array(-np.inf, x.dtype), ((0, 0, 0), pads[0] + (0,), pads[1] + (0,),
                                               (0, 0, 0)))
  first = first_max_tap(xp, y, window, strides)
  # Scatter in the space-to-depth view of the padded input, [N, Hq, sh, Wq, sw, C]: tap
  # (i, j) = (a*sh + b, e*sw + d) of output (oh, ow) lands in block (oh + a, ow + e) at phase
  # (b, d). So dx is a sum over the ceil(k/s)^2 block shifts (a, e) of plain pads of ``first`` and
  # ``g``, each compared with the tap index of its phase: one elementwise loop with no index
  # division, unlike interior-padded pads (measured 1.5x slower) or select-and-scatter (4-10x).
  kh2, kw2 = -(-kh // sh), -(-kw // sw)
  hq, wq = oh + kh2 - 1, ow + kw2 - 1
  phase_h = lax.broadcasted_iota(jnp.int32, (1, 1, sh, 1, sw, 1), 2)
  phase_w = lax.broadcasted_iota(jnp.int32, (1, 1, sh, 1, sw, 1), 4)
  zero = jnp.zeros((), g.dtype)
  no_tap = jnp.array(-1, first.dtype)
  dx6 = None
  for a in range(kh2):
    for e in range(kw2):
      i, j = a * sh + phase_h, e * sw + phase_w
      tap = jnp.where((i < kh) & (j < kw), i * kw + j, -1).astype(first.dtype)
      shift = ((0, 0, 0), (a, kh2 - 1 - a, 0), (e, kw2 - 1 - e, 0), (0, 0, 0))
      first_ae = lax.pad(first, no_tap, shift)[:, :, None, :, None, :]
      g_ae = lax.pad(g, zero, shift)[:, :, None, :, None, :]
      term = jnp.where(first_ae == tap, g_ae, zero)
      dx6 = term if dx6 is None else dx6 + term
  dxp = dx6.reshape(n, hq * sh, wq * sw, c)
  # dxp covers padded rows [0, hq*sh); rows past that feed no output (zero gradient).
  dxp = lax.pad(dxp, zero, ((0, 0, 0), (0, max(0, pads[0][0] + h - hq * sh), 0),
                            (0, max(0, pads[1][0] + w - wq * sw), 0), (0, 0, 0)))
  dx = lax.slice(dxp, (0, pads[0][0], pads[1][0], 0), (n, pads[0][0] + h, pads[1][0] + w, c))
  return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
