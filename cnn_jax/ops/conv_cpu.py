"""CPU convolution rewrites: GEMM kernel gradients, space-to-depth stems, 1x1 convs as GEMMs.

XLA:CPU (jax 0.10.2) lowers convolutions either to YNNPACK fusions (its default) or, with
``ops.compiler_options()`` (YNN fusions off), to its Eigen/oneDNN convolution thunks. Under the
default, several layer shapes run far below the machine's GEMM speed, and these rewrites win:
  * 'taps' / 'im2col': the kernel gradient as matrix products,
    ``dW[i, j] = sum_{n, oh, ow} x_pad[n, oh*s + i, ow*s + j, :]^T gy[n, oh, ow, :]``, one GEMM per
    kernel tap or one over the taps' slices stacked along channels, keeping XLA's forward and dx;
  * 's2d': a strided convolution (the 11x11/4 stems of AlexNet and NiN) as a stride-1 convolution
    over a space-to-depth input: an s x s block of pixels becomes s*s*C channels and the kernel is
    zero-padded to a multiple of s and rearranged the same way, giving the same sums;
  * 'im2col' forward: one GEMM over im2col patches, reused by the kernel gradient ('im2col_ad':
    the same, differentiated by JAX, input gradient included);
  * 'dot': a 1x1 convolution as GEMMs in all three passes.
With YNN fusions off, XLA's own convolutions are as fast or faster for all but the 1x1 case, so
``plan`` (which assumes ``compiler_options()``) picks 'dot' for 1x1 convolutions, 'im2col_ad' for
maps of at most 2x2 px (where XLA's convolution is ~50x slow either way) and XLA otherwise; the
rest stays selectable with ``plan_override`` (measurements in ``plan``'s docstring).

Shapes: x [N, H, W, Cin] (NHWC), kernel [kh, kw, Cin // groups, Cout] (HWIO).
"""

import functools
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

Pads = Tuple[Tuple[int, int], Tuple[int, int]]

_DIMS = ('NHWC', 'HWIO', 'NHWC')
FWD_METHODS = ('xla', 'im2col', 'im2col_ad', 'dot', 's2d')
DW_METHODS = ('xla', 'taps', 'im2col')


class Plan(NamedTuple):
  """How one convolution is computed.

  fwd: 'xla' (lax forward, XLA dx), 'im2col' (one GEMM over patches, reused by dW), 'im2col_ad'
    (the same, all differentiated by JAX), 'dot' (1x1 as GEMMs), or 's2d' (space-to-depth, then a
    stride-1 conv computed with ``inner_fwd``).
  dw: kernel gradient for 'xla'/'s2d' forwards: 'xla', 'taps' or 'im2col' (see ``kernel_grad``).
  """
  fwd: str
  dw: str = 'xla'
  inner_fwd: str = ''


def explicit_pads(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Tuple[int, int],
                  padding) -> Pads:
  """'SAME' / 'VALID' / explicit pairs -> ((lo_h, hi_h), (lo_w, hi_w)) as lax computes them."""
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(kernel_shape[:2]), strides, padding)
  else:
    pads = padding
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def output_hw(x_shape, kernel_shape, strides, pads) -> Tuple[int, int]:
  """Output height and width of the convolution."""
  return tuple((x_shape[1 + d] + pads[d][0] + pads[d][1] - kernel_shape[d]) // strides[d] + 1
               for d in range(2))


