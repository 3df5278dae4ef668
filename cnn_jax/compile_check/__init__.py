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

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Sequence

from cnn_jax import targets as targets_lib
from cnn_jax.compile_check.compiling import (GIB, Compile, Memory, compile_program,  # pylint: disable=unused-import
                                             network_flops)
from cnn_jax.compile_check.search import DEFAULT_MAX_COMPILES, Search, round_down, search_batch
from cnn_jax.compile_check.table import format_table  # pylint: disable=unused-import
from cnn_jax.errors import UserError


def set_platforms() -> None:
  """JAX's own backends limited to the host CPU (before jax starts): with the CUDA plugin and libtpu
  installed and no accelerator, JAX would otherwise try both and print tracebacks and warnings."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from cnn_jax import sharding as shd  # pylint: disable=g-import-not-at-top
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
    report = _program_report(name, program, result, target, n_dev, budget)
    if keep_executables:
      report.compiled = result.compiled
    result.compiled = None
    if name in search:
      log(f"searching the largest {name} batch that fits {budget / GIB:.2f} GiB per device (step {step})")
      limit = program.max_batch
      report.search = search_batch(lambda b, name=name: build_all(name, b)[name], result, budget, step,
                                   round_down(limit, step) if limit else None, max_compiles, log)
    reports[name] = report
  return Report(target, str(config.model), int(config.image_size), str(config.get("dtype", "float32")),
                str(config.dataset), n_dev, n_proc, budget, fraction, reports)


def _program_report(name: str, program, result: Compile, target, n_dev: int, budget: int) -> ProgramReport:
  """What one compile says: memory, fit, FLOPs, and from the optimised HLO the collectives and GPU kernels."""
  from cnn_jax.compile_check import hlo  # pylint: disable=g-import-not-at-top
  flops, flops_source = network_flops(program)
  report = ProgramReport(name, program.batch, n_dev, result.memory, result.need() <= budget, result.lower_s,
                         result.compile_s, flops, flops_source, result.refused, describe=program.describe)
  if result.compiled is None:
    return report
  text = result.compiled.as_text()
  report.collectives = hlo.collectives(text)
  if target.is_gpu:
    report.gpu = hlo.gpu_kernels(text)
  elif flops is None:  # TPU counts convolutions itself; a module's analysis is one device's share
    analysis = result.compiled.cost_analysis() or {}
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    if analysis.get("flops", 0) > 0:
      report.flops, report.flops_source = float(analysis["flops"]) * n_dev, "XLA:TPU cost analysis"
  return report
