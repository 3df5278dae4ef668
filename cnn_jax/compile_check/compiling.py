"""Compiling one program for a compile-only device and reading what XLA says of it (memory per device)."""

import contextlib
import dataclasses
import math
import time
from typing import Any, Optional, Tuple

GIB = 2**30

@dataclasses.dataclass
class Memory:
  """Per-device bytes of one compiled program (XLA's memory_analysis) and what the run adds to them."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int
  peak: int
  resident: int          # allocated meanwhile, not an argument (device input: the other splits)
  unused_arguments: int  # arguments XLA dropped as unused (eval: the optimiser state): the caller still holds them
  unpadded_arguments: int  # the kept arguments' shard bytes without layout padding

  @property
  def need(self) -> int:
    return (max(self.peak, self.arguments + self.outputs + self.temporaries - self.aliased + self.code)
            + self.resident + self.unused_arguments)

  @classmethod
  def of(cls, compiled, args, resident: int) -> "Memory":
    m = compiled.memory_analysis()
    kept, unused = _argument_bytes(compiled, args)
    return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
               int(m.alias_size_in_bytes), int(m.generated_code_size_in_bytes),
               int(getattr(m, "peak_memory_in_bytes", 0) or 0), int(resident), unused, kept)


@dataclasses.dataclass
class Compile:
  """One compile of a program at one global batch: its memory (None when XLA refused it for memory)."""
  batch: int
  memory: Optional[Memory]
  lower_s: float
  compile_s: float
  refused: str = ""      # XLA's first line when it refused the program (out of memory)
  compiled: Any = None   # the executable (kept for the report's own program only)

  def need(self) -> float:
    return math.inf if self.memory is None else self.memory.need


@contextlib.contextmanager
def _tracing_for_accelerators(lowering: str):
  """The target's lowering of cnn_jax.ops (the host is a CPU, 'auto' would pick its CPU kernels) and nothing taken
  from or put into a persistent compilation cache: a hit would skip the compile being measured, and a
  compile-only executable read back has no device client to load into. JAX decides once per process whether
  it uses the cache, so in a process that already does (a test session) entries are kept out by a minimum
  compile time no compile reaches: with none written, none is found."""
  import jax  # pylint: disable=g-import-not-at-top
  from cnn_jax import ops  # pylint: disable=g-import-not-at-top
  saved = {name: getattr(jax.config, name) for name in
           ("jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e12)
  try:
    with ops.impl(lowering):
      yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


def _kept_arguments(compiled, count: int) -> set:
  """Indices of the flat arguments the executable takes: jit drops unused ones (keep_unused=False). Read from
  JAX's executable (no public API says it); all of them where that is not available."""
  try:
    kept = compiled._executable._kept_var_idx  # pylint: disable=protected-access
    n_const = len(getattr(compiled._params, "const_args", ()) or ())  # pylint: disable=protected-access
    return {i - n_const for i in kept if i >= n_const}
  except AttributeError:
    return set(range(count))


def _argument_bytes(compiled, args) -> Tuple[int, int]:
  """(bytes per device of the arguments the program keeps, of those it dropped), without layout padding."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(args)
  kept = _kept_arguments(compiled, len(leaves))
  sizes = [0, 0]
  for i, leaf in enumerate(leaves):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    sizes[i not in kept] += math.prod(shape) * leaf.dtype.itemsize
  return int(sizes[0]), int(sizes[1])


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()


def compile_program(program, keep: bool = False) -> Compile:
  """Lowers and compiles one Program (programs.Program); a compile XLA refuses for memory -> memory None."""
  t0 = time.perf_counter()
  with _tracing_for_accelerators(program.lowering):
    lowered = program.fn.lower(*program.args)
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if not _is_out_of_memory(e):
        raise
      first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
      return Compile(program.batch, None, t1 - t0, time.perf_counter() - t1, refused=first[:300])
  t2 = time.perf_counter()
  memory = Memory.of(compiled, program.args, program.resident_bytes)
  return Compile(program.batch, memory, t1 - t0, t2 - t1, compiled=compiled if keep else None)


def network_flops(program) -> Tuple[Optional[float], str]:
  """FLOPs of one step of the program's network (Program.network), from XLA's cost analysis of its lowered
  module on the host CPU, as cnn_jax.perf.host_cpu_flops (compile=False) counts them."""
  if program.network is None:
    return None, "none"
  from cnn_jax import perf  # pylint: disable=g-import-not-at-top
  fn, args = program.network
  with _tracing_for_accelerators(program.lowering):
    return perf.host_cpu_flops(fn, *args, compile=False), "network on the host CPU"