def plan(x_shape, kernel_shape, strides, pads, groups, dtype) -> Plan:
  """Picks the fastest method for one layer on the CPU, given ``ops.compiler_options()``.

  Measured on a 2-core AMD EPYC (Zen4) with jax 0.10.2, fwd + both gradients per layer, batch 32
  (VGG 8), float32, interleaved with the alternatives, best of 5-15 (scratch microbenchmarks; the
  machine was shared, so +-10%). Times in ms, 'ynn' = XLA's default CPU lowering of convolutions
  (YNNPACK fusions), 'eigen' = with ``ops.compiler_options()`` (YNN fusions off):

    layer                          XLA ynn   XLA eigen   best rewrite (ynn / eigen)
    AlexNet conv1 11x11/4, 3->96   330       221         s2d + tap GEMMs 160 / 249
    NiN conv1 11x11/4 (224 px)     270       212         s2d + tap GEMMs 240 / 237
    VGG 112x112, 64->128 (B=8)     929       590         tap GEMMs 336 / 661
    NiN 1x1 54x54, 96->96          325       147         GEMMs 79 / 142
    AlexNet 13x13, 384->384        250       ~210        tap GEMMs 290 / slower
    VGG 224x224, 3->64 (B=8)       128       179-201     (none better)
    VGG 2x2, 512->512 (32 px)      536       539         im2col + autodiff 11 / 18
    1x1 map, 512->512              26        26          im2col + autodiff 4 / 6

  With YNN on, rewriting the kernel gradient as GEMMs and the strided stems as space-to-depth
  convolutions won 1.1-3x per layer; with YNN off (what ``compiler_options()`` asks for, and
  1.5-2.5x faster for whole train steps), XLA's own convolutions are as fast or faster, so only
  1x1 convolutions are rewritten (plain GEMMs: a tie there, a 4x win when YNN is on). The other
  methods stay available through ``conv2d(..., plan_override=...)`` and are tested. Either way,
  XLA's convolution collapses on maps of at most 2x2 px (the last VGG block at 28-32 px inputs),
  which therefore run as slices + a GEMM ('im2col_ad'); from 3x3 maps on XLA is as fast.
  """
  del dtype  # Same choice for bf16.
  kh, kw, _, _ = kernel_shape
  if (kh, kw) == (1, 1) and groups == 1 and pads == ((0, 0), (0, 0)):
    return Plan('dot')
  oh, ow = output_hw(x_shape, kernel_shape, strides, pads)
  if strides == (1, 1) and groups == 1 and oh <= 2 and ow <= 2:
    return Plan('im2col_ad')
  return Plan('xla', 'xla')


def _dot(a, b, dimension_numbers):
  """lax.dot_general accumulating in float32, result in ``a.dtype``.

  The CPU dot has no bf16 x bf16 -> f32 kernel, so bf16 operands are widened first (XLA's CPU
  convolutions compute bf16 in float32 too).
  """
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                           dimension_numbers).astype(a.dtype)
  return lax.dot_general(a, b, dimension_numbers)


def xla_conv(x, kernel, strides, pads, groups):
  """Plain ``lax.conv_general_dilated`` in NHWC/HWIO."""
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                  dimension_numbers=_DIMS, feature_group_count=groups)


def _tap_slices(xp, kernel_hw, strides, out_hw):
  """The kh*kw strided windows of the padded input, each [N, OH, OW, C], row-major tap order."""
  n, _, _, c = xp.shape
  (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def kernel_grad(x, g, kernel_shape, strides, pads, groups, method):
  """d(loss)/d(kernel) as GEMMs. x: [N, H, W, Cin]; g: [N, OH, OW, Cout] -> [kh, kw, Cin//G, Cout].

  Accumulates in float32 and returns ``g.dtype`` (like XLA's kernel gradient).
  """
  kh, kw, cin_g, cout = kernel_shape
  out_hw = g.shape[1:3]
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), pads[0] + (0,), pads[1] + (0,), (0, 0, 0)))
  taps = _tap_slices(xp, (kh, kw), strides, out_hw)
  spatial = ((0, 1, 2), (0, 1, 2))
  # gy is the GEMM's left operand so the result is dW^T [Cout, K]: the contraction over N*OH*OW is
  # then over the major dimension of the right operand (the big input slices), which the CPU dot
  # takes as is; with the slices on the left, XLA transposes each of them first (measured: that
  # copy cost as much as the GEMM). Only gy, shared by every tap, is transposed, once.
  if groups == 1:
    if method == 'im2col':
      cols = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
      dw_t = _dot(g, cols, (spatial, ((), ())))
      dw = dw_t.T
    else:
      dw_t = jnp.stack([_dot(g, t, (spatial, ((), ()))) for t in taps])
      dw = jnp.transpose(dw_t, (0, 2, 1))
    return dw.reshape(kernel_shape).astype(g.dtype)
  # Grouped: output channel o belongs to group o // (Cout // G) and sees input channels
  # [group * Cin//G, (group + 1) * Cin//G); one batched GEMM per tap over the group axis.
  n, oh, ow, _ = g.shape
  gg = g.reshape(n, oh, ow, groups, cout // groups)
  batched = ((((0, 1, 2), (0, 1, 2)), ((3,), (3,))))
  dws = []
  for t in taps:
    tg = t.reshape(n, oh, ow, groups, cin_g)
    d = _dot(tg, gg, batched)  # [G, Cin/G, Cout/G]
    dws.append(jnp.transpose(d, (1, 0, 2)).reshape(cin_g, cout))
  return jnp.stack(dws).reshape(kernel_shape).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_gemm_dw(x, kernel, strides, pads, groups, dw_method):
  """Convolution whose backward is XLA's input gradient plus ``kernel_grad(..., dw_method)``."""
  return xla_conv(x, kernel, strides, pads, groups)


def _conv_gemm_dw_fwd(x, kernel, strides, pads, groups, dw_method):
  return xla_conv(x, kernel, strides, pads, groups), (x, kernel)


def _conv_gemm_dw_bwd(strides, pads, groups, dw_method, residuals, g):
  x, kernel = residuals
  # XLA's own input gradient (fast here); dead code, removed by XLA, when x needs no gradient.
  _, vjp_x = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, pads, groups), x)
  (dx,) = vjp_x(g)
  dw = kernel_grad(x, g, kernel.shape, strides, pads, groups, dw_method)
  return dx, dw.astype(kernel.dtype)


