"""Peak FLOP/s per device kind, model FLOP utilisation (MFU), and FLOPs from XLA cost analysis.

Peaks are dense (no sparsity) vendor figures per chip:

  ===============================  ============  ==============================================
  device (``device_kind`` match)   bf16 TFLOP/s  float32 TFLOP/s
  ===============================  ============  ==============================================
  NVIDIA H100 / H200 (SXM)         989.4         494.7 (TF32 tensor cores; see below)
  NVIDIA H100 PCIe                 756.0         378.0
  NVIDIA A100                      312.0         156.0
  TPU v4                           275.0         275.0 (fp32 matmuls run as bf16 passes)
  TPU v5 lite (v5e)                197.0         197.0
  TPU v5 / v5p                     459.0         459.0
  TPU v6 lite (v6e)                918.0         918.0
  ===============================  ============  ==============================================

float32 on NVIDIA uses the TF32 tensor-core peak because XLA's default matmul/conv precision runs
float32 there on TF32 tensor cores (``jax_default_matmul_precision='highest'`` would make the
CUDA-core peak, ~67 TFLOP/s on H100, the relevant one). On TPU the default precision likewise
multiplies float32 in bf16 passes.

CPU peak = cores x clock x FLOPs/cycle/core, read from this machine:
  * cores: ``len(os.sched_getaffinity(0))`` (the cores JAX may use; vCPUs on a VM);
  * clock: the ``cpu MHz`` of /proc/cpuinfo (on this VM the base/TSC clock; boost is not counted);
  * FLOPs/cycle (float32): 2 FMA pipes x SIMD lanes x 2. AMD Zen3/Zen4 (family 0x19) have two
    256-bit FMA pipes -> 32 (Zen4's AVX-512 is double-pumped); Zen5 (family 0x1a) and Intel cores
    with AVX-512 -> 64; other AVX2+FMA cores -> 32; AVX -> 16; else 8.
  * bfloat16: x2 where the CPU has ``avx512_bf16`` or ``amx_bf16`` dot-product instructions, else
    the float32 figure (bf16 is then converted and computed in float32).
Override with ``$CNN_JAX_PEAK_FLOPS`` (FLOP/s per device, any dtype), e.g. for a machine whose
clock differs from /proc/cpuinfo. For the 2-core AMD EPYC (Zen4, 2.6 GHz) this repo is developed
on: 2 x 2.596e9 x 32 = 166 GFLOP/s float32.
"""

import functools
import os
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

ENV_PEAK = 'CNN_JAX_PEAK_FLOPS'

# (substring of device_kind, lower-cased; bf16 FLOP/s, float32 FLOP/s). First match wins.
_ACCELERATOR_PEAKS = (
    ('h100 pcie', 756.0e12, 378.0e12),
    ('h100', 989.4e12, 494.7e12),
    ('h200', 989.4e12, 494.7e12),
    ('gh200', 989.4e12, 494.7e12),
    ('a100', 312.0e12, 156.0e12),
    ('tpu v4', 275.0e12, 275.0e12),
    ('tpu v5 lite', 197.0e12, 197.0e12),
    ('tpu v5e', 197.0e12, 197.0e12),
    ('tpu v5p', 459.0e12, 459.0e12),
    ('tpu v5', 459.0e12, 459.0e12),
    ('tpu v6 lite', 918.0e12, 918.0e12),
    ('tpu v6e', 918.0e12, 918.0e12),
)


def _cpuinfo() -> Dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  info = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(':')
        info[key.strip()] = value.strip()
  except OSError:
    pass
  return info


def cpu_flops_per_cycle(info: Dict[str, str], dtype: Any = jnp.float32) -> int:
  """FLOPs per cycle per core for ``dtype`` from /proc/cpuinfo fields (module docstring)."""
  flags = set(info.get('flags', '').split())
  family = int(info.get('cpu family', '0') or 0)
  amd = info.get('vendor_id') == 'AuthenticAMD'
  if amd and family >= 0x1a and 'avx512f' in flags:
    per_cycle = 64
  elif amd and 'avx2' in flags and 'fma' in flags:
    per_cycle = 32
  elif 'avx512f' in flags:
    per_cycle = 64
  elif 'avx2' in flags and 'fma' in flags:
    per_cycle = 32
  elif 'avx' in flags:
    per_cycle = 16
  else:
    per_cycle = 8
  if jnp.dtype(dtype) == jnp.bfloat16 and flags & {'avx512_bf16', 'amx_bf16'}:
    per_cycle *= 2
  return per_cycle


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(dtype_name: str = 'float32') -> Optional[float]:
  """Peak FLOP/s of the CPU cores this process may use (module docstring), None if unknown."""
  info = _cpuinfo()
  try:
    mhz = float(info['cpu MHz'])
  except (KeyError, ValueError):
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return cores * mhz * 1e6 * cpu_flops_per_cycle(info, jnp.dtype(dtype_name))


