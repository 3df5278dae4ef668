"""cnn_jax.ops (CPU-tuned conv2d / max_pool) against plain lax, and cnn_jax.perf.

Every conv case checks the forward and the gradients wrt the input and the kernel; tolerances are
relative to the largest magnitude of the reference (float32: 1e-4, the methods only reorder sums;
bfloat16 inputs: 2e-2, against a float32 reference on the same bf16-rounded values).
"""

import types

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from cnn_jax import ops
from cnn_jax import perf
from cnn_jax.errors import UserError
from cnn_jax.ops import conv_cpu
from cnn_jax.ops.conv_cpu import Plan

F32_TOL = 1e-4
BF16_TOL = 2e-2
# XLA:CPU's LLVM optimisations take ~2 s per test function here and change no value (fusion and
# the HLO under test are decided before them); level 0 keeps the file well under a minute.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(f):
  return jax.jit(f, compiler_options=_FAST_COMPILE)


def _ref_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def _ref_pool(x, window, strides, padding):
  if not isinstance(padding, str):
    padding = ((0, 0),) + tuple(padding) + ((0, 0),)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + window + (1,), (1,) + strides + (1,),
                           padding)


def _value_and_grads(f, *args):
  """f(*args) -> y; returns (y, d/dargs of sum(y * cotangent)) with a fixed pseudo-random cotangent."""
  y, vjp = jax.vjp(f, *args)
  # Deterministic, tie-free and cheap to build inside the jitted function.
  cot = jnp.sin(jnp.arange(y.size, dtype=jnp.float32) * 0.7).reshape(y.shape).astype(y.dtype)
  return (y,) + vjp(cot)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _conv_inputs(n, h, w, cin, cout, k, groups, dtype=jnp.float32, seed=0):
  # NumPy, not jax.random: each new shape would cost a compilation.
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, cin), np.float32)
  kernel = rng.standard_normal((k, k, cin // groups, cout), np.float32) / np.sqrt(k * k * cin)
  return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def _check_conv(x, kernel, strides, padding, groups, tol, plan_override=None):
  """Compares ops.conv2d ('cpu' impl, or a forced plan) with lax: forward, dx and dW."""
  def ours(x, kernel):
    if plan_override is not None:
      pads = conv_cpu.explicit_pads(x.shape, kernel.shape, strides, padding)
      return conv_cpu.conv2d(x, kernel, strides, pads, groups, plan_override=plan_override)
    return ops.conv2d(x, kernel, strides, padding, groups)

  def both(x, kernel):
    # The reference runs in float32 on the same (possibly bf16-rounded) values.
    ref = _value_and_grads(lambda a, b: _ref_conv(a, b, strides, padding, groups),
                           x.astype(jnp.float32), kernel.astype(jnp.float32))
    return _value_and_grads(ours, x, kernel), ref

  with ops.impl('cpu'):
    got, want = _jit(both)(x, kernel)
  for name, g, r in zip(('forward', 'dx', 'dkernel'), got, want):
    assert g.shape == r.shape, name
    assert g.dtype == x.dtype, name
    assert _rel_err(g, r) < tol, (name, _rel_err(g, r))


# (batch, height, width, Cin, Cout, k, strides, padding, groups) through the default plan.
CONV_CASES = [
    (2, 31, 31, 3, 8, 11, 4, 'VALID', 1),     # AlexNet-like stem (227 -> 55 at full size).
    (2, 17, 15, 4, 6, 5, 2, 'SAME', 1),       # Strided SAME, odd sizes, non-square.
    (1, 16, 16, 5, 4, 3, 2, ((1, 0), (2, 1)), 1),  # Explicit asymmetric padding.
    (2, 9, 9, 6, 4, 1, 2, 'VALID', 1),        # Strided 1x1: GEMM on the subsampled input.
    (2, 10, 10, 6, 4, 3, 2, 'SAME', 2),       # Grouped strided.
    (2, 9, 9, 6, 10, 1, 1, 'VALID', 1),       # 1x1 (NiN): GEMMs.
    (2, 13, 13, 8, 16, 3, 1, 'SAME', 1),
    (2, 13, 13, 8, 16, 5, 1, 'SAME', 2),      # Grouped (AlexNet groups=2).
    (1, 12, 12, 4, 6, 3, 1, 'VALID', 1),
    (2, 2, 2, 16, 8, 3, 1, 'SAME', 1),        # Tiny map (VGG block5 at 32 px): slices + GEMM.
    (2, 1, 1, 16, 8, 3, 1, 'SAME', 1),
    (2, 4, 3, 6, 8, 3, 1, 'VALID', 1),        # 2x1 output.
]

@pytest.mark.parametrize('n,h,w,cin,cout,k,s,padding,groups', CONV_CASES)
def test_conv2d_matches_lax(n, h, w, cin, cout, k, s, padding, groups):
  x, kernel = _conv_inputs(n, h, w, cin, cout, k, groups)
  _check_conv(x, kernel, (s, s), padding, groups, F32_TOL)


# Every rewrite forced, on shapes where the default plan keeps XLA's lowering.
FORCED = [
    ((2, 31, 31, 3), (11, 11, 3, 8), (4, 4), 'VALID', 1, Plan('s2d', 'taps', 'xla')),  # Crops.
    ((2, 28, 28, 3), (11, 11, 3, 8), (4, 4), 'VALID', 1, Plan('s2d', 'taps', 'xla')),  # NiN-like.
    ((1, 16, 16, 5), (3, 3, 5, 4), (2, 2), ((1, 0), (2, 1)), 1, Plan('s2d', 'taps', 'xla')),
    ((2, 15, 15, 3), (7, 7, 3, 4), (2, 2), 'SAME', 1, Plan('s2d', 'im2col', 'xla')),
    ((2, 15, 15, 3), (7, 7, 3, 4), (2, 2), 'SAME', 1, Plan('s2d', 'xla', 'im2col')),
    ((2, 15, 15, 3), (7, 7, 3, 4), (2, 2), 'VALID', 1, Plan('s2d', 'xla', 'xla')),
    ((2, 11, 11, 5), (3, 3, 5, 7), (1, 1), 'SAME', 1, Plan('xla', 'taps')),
    ((1, 12, 12, 4), (3, 3, 4, 6), (1, 1), ((2, 0), (0, 1)), 1, Plan('xla', 'taps')),
    ((2, 11, 11, 5), (3, 3, 5, 7), (1, 1), 'SAME', 1, Plan('xla', 'im2col')),
    ((2, 11, 11, 6), (3, 3, 3, 8), (1, 1), 'SAME', 2, Plan('xla', 'taps')),
    ((2, 11, 11, 6), (3, 3, 3, 8), (1, 1), 'SAME', 2, Plan('xla', 'im2col')),
    ((2, 11, 11, 5), (3, 3, 5, 7), (1, 1), 'VALID', 1, Plan('im2col')),
    ((2, 11, 11, 5), (3, 3, 5, 7), (1, 1), 'SAME', 1, Plan('im2col_ad')),
    ((2, 15, 15, 6), (5, 5, 3, 4), (2, 2), 'VALID', 2, Plan('xla', 'taps')),  # Strided grouped.
]

@pytest.mark.parametrize('x_shape,k_shape,strides,padding,groups,plan', FORCED)
def test_conv2d_every_method_matches_lax(x_shape, k_shape, strides, padding, groups, plan):
  x, kernel = _conv_inputs(*x_shape, k_shape[-1], k_shape[0], groups)
  _check_conv(x, kernel, strides, padding, groups, F32_TOL, plan_override=plan)


@pytest.mark.parametrize('case', [CONV_CASES[0], CONV_CASES[5], CONV_CASES[7], CONV_CASES[9]])
def test_conv2d_bfloat16(case):
  n, h, w, cin, cout, k, s, padding, groups = case
  x, kernel = _conv_inputs(n, h, w, cin, cout, k, groups, dtype=jnp.bfloat16)
  _check_conv(x, kernel, (s, s), padding, groups, BF16_TOL)


def test_conv2d_bfloat16_rewrites():
  x, kernel = _conv_inputs(2, 31, 31, 3, 8, 11, 1, dtype=jnp.bfloat16)
  _check_conv(x, kernel, (4, 4), 'VALID', 1, BF16_TOL, plan_override=Plan('s2d', 'taps', 'xla'))
  x, kernel = _conv_inputs(2, 11, 11, 5, 7, 3, 1, dtype=jnp.bfloat16)
  _check_conv(x, kernel, (1, 1), 'SAME', 1, BF16_TOL, plan_override=Plan('im2col'))


def test_plan_picks_fast_methods_for_the_classic_layers():
  def plan(x_shape, k_shape, strides, padding):
    pads = conv_cpu.explicit_pads(x_shape, k_shape, strides, padding)
    return conv_cpu.plan(x_shape, k_shape, strides, pads, 1, jnp.float32)

  assert plan((32, 227, 227, 3), (11, 11, 3, 96), (4, 4), "VALID") == Plan("xla", "xla")
  assert plan((32, 54, 54, 96), (1, 1, 96, 96), (1, 1), 'VALID').fwd == 'dot'
  assert plan((32, 112, 112, 64), (3, 3, 64, 128), (1, 1), "SAME") == Plan("xla", "xla")
  assert plan((32, 13, 13, 256), (3, 3, 256, 384), (1, 1), 'SAME') == Plan('xla', 'xla')
  assert plan((32, 224, 224, 3), (3, 3, 3, 64), (1, 1), 'SAME') == Plan('xla', 'xla')
  assert plan((32, 2, 2, 512), (3, 3, 512, 512), (1, 1), 'SAME') == Plan('im2col_ad')
  assert plan((32, 3, 3, 384), (3, 3, 384, 10), (1, 1), 'SAME') == Plan('xla', 'xla')


def test_xla_impl_is_plain_lax():
  x, kernel = _conv_inputs(2, 12, 12, 4, 6, 3, 1)
  with ops.impl('xla'):
    hlo = jax.jit(jax.grad(lambda k: ops.conv2d(x, k, (2, 2), 'SAME').sum())).lower(kernel)
    got = _jit(lambda x, k: ops.conv2d(x, k, (2, 2), 'SAME'))(x, kernel)
  np.testing.assert_array_equal(got, _ref_conv(x, kernel, (2, 2), 'SAME', 1))
  text = hlo.as_text()
  assert 'convolution' in text and 'dot_general' not in text  # No GEMM rewrite, no s2d.


def test_compiler_options():
  with ops.impl('xla'):
    assert ops.compiler_options() == {}
  with ops.impl('cpu'):
    options = ops.compiler_options()
  if jax.default_backend() == 'cpu':
    # This jaxlib knows the option; the test pins it so a jax upgrade that drops it is noticed.
    assert options == {'xla_cpu_experimental_ynn_fusion_type': ''}
    x, kernel = _conv_inputs(2, 27, 27, 96, 64, 5, 1)
    conv = lambda x, k: ops.conv2d(x, k)
    default = jax.jit(conv).lower(x, kernel).compile().as_text()
    tuned = jax.jit(conv, compiler_options=options).lower(x, kernel).compile().as_text()
    assert '__ynn_fusion' in default and '__ynn_fusion' not in tuned
  else:
    assert options == {}


def test_tiny_alexnet_gradients_match_across_impls():
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model('alexnet', 10, geometry='small', width=1 / 16, dropout_rate=0.0)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 32, 32, 3), np.float32))
  params = _jit(model.init)(jax.random.key(0), x)['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, x, train=False) ** 2)
  grads = {}
  for name in ('xla', 'cpu'):
    with ops.impl(name):
      options = dict(_FAST_COMPILE, **ops.compiler_options())
      grads[name] = jax.jit(jax.grad(loss), compiler_options=options)(params)
  for got, want in zip(jax.tree.leaves(grads['cpu']), jax.tree.leaves(grads['xla'])):
    assert _rel_err(got, want) < F32_TOL


def test_impl_switch(monkeypatch):
  monkeypatch.delenv(ops.ENV_VAR, raising=False)
  ops.set_impl(None)
  assert ops.get_impl() == 'auto'
  assert ops.use_cpu_kernels() == (jax.default_backend() == 'cpu')
  monkeypatch.setenv(ops.ENV_VAR, 'xla')
  assert ops.get_impl() == 'xla' and not ops.use_cpu_kernels() and not ops.use_mask_pool_backward()
  with ops.impl('cpu'):
    assert ops.use_cpu_kernels() and ops.use_mask_pool_backward()
  with ops.impl('gpu'):  # XLA's convolutions (cuDNN), the max-pool backward without select-and-scatter
    assert not ops.use_cpu_kernels() and ops.use_mask_pool_backward()
  with ops.impl('tpu'):  # plain XLA: there select-and-scatter needs less memory than the mask-based backward
    assert not ops.use_cpu_kernels() and not ops.use_mask_pool_backward()
  assert ops.get_impl() == 'xla'
  ops.set_impl('cpu')
  try:
    assert ops.get_impl() == 'cpu'  # set_impl beats the environment.
  finally:
    ops.set_impl(None)
  with pytest.raises(UserError, match='Unknown cnn_jax.ops impl'):
    ops.set_impl('cudnn')
  monkeypatch.setenv(ops.ENV_VAR, 'bogus')
  with pytest.raises(UserError, match='CNN_JAX_CONV_IMPL'):
    ops.get_impl()


POOL_CASES = [
    ((2, 27, 27, 5), (3, 3), (2, 2), 'VALID'),   # AlexNet / NiN overlapping pool.
    ((2, 28, 28, 5), (3, 3), (2, 2), 'VALID'),   # Even size: the last column feeds no output.
    ((2, 8, 8, 5), (2, 2), (2, 2), 'VALID'),     # VGG.
    ((2, 7, 9, 5), (2, 2), (2, 2), 'SAME'),      # VGG small geometry: odd maps.
    ((2, 9, 9, 5), (3, 3), (2, 2), 'SAME'),
    ((2, 7, 7, 5), (3, 3), (1, 1), 'SAME'),
    ((2, 10, 10, 5), (2, 2), (3, 3), 'VALID'),   # Window smaller than the stride.
    ((1, 11, 10, 3), (3, 2), (2, 1), ((1, 0), (0, 1))),  # Explicit, rectangular.
]


def _check_pool(x, window, strides, padding, tol):
  def both(x):
    ref = _value_and_grads(lambda a: _ref_pool(a, window, strides, padding), x)
    return _value_and_grads(lambda a: ops.max_pool(a, window, strides, padding), x), ref

  with ops.impl('cpu'):
    (y, dx), (y_ref, dx_ref) = _jit(both)(x)
  np.testing.assert_array_equal(y, y_ref)
  assert dx.dtype == x.dtype
  assert _rel_err(dx, dx_ref) <= tol


@pytest.mark.parametrize('shape,window,strides,padding', POOL_CASES)
def test_max_pool_matches_lax(shape, window, strides, padding):
  # Tie-free random inputs: the same windows get the same gradients (up to summation order where
  # windows overlap).
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
  _check_pool(x, window, strides, padding, 1e-6)


@pytest.mark.parametrize('shape,window,strides,padding', POOL_CASES[:4])
def test_max_pool_ties_go_to_the_first_max_like_lax(shape, window, strides, padding):
  # Integer-valued inputs in a small range: most windows hold tied maxima. lax's select-and-scatter
  # gives the gradient to the first maximum in row-major window order, and so do we.
  x = jnp.asarray(np.random.default_rng(2).integers(0, 3, shape).astype(np.float32))
  _check_pool(x, window, strides, padding, 1e-6)
  x = jnp.zeros(shape, jnp.float32)  # Every element tied.
  _check_pool(x, window, strides, padding, 1e-6)


def test_max_pool_bfloat16():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 13, 13, 4)), jnp.bfloat16)
  _check_pool(x, (3, 3), (2, 2), 'VALID', BF16_TOL)