conv_gemm_dw.defvjp(_conv_gemm_dw_fwd, _conv_gemm_dw_bwd)


def _im2col(x, kernel_hw, pads, out_hw):
  """Stride-1 patches [N, OH, OW, kh*kw*C], channel order (tap row, tap col, C) like HWIO."""
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), pads[0] + (0,), pads[1] + (0,), (0, 0, 0)))
  taps = _tap_slices(xp, kernel_hw, (1, 1), out_hw)
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def im2col_conv(x, kernel, pads):
  """Stride-1, ungrouped convolution as one GEMM over im2col patches (which the backward reuses).

  For few input channels (a space-to-depth stem: 48), where XLA's convolution runs at a fraction
  of GEMM speed here. x: [N, H, W, Cin]; kernel [kh, kw, Cin, Cout] -> [N, OH, OW, Cout].
  """
  return _im2col_conv_fwd(x, kernel, pads)[0]


def _im2col_conv_fwd(x, kernel, pads):
  kh, kw, cin, cout = kernel.shape
  out_hw = output_hw(x.shape, kernel.shape, (1, 1), pads)
  cols = _im2col(x, (kh, kw), pads, out_hw)
  y = _dot(cols, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))
  return y, (x, kernel, cols)


def _im2col_conv_bwd(pads, residuals, g):
  x, kernel, cols = residuals
  _, vjp_x = jax.vjp(lambda x_: xla_conv(x_, kernel, (1, 1), pads, 1), x)
  (dx,) = vjp_x(g)
  spatial = ((0, 1, 2), (0, 1, 2))
  dw_t = _dot(g, cols, (spatial, ((), ())))
  return dx, dw_t.T.reshape(kernel.shape).astype(kernel.dtype)


