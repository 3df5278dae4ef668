r"""Compile a run's programs for an accelerator that is not here, and say whether they fit.

  python -m cnn_jax.compile_check --config=configs/vgg.py --target=h200
  python -m cnn_jax.compile_check --config=configs/alexnet.py --target=tpu-v5e:4x4 --json_out=alexnet.json

For the train and eval programs of a config (built by a program builder, `programs.build` by default: what
train.py compiles) this lowers and compiles each for the target's compile-only devices (cnn_jax.targets) and
reads the executable: XLA's memory analysis per device (arguments, outputs, temporaries, aliased; the whole
need against the device's memory), FLOPs per step (the network's, counted on the host CPU as train.py counts
them), the compile time, and from the optimised HLO the kernels of a GPU program (cuDNN convolutions vs other
lowerings, layout transposes/copies) or the collectives of a TPU program. With a batch search it also finds
the largest global batch of each searched program that fits (compiles at other batches, bracketed, each
probe placed where memory grows linearly between the last two). Nothing runs on any device; no data is read.

Memory "need" per device = max(XLA's peak estimate, arguments + outputs + temporaries - aliased + code) +
what else the run keeps resident meanwhile (device input: the other splits). It fits when need <= the
budget: the device's memory times --memory_fraction (default: 0.75 on GPUs, the share JAX's allocator takes
by default, XLA_PYTHON_CLIENT_MEM_FRACTION; 1.0 on TPUs, where XLA:TPU itself refuses a program that does not
fit HBM). A compile that XLA refuses for memory (RESOURCE_EXHAUSTED) is a program that does not fit.
GPU caveat: XLA compiles without autotuning here (cuDNN algo_id -1, no workspace), so a real GPU's temporaries
are somewhat larger.

Python API (for tests and other tools):

  report = check(config, "h200", search=("train",))   # a Report; report.programs["train"].memory ...
  print(format_table(report)); json.dumps(report.to_json())
"""

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cnn_jax import targets as targets_lib
from cnn_jax.errors import UserError

GIB = 2**30
DEFAULT_MAX_COMPILES = 8


def set_platforms() -> None:
  """JAX's own backends limited to the host CPU (before jax starts): with the CUDA plugin and libtpu
  installed and no accelerator, JAX would otherwise try both and print tracebacks and warnings."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


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


@dataclasses.dataclass
class Search:
  """The largest global batch that fits: `largest` fits, `largest + step` does not (or is over `limit`)."""
  largest: Optional[int]     # None: not even `step` fits
  step: int
  limit: Optional[int]       # the program's own bound on the batch (device input: the train split)
  limited: bool              # largest is the limit (or the search bound), not where memory runs out
  capped: bool               # the compile budget ran out first: largest fits, the true answer is below `upper`
  upper: Optional[int]       # the smallest batch found not to fit
  probes: List[Tuple[int, Optional[int]]]  # (batch, need or None if refused), in compile order


@dataclasses.dataclass
class ProgramReport:
  name: str
  batch: int
  devices: int
  memory: Optional[Memory]
  fits: bool
  lower_s: float
  compile_s: float
  flops: Optional[float]
  flops_source: str
  refused: str = ""
  search: Optional[Search] = None
  gpu: Any = None          # hlo.GpuKernels
  collectives: Any = None  # hlo.Collectives
  describe: str = ""
  compiled: Any = None     # the executable, with check(keep_executables=True)


@dataclasses.dataclass
class Report:
  target: targets_lib.Target
  model: str
  image_size: int
  dtype: str
  dataset: str
  devices: int
  processes: int
  budget: int
  memory_fraction: float
  programs: Dict[str, ProgramReport]

  @property
  def fits(self) -> bool:
    return all(p.fits for p in self.programs.values())

  def to_json(self) -> Dict[str, Any]:
    def mem(m: Optional[Memory]):
      return None if m is None else {**dataclasses.asdict(m), "need": m.need}
    out = {"target": self.target.name, "target_kind": self.target.kind, "platform": self.target.platform,
           "devices": self.devices, "processes": self.processes, "device_memory_bytes": self.target.memory_bytes,
           "memory_fraction": self.memory_fraction, "budget_bytes": self.budget, "model": self.model,
           "image_size": self.image_size, "dtype": self.dtype, "dataset": self.dataset, "fits": self.fits,
           "programs": {}}
    for name, p in self.programs.items():
      entry = {"global_batch": p.batch, "per_device_batch": p.batch // p.devices, "memory": mem(p.memory),
               "share_of_device_memory": (p.memory.need / self.target.memory_bytes) if p.memory else None,
               "fits": p.fits, "refused": p.refused or None, "lower_s": p.lower_s, "compile_s": p.compile_s,
               "flops_per_step": p.flops, "flops_source": p.flops_source, "input": p.describe}
      if p.search is not None:
        entry["largest_fitting_batch"] = dataclasses.asdict(p.search)
      if p.gpu is not None:
        entry["gpu_kernels"] = dataclasses.asdict(p.gpu)
      if p.collectives is not None:
        entry["collectives"] = {k: {"count": n, "bytes": b} for k, (n, b) in p.collectives.by_kind.items()}
      out["programs"][name] = entry
    return out


# --- Compiling --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _tracing_for_accelerators():
  """Plain-XLA kernels of cnn_jax.ops (the host is a CPU, 'auto' would pick its CPU kernels) and nothing taken
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
    with ops.impl("xla"):
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
  with _tracing_for_accelerators():
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
  with _tracing_for_accelerators():
    return perf.host_cpu_flops(fn, *args, compile=False), "network on the host CPU"