def test_max_pool_backward_has_no_select_and_scatter():
  x = jnp.ones((1, 9, 9, 2))
  with ops.impl('cpu'):
    text = jax.jit(jax.grad(lambda a: ops.max_pool(a, (3, 3), (2, 2)).sum())).lower(x).as_text()
  assert 'select_and_scatter' not in text
  with ops.impl('xla'):
    text = jax.jit(jax.grad(lambda a: ops.max_pool(a, (3, 3), (2, 2)).sum())).lower(x).as_text()
  assert 'select_and_scatter' in text


def _fake_device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_peak_flops_table(monkeypatch):
  monkeypatch.delenv(perf.ENV_PEAK, raising=False)
  h100 = _fake_device('gpu', 'NVIDIA H100 80GB HBM3')
  assert perf.peak_flops(h100, jnp.bfloat16) == pytest.approx(989.4e12)
  assert perf.peak_flops(h100, jnp.float32) == pytest.approx(494.7e12)
  assert perf.peak_flops(_fake_device('gpu', 'NVIDIA H100 PCIe'), jnp.bfloat16) == 756e12
  assert perf.peak_flops(_fake_device('gpu', 'NVIDIA H200'), jnp.bfloat16) == pytest.approx(989.4e12)
  assert perf.peak_flops(_fake_device('gpu', 'NVIDIA A100-SXM4-80GB'), jnp.bfloat16) == 312e12
  assert perf.peak_flops(_fake_device('tpu', 'TPU v5 lite'), jnp.bfloat16) == 197e12
  assert perf.peak_flops(_fake_device('tpu', 'TPU v5p'), jnp.bfloat16) == 459e12
  assert perf.peak_flops(_fake_device('tpu', 'TPU v4'), jnp.float32) == 275e12
  assert perf.peak_flops(_fake_device('gpu', 'Some Future GPU'), jnp.float32) is None
  monkeypatch.setenv(perf.ENV_PEAK, '1e12')
  assert perf.peak_flops(h100, jnp.bfloat16) == 1e12