im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def im2col_autodiff_conv(x, kernel, pads):
  """Stride-1, ungrouped convolution as slices + one GEMM, differentiated by JAX.

  For tiny maps (VGG's 2x2 block5 at 32 px input), where XLA's CPU convolution runs ~50x below
  GEMM speed: the gradients are a GEMM (dW), and a GEMM plus shifted pads (dx, col2im), all small.
  x: [N, H, W, Cin]; kernel [kh, kw, Cin, Cout] -> [N, OH, OW, Cout].
  """
  kh, kw, cin, cout = kernel.shape
  cols = _im2col(x, (kh, kw), pads, output_hw(x.shape, kernel.shape, (1, 1), pads))
  return _dot(cols, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


@jax.custom_vjp
def pointwise_conv(x, kernel):
  """A 1x1, stride-1, unpadded, ungrouped convolution as GEMMs in all three passes.

  x: [N, H, W, Cin]; kernel [1, 1, Cin, Cout] -> [N, H, W, Cout].
  """
  return _pointwise_conv_fwd(x, kernel)[0]


def _pointwise_conv_fwd(x, kernel):
  y = _dot(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  return y, (x, kernel)


def _pointwise_conv_bwd(residuals, g):
  x, kernel = residuals
  dx = _dot(g, kernel[0, 0], (((3,), (1,)), ((), ())))
  spatial = ((0, 1, 2), (0, 1, 2))
  dw_t = _dot(g, x, (spatial, ((), ())))
  return dx, dw_t.T.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


def space_to_depth_conv(x, kernel, strides, pads, inner: 'Plan'):
  """A strided convolution (groups == 1) computed as a stride-1 one over a space-to-depth input.

  x [N, H, W, C] is padded (or cropped: those pixels feed no output) to s*(OH + ceil(k/s) - 1)
  per side, regrouped to [N, H/s, W/s, s*s*C] (channel order (row offset, col offset, C)), and
  the kernel zero-padded to ceil(k/s)*s taps and regrouped to [ceil(k/s), ceil(k/s), s*s*C, Cout].
  Gradients flow through the pads and reshapes by autodiff.
  """
  n, h, w, c = x.shape
  kh, kw, _, cout = kernel.shape
  (sh, sw) = strides
  oh, ow = output_hw(x.shape, kernel.shape, strides, pads)
  kh2, kw2 = -(-kh // sh), -(-kw // sw)
  hn, wn = sh * (oh + kh2 - 1), sw * (ow + kw2 - 1)
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (pads[0][0], hn - h - pads[0][0], 0),
                         (pads[1][0], wn - w - pads[1][0], 0), (0, 0, 0)))
  x2 = xp.reshape(n, hn // sh, sh, wn // sw, sw, c).transpose(0, 1, 3, 2, 4, 5)
  x2 = x2.reshape(n, hn // sh, wn // sw, sh * sw * c)
  kp = jnp.pad(kernel, ((0, kh2 * sh - kh), (0, kw2 * sw - kw), (0, 0), (0, 0)))
  k2 = kp.reshape(kh2, sh, kw2, sw, c, cout).transpose(0, 2, 1, 3, 4, 5)
  k2 = k2.reshape(kh2, kw2, sh * sw * c, cout)
  return _stride1_conv(x2, k2, ((0, 0), (0, 0)), 1, inner)


def _stride1_conv(x, kernel, pads, groups, p: Plan):
  if p.fwd == 'im2col':
    return im2col_conv(x, kernel, pads)
  if p.fwd == 'im2col_ad':
    return im2col_autodiff_conv(x, kernel, pads)
  if p.fwd == 'dot':
    return pointwise_conv(x, kernel)
  if p.dw == 'xla':
    return xla_conv(x, kernel, (1, 1), pads, groups)
  return conv_gemm_dw(x, kernel, (1, 1), pads, groups, p.dw)


def conv2d(x, kernel, strides, padding, groups, plan_override: Plan = None):
  """CPU-tuned convolution with ``lax.conv_general_dilated``'s meaning (NHWC/HWIO).

  x: [N, H, W, Cin]; kernel: [kh, kw, Cin // groups, Cout] -> [N, OH, OW, Cout].
  ``plan_override`` forces a method (benchmarks); by default ``plan`` picks one per shape.
  """
  strides = tuple(int(s) for s in strides)
  pads = explicit_pads(x.shape, kernel.shape, strides, padding)
  p = plan_override or plan(x.shape, kernel.shape, strides, pads, groups, x.dtype)
  if p.fwd == 's2d':
    inner = Plan(p.inner_fwd or 'xla', p.dw)
    return space_to_depth_conv(x, kernel, strides, pads, inner)
  if strides == (1, 1) or p.fwd == 'dot':
    if strides != (1, 1):  # A strided 1x1 conv is a 1x1 conv of the subsampled input.
      x = x[:, ::strides[0], ::strides[1], :]
    return _stride1_conv(x, kernel, pads, groups, p)
  if p.dw == 'xla':
    return xla_conv(x, kernel, strides, pads, groups)
  return conv_gemm_dw(x, kernel, strides, pads, groups, p.dw)
