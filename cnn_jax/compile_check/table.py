"""A compile check's report as one table: a row per quantity, a column per program."""

import re
from typing import List, Optional, Tuple

from cnn_jax.compile_check.compiling import GIB
from cnn_jax.compile_check.search import Search

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


def format_table(report) -> str:
  """A compile_check.Report as one table: a row per quantity, a column per program."""
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
    rows += _gpu_rows(progs)
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


def _gpu_rows(progs) -> List[Tuple[str, List[str]]]:
  """The GPU program's kernels: cuDNN convolutions (by kind) vs other lowerings, layout copies, launches."""
  def convs(p):
    g = p.gpu
    if g is None:
      return "-"
    calls = sum(g.cudnn_calls.values())
    others = {k: v for k, v in g.conv_lowering.items() if k != "cudnn conv"}
    return f"{calls} cuDNN" + "".join(f", {v} {k}" for k, v in sorted(others.items()))
  return [
      ("convolution kernels", [convs(p) for p in progs]),
      ("  cuDNN calls by kind", [", ".join(f"{v} {_CUDNN.get(k, k)}" for k, v in sorted(p.gpu.cudnn_calls.items()))
                                 if p.gpu else "-" for p in progs]),
      ("layout transposes/copies", [
          f"{p.gpu.layout_kernels} ({_gib(p.gpu.layout_bytes)}), {p.gpu.layout_next_to_conv} at a conv"
          if p.gpu else "-" for p in progs]),
      ("buffer copies (same layout)", [f"{p.gpu.buffer_copies} ({_gib(p.gpu.buffer_copy_bytes)})"
                                       if p.gpu else "-" for p in progs]),
      ("kernels launched", [f"{sum(p.gpu.kernels.values())} ({p.gpu.kernels.get('fusion', 0)} fusions)"
                            if p.gpu else "-" for p in progs]),
  ]