def test_cpu_flops_per_cycle():
  zen4 = {'vendor_id': 'AuthenticAMD', 'cpu family': '25',
          'flags': 'fma avx avx2 avx512f avx512_bf16'}
  assert perf.cpu_flops_per_cycle(zen4) == 32  # Two 256-bit FMA pipes; AVX-512 double-pumped.
  assert perf.cpu_flops_per_cycle(zen4, jnp.bfloat16) == 64
  intel = {'vendor_id': 'GenuineIntel', 'cpu family': '6', 'flags': 'fma avx avx2 avx512f'}
  assert perf.cpu_flops_per_cycle(intel) == 64
  assert perf.cpu_flops_per_cycle({'flags': 'avx avx2 fma'}) == 32
  assert perf.cpu_flops_per_cycle({'flags': 'sse2'}) == 8


def test_cpu_peak_and_mfu(monkeypatch):
  monkeypatch.delenv(perf.ENV_PEAK, raising=False)
  cpu = jax.devices('cpu')[0]
  peak = perf.peak_flops(cpu)
  if peak is not None:  # /proc/cpuinfo may be missing (non-Linux).
    assert 1e9 < peak < 1e14
  monkeypatch.setenv(perf.ENV_PEAK, '2e11')
  assert perf.mfu(1e11, 1.0, [cpu]) == pytest.approx(0.5)
  assert perf.mfu(1e11, 0.5, [cpu, cpu]) == pytest.approx(0.5)
  monkeypatch.delenv(perf.ENV_PEAK)
  assert perf.mfu(1e11, 1.0, [_fake_device('gpu', 'Unknown')]) is None


def test_compiled_flops_counts_a_matmul():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  flops = perf.compiled_flops(jax.jit(jnp.matmul), a, b)
  assert flops == pytest.approx(2 * 64 * 32 * 16, rel=0.05)