def peak_flops(device: jax.Device, dtype: Any = jnp.float32) -> Optional[float]:
  """Dense peak FLOP/s of one ``device`` for ``dtype`` (bf16 or float32), None if unknown.

  For a CPU device this is the whole host's peak (JAX exposes the host's cores as one device).
  ``$CNN_JAX_PEAK_FLOPS`` overrides every device's figure.
  """
  if os.environ.get(ENV_PEAK):
    return float(os.environ[ENV_PEAK])
  is_bf16 = jnp.dtype(dtype) == jnp.bfloat16
  if device.platform == 'cpu':
    return cpu_peak_flops('bfloat16' if is_bf16 else 'float32')
  kind = device.device_kind.lower()
  for key, bf16, fp32 in _ACCELERATOR_PEAKS:
    if key in kind:
      return bf16 if is_bf16 else fp32
  return None


def mfu(flops_per_step: float, step_seconds: float, devices: Sequence[jax.Device],
        dtype: Any = jnp.float32) -> Optional[float]:
  """Model FLOP utilisation in [0, 1]: achieved FLOP/s over the summed peak of ``devices``.

  Args:
    flops_per_step: FLOPs of one step over all devices (e.g. ``compiled_flops`` of the step).
    step_seconds: wall seconds per step.
    devices: the devices the step runs on.
    dtype: compute dtype (selects the bf16 or float32 peak).
  Returns None when a device's peak is unknown.
  """
  peaks = [peak_flops(d, dtype) for d in devices]
  if not peaks or any(p is None for p in peaks) or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / sum(peaks)


def _flops(analysis) -> float:
  """Sum of 'flops' over a cost analysis (dict, list of dicts or None); negatives count as 0."""
  if analysis is None:
    return 0.0
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(max(0.0, float(a.get('flops', 0.0))) for a in analysis if a))


def host_cpu_flops(jitted_fn: Callable[..., Any], *args, compile: bool = True, **kwargs) -> float:  # pylint: disable=redefined-builtin
  """FLOPs of ``jitted_fn(*args, **kwargs)`` counted by XLA's cost analysis of a host-CPU compilation.

  Only the arguments' shapes and dtypes are used (unsharded), so the count is that of the whole global
  computation, whatever the devices the real call runs on. Nothing runs. ``compile=False`` counts the
  lowered (unoptimised) module instead, without XLA's compile: the same count where XLA's optimisation
  removes or fuses no arithmetic (an inference forward), within ~2% for a train step.
  """
  specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (args, kwargs))
  with jax.default_device(jax.devices('cpu')[0]):
    lowered = jitted_fn.lower(*specs[0], **specs[1])
    return _flops(lowered.compile().cost_analysis() if compile else lowered.cost_analysis())


def compiled_flops(jitted_fn: Callable[..., Any], *args, **kwargs) -> float:
  """FLOPs of one call of ``jitted_fn(*args, **kwargs)`` from XLA's cost analysis.

  Lowers and compiles (without running, so donated arguments stay valid). Off the CPU it also
  compiles the same function for the host CPU from the arguments' shapes and returns the larger
  count: GPU cost analysis (jax 0.11.2, H100) counts convolutions (cuDNN custom calls) as no FLOPs
  (AlexNet at batch 256: 10.6 instead of 1,557 GFLOP per step). Handles ``cost_analysis()``
  returning a dict (current jax) or a list of per-module dicts (older jax); 0.0 when nothing
  reports FLOPs.
  """
  lowered = jitted_fn.lower(*args, **kwargs)
  counts = [_flops(lowered.compile().cost_analysis())]
  if jax.default_backend() != 'cpu':
    try:
      counts.append(host_cpu_flops(jitted_fn, *args, **kwargs))
    except Exception:  # pylint: disable=broad-except
      pass  # No CPU backend: keep the accelerator's count.
  return max(counts)


def step_flops(compiled, num_devices: int, jitted_fn: Callable[..., Any] = None, *args) -> float:
  """FLOPs of one whole (all-device) step, given the step's ``Compiled`` executable.

  A compiled SPMD module's cost analysis counts one device's share, so it is scaled by
  ``num_devices`` (no extra compilation on the CPU). On accelerators, where cuDNN/cuBLAS custom calls
  count as 0, ``jitted_fn(*args)`` is also counted on the host CPU (``host_cpu_flops``), and the larger
  count is returned.
  """
  count = _flops(compiled.cost_analysis()) * num_devices
  if jax.default_backend() != 'cpu' and jitted_fn is not None:
    try:
      count = max(count, host_cpu_flops(jitted_fn, *args))
    except Exception:  # pylint: disable=broad-except
      pass
  return count
