"""Which lowering ``cnn_jax.ops`` uses: a backend's own ('cpu', 'gpu', 'tpu'), or plain XLA everywhere.

  cpu  the CPU-tuned convolutions and the mask-based max-pool backward (``conv_cpu``, ``pool_cpu``)
  gpu  XLA's convolutions (cuDNN) and the mask-based max-pool backward: XLA:GPU lowers the max-pool
       gradient (select-and-scatter) to a scatter that materialises int32 window indices and a copy of the
       pool's input; without it a train step needs about half the temporaries (VGG-11 bf16 at batch 256 on
       an H100: 11.23 -> 5.59 GiB, cnn_jax.compile_check; docs/results/compile/fixes)
  tpu  plain XLA
  xla  plain ``lax`` everywhere (comparisons, tests)
'auto' (the default) is the lowering of ``jax.default_backend()``. The choice is read at trace time, so it
must be made before a function is jitted (a jitted function keeps the lowering it was traced with).
"""

import contextlib
import functools
import os
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp

from cnn_jax.errors import UserError

IMPLS = ('auto', 'xla', 'cpu', 'gpu', 'tpu')
ENV_VAR = 'CNN_JAX_CONV_IMPL'

_impl: Optional[str] = None  # None: read ENV_VAR (default 'auto').


def _check(name: str) -> str:
  if name not in IMPLS:
    raise UserError(f'Unknown cnn_jax.ops impl {name!r} (from set_impl or ${ENV_VAR}); '
                    f'choose one of: {", ".join(IMPLS)}.')
  return name


def set_impl(name: Optional[str]) -> None:
  """Selects the lowering of ``conv2d`` / ``max_pool`` for functions traced from now on.

  Args:
    name: 'auto' (the lowering of ``jax.default_backend()``), 'cpu' / 'gpu' / 'tpu' (that backend's lowering on
      any backend: tests, and programs compiled for an absent accelerator), 'xla' (plain ``lax`` everywhere),
      or None to go back to ``$CNN_JAX_CONV_IMPL`` (default 'auto').
  """
  global _impl
  _impl = None if name is None else _check(name)


def get_impl() -> str:
  """The selected impl name: one of IMPLS."""
  return _impl if _impl is not None else _check(os.environ.get(ENV_VAR, 'auto') or 'auto')


def resolved_impl() -> str:
  """The lowering a function traced now gets: 'auto' resolved to the default backend's ('cpu', 'gpu', 'tpu';
  another backend gets plain 'xla')."""
  impl = get_impl()
  if impl != 'auto':
    return impl
  backend = jax.default_backend()
  return backend if backend in ('cpu', 'gpu', 'tpu') else 'xla'


def use_cpu_kernels() -> bool:
  """Whether a function traced now should use the CPU-tuned convolutions."""
  return resolved_impl() == 'cpu'


def use_mask_pool_backward() -> bool:
  """Whether a function traced now should take the max-pool gradient without select-and-scatter."""
  return resolved_impl() in ('cpu', 'gpu')


@contextlib.contextmanager
def impl(name: str) -> Iterator[None]:
  """Context manager: ``with ops.impl('xla'): f = jax.jit(g); f(x)`` traces ``g`` with 'xla'."""
  global _impl
  previous = _impl
  set_impl(name)
  try:
    yield
  finally:
    _impl = previous


# XLA:CPU debug option that routes convolutions and dots away from YNNPACK fusions to XLA's
# Eigen/oneDNN thunks. Measured here (2-core Zen4, jax 0.10.2): whole AlexNet/NiN train steps
# 1.5-2.5x faster; per layer, YNN's kernel gradient ran at 20-90 GFLOP/s against ~100-200 with
# the option. It must be given per jit (``jax.jit(..., compiler_options=...)``): XLA reads
# $XLA_FLAGS once, when jax is imported, before cnn_jax could set it.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
  # Another jaxlib may not know the option (a compile error); try once on a tiny function.
  try:
    jax.jit(lambda v: v + 1, compiler_options=_CPU_OPTIONS).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def compiler_options() -> Dict[str, Any]:
  """XLA compiler options for ``jax.jit`` of train/eval steps that call these ops.

  ``jax.jit(step, compiler_options=ops.compiler_options())``. On the CPU backend (unless the impl
  is 'xla') this turns off XLA's YNNPACK fusions, whose convolutions are the slow part of a CNN
  train step here; the CPU kernels' per-shape ``plan`` assumes it. Elsewhere, or where this
  jaxlib lacks the option, it returns {} (nothing changes).
  """
  if jax.default_backend() != 'cpu' or not use_cpu_kernels() or not _cpu_options_supported():
    return {}
  return dict(_CPU_OPTIONS)