def _round_down(value: float, step: int) -> int:
  return int(value // step) * step


def search_batch(build_at: Callable[[int], Any], first: Compile, budget: int, step: int,
                 limit: Optional[int], max_compiles: int = DEFAULT_MAX_COMPILES,
                 log: Callable[[str], None] = lambda line: None) -> Search:
  """The largest multiple of `step` (<= `limit`) whose program fits `budget`, from compiles.

  build_at(batch) -> Program; `first` is the compile at the configured batch. Memory grows about linearly
  with the batch, so each probe goes where the line through the two nearest known points crosses the budget
  (clamped inside the bracket [largest fitting, smallest not fitting], halving it when the line does not help);
  it stops when the bracket is one step wide, at `limit`, or after `max_compiles` compiles.
  """
  known: Dict[int, float] = {first.batch: first.need()}
  probes: List[Tuple[int, Optional[int]]] = []
  lo = first.batch if first.need() <= budget else None
  hi = None if lo is not None else first.batch
  if lo is not None and lo % step:
    lo = None  # the configured batch is not a multiple of the step: start from the step's own multiples
    hi = None
  bound = limit if limit is not None else step * 2**24
  bound = _round_down(bound, step)
  compiles = 0

  def probe(batch: int) -> bool:
    nonlocal compiles
    compiles += 1
    result = compile_program(build_at(batch))
    known[batch] = result.need()
    probes.append((batch, None if result.memory is None else int(result.need())))
    log(f"  batch {batch:,}: " + ("refused by XLA (out of memory)" if result.memory is None else
                                  f"{result.need() / GIB:.2f} GiB per device, "
                                  f"{'fits' if result.need() <= budget else 'does not fit'}") +
        f" (compile {result.compile_s:.1f}s)")
    return result.need() <= budget

  def crossing(points: Sequence[Tuple[int, float]]) -> Optional[float]:
    finite = [(b, n) for b, n in points if math.isfinite(n)]
    if len(finite) < 2:
      return None
    (b0, n0), (b1, n1) = finite[-2], finite[-1]
    if b1 == b0 or n1 <= n0:
      return None
    return b0 + (budget - n0) * (b1 - b0) / (n1 - n0)

  # 1. A bracket: a fitting batch below a failing one (or the bound).
  if lo is None and hi is None:
    start = max(step, _round_down(first.batch, step))
    if probe(start):
      lo = start
    else:
      hi = start
  while lo is None and compiles < max_compiles:
    if hi <= step:
      return Search(None, step, limit, False, False, hi, probes)
    guess = crossing(sorted(known.items()))
    if guess is None:
      n = known[hi]
      guess = hi * budget / n if math.isfinite(n) else hi / 2
    batch = max(step, min(_round_down(guess, step), hi - step))
    if probe(batch):
      lo = batch
    else:
      hi = batch
  while hi is None and compiles < max_compiles:
    if lo >= bound:
      return Search(lo, step, limit, True, False, None, probes)
    points = sorted((b, n) for b, n in known.items() if b <= lo)
    guess = crossing(points)
    if guess is None:
      guess = lo * budget / max(known[lo], 1)
    # Aim just past the line's crossing, so one probe usually brackets the answer.
    batch = min(bound, max(lo + step, _round_down(guess, step) + step))
    if probe(batch):
      lo = batch
    else:
      hi = batch
  if lo is None or hi is None:
    return Search(lo, step, limit, lo is not None and lo >= bound, True, hi, probes)
  # 2. Narrow the bracket to one step.
  slow = 0
  while hi - lo > step and compiles < max_compiles:
    width = hi - lo
    guess = crossing([(lo, known[lo]), (hi, known[hi])]) if slow < 2 else None
    batch = _round_down(guess, step) if guess is not None else _round_down((lo + hi) / 2, step)
    batch = min(max(batch, lo + step), hi - step)
    if probe(batch):
      lo = batch
    else:
      hi = batch
    slow = slow + 1 if (hi - lo) > width / 2 else 0
  return Search(lo, step, limit, False, hi - lo > step, hi, probes)


# --- The check -------------------------------------------------------------------------------------

def check(config, target, *, search: Sequence[str] = ("train",), batch_step: Optional[int] = None,
          memory_fraction: Optional[float] = None, max_compiles: int = DEFAULT_MAX_COMPILES,
          builder: Optional[Callable[..., Dict[str, Any]]] = None, programs: Sequence[str] = ("train", "eval"),
          keep_executables: bool = False, log: Callable[[str], None] = lambda line: None) -> Report:
  """Compiles config's train and eval programs for `target` (a name or targets.Target) and returns a Report.

  search: the programs whose largest fitting global batch is searched (each probe is a compile);
  batch_step: the search's granularity (default 8 per device); memory_fraction: the share of the device's
  memory a program may use (default 0.75 on GPUs, 1.0 on TPUs); builder: the program builder hook
  (programs.build's signature; default programs.build); programs: which of the builder's programs to compile;
  keep_executables: keep each program's Compiled executable in ProgramReport.compiled (for tests).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from cnn_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from cnn_jax.compile_check import hlo  # pylint: disable=g-import-not-at-top
  from cnn_jax.compile_check import programs as programs_lib  # pylint: disable=g-import-not-at-top

  target = targets_lib.get(target) if isinstance(target, str) else target
  targets_lib.check_requirements(target)
  unknown = sorted(set(search) - {"train", "eval"})
  if unknown:
    raise UserError(f"--search: unknown program(s) {unknown}; choose from train, eval (or none)")
  fraction = memory_fraction if memory_fraction is not None else (0.75 if target.is_gpu else 1.0)
  if not 0 < fraction <= 1:
    raise UserError(f"--memory_fraction={fraction} must be in (0, 1]")
  budget = int(fraction * target.memory_bytes)
  builder = builder or programs_lib.build
  devices = targets_lib.devices(target)
  mesh = Mesh(np.asarray(devices).reshape(-1), (shd.DATA_AXIS,))
  n_dev = len(devices)
  n_proc = len({d.process_index for d in devices})
  step = int(batch_step or 8 * n_dev)
  if step <= 0 or step % n_dev or step % n_proc:
    raise UserError(f"--batch_step={step} must be a positive multiple of the {n_dev} devices")

  def build_all(name=None, global_batch=None):
    cfg = config
    if name is not None:  # the batch search: the same config with one program's global batch changed
      cfg = config.copy_and_resolve_references()
      with cfg.unlocked():
        cfg["batch_size" if name == "train" else "eval_batch_size"] = int(global_batch)
    return builder(cfg, mesh, device_memory_bytes=target.memory_bytes)

  log(f"building the programs of {config.model} for {target.name} ({target.kind})")
  built = build_all()
  reports = {}
  for name in programs:
    program = built[name]
    log(f"compiling {name} (global batch {program.batch:,})")
    result = compile_program(program, keep=True)
    log(f"  {name}: lowered in {result.lower_s:.1f}s, compiled in {result.compile_s:.1f}s")
    flops, flops_source = network_flops(program)
    report = ProgramReport(name, program.batch, n_dev, result.memory, result.need() <= budget, result.lower_s,
                           result.compile_s, flops, flops_source, result.refused, describe=program.describe)
    if result.compiled is not None:
      text = result.compiled.as_text()
      report.collectives = hlo.collectives(text)
      if target.is_gpu:
        report.gpu = hlo.gpu_kernels(text)
      elif flops is None:  # TPU counts convolutions itself; a module's analysis is one device's share
        analysis = result.compiled.cost_analysis() or {}
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        if analysis.get("flops", 0) > 0:
          report.flops, report.flops_source = float(analysis["flops"]) * n_dev, "XLA:TPU cost analysis"
    if keep_executables:
      report.compiled = result.compiled
    result.compiled = None
    if name in search:
      log(f"searching the largest {name} batch that fits {budget / GIB:.2f} GiB per device (step {step})")
      limit = program.max_batch
      report.search = search_batch(lambda b, name=name: build_all(name, b)[name], result, budget, step,
                                   _round_down(limit, step) if limit else None, max_compiles, log)
    reports[name] = report
  return Report(target, str(config.model), int(config.image_size), str(config.get("dtype", "float32")),
                str(config.dataset), n_dev, n_proc, budget, fraction, reports)


# --- The table ------------------------------------------------------------------------------------

def _gib(n: Optional[float]) -> str:
  if n is None:
    return "-"
  if n >= 0.01 * GIB:
    return f"{n / GIB:.2f} GiB"
  return f"{n / 2**20:.1f} MiB" if n >= 0.1 * 2**20 or n == 0 else f"{n / 2**10:.1f} KiB"


_CUDNN = {"__cudnn$convForward": "fwd", "__cudnn$convBiasActivationForward": "fwd+bias+act",
          "__cudnn$convBackwardInput": "bwd-input", "__cudnn$convBackwardFilter": "bwd-filter"}


def _gflops(flops: Optional[float]) -> str:
  if not flops:
    return "-"
  return f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.4g}"


def _search_text(s: Optional[Search]) -> str:
  if s is None:
    return "(not searched)"
  n = len(s.probes)
  probes = f"{n} more compile{'s' if n != 1 else ''}"
  if s.largest is None:
    return f"none: {s.step:,} does not fit ({probes})"
  if s.limited:
    why = "the split's size" if s.limit is not None else "the search's bound"
    return f">= {s.largest:,} ({why}; {probes})"
  if s.capped:
    return f"{s.largest:,} <= x < {s.upper:,} ({probes}, the budget's end)"
  return f"{s.largest:,} ({probes}, step {s.step:,})"


def format_table(report: Report) -> str:
  """The report as one table: a row per quantity, a column per program."""
  t = report.target
  names = list(report.programs)
  progs = [report.programs[n] for n in names]
  rows: List[Tuple[str, List[str]]] = []
  add = lambda label, values: rows.append((label, [str(v) for v in values]))
  add("global batch (per device)", [f"{p.batch:,} ({p.batch // p.devices:,})" for p in progs])
  for field, label in (("arguments", "arguments"), ("outputs", "outputs"), ("temporaries", "temporaries"),
                       ("aliased", "aliased (donated)")):
    add(label, [_gib(getattr(p.memory, field)) if p.memory else "-" for p in progs])
  if any(p.memory and p.memory.code for p in progs):
    add("generated code", [_gib(p.memory.code) if p.memory else "-" for p in progs])
  if any(p.memory and p.memory.resident for p in progs):
    add("other resident splits", [_gib(p.memory.resident) if p.memory else "-" for p in progs])
  if any(p.memory and p.memory.unused_arguments for p in progs):
    add("arguments it does not read", [_gib(p.memory.unused_arguments) if p.memory else "-" for p in progs])
  add("need per device", [_gib(p.memory.need) if p.memory else "refused by XLA" for p in progs])
  add(f"share of {t.memory_bytes / GIB:.1f} GiB",
      [f"{100 * p.memory.need / t.memory_bytes:.1f}%" if p.memory else "> 100%" for p in progs])
  add(f"fits in {report.budget / GIB:.1f} GiB ({report.memory_fraction:.0%})",
      ["yes" if p.fits else "NO" for p in progs])
  add("largest global batch that fits", [_search_text(p.search) for p in progs])
  add("GFLOPs per step (network)", [_gflops(p.flops) for p in progs])
  add("lower + compile", [f"{p.lower_s:.1f} s + {p.compile_s:.1f} s" for p in progs])
  if any(p.memory and p.memory.unpadded_arguments for p in progs):
    add("argument layout padding", [
        f"{100 * (p.memory.arguments / p.memory.unpadded_arguments - 1):+.0f}%"
        if p.memory and p.memory.unpadded_arguments else "-" for p in progs])
  if t.is_gpu:
    def convs(p):
      g = p.gpu
      if g is None:
        return "-"
      calls = sum(g.cudnn_calls.values())
      others = {k: v for k, v in g.conv_lowering.items() if k != "cudnn conv"}
      return f"{calls} cuDNN" + "".join(f", {v} {k}" for k, v in sorted(others.items()))
    add("convolution kernels", [convs(p) for p in progs])
    add("  cuDNN calls by kind", [", ".join(f"{v} {_CUDNN.get(k, k)}" for k, v in sorted(p.gpu.cudnn_calls.items()))
                                  if p.gpu else "-" for p in progs])
    add("layout transposes/copies", [
        f"{p.gpu.layout_kernels} ({_gib(p.gpu.layout_bytes)}), {p.gpu.layout_next_to_conv} at a conv" if p.gpu else "-"
        for p in progs])
    add("kernels launched", [f"{sum(p.gpu.kernels.values())} ({p.gpu.kernels.get('fusion', 0)} fusions)"
                             if p.gpu else "-" for p in progs])
  if t.is_tpu or report.devices > 1:
    add("collectives", [
        (", ".join(f"{n} {k} ({_gib(b)})" for k, (n, b) in sorted(p.collectives.by_kind.items())) or "none")
        if p.collectives else "-" for p in progs])
  width = max(len(r[0]) for r in rows)
  cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
  procs = f" in {report.processes} processes" if report.processes > 1 else ""
  head = (f"{report.model} ({report.image_size} px, {report.dtype}) on {report.dataset}, compiled for "
          f"{t.name}: {report.devices} x {re.sub(r'^[0-9]+ x ', '', t.kind.split(', ')[0])}{procs}, "
          f"{t.memory_bytes / GIB:.1f} GiB each")
  lines = [head, progs[0].describe if progs else "", ""]
  lines.append(f"{'':<{width}}  " + "  ".join(f"{n:<{c}}" for n, c in zip(names, cols)))
  for label, values in rows:
    lines.append(f"{label:<{width}}  " + "  ".join(f"{v:<{c}}" for v, c in zip(values, cols)))
  for p in progs:
    if p.refused:
      lines.append(f"{p.name}: XLA refused it: {p.refused}")
  if t.is_gpu:
    lines.append("GPU: compiled without autotuning (cuDNN algo_id -1, no workspace): real temporaries are "
                 "somewhat larger.")
  return "\n".join(lines)
