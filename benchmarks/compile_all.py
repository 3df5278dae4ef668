r"""Every shipped config compiled for every accelerator target, nothing run: the table of docs/results/compile/.

  JAX_PLATFORMS=cpu python benchmarks/compile_all.py --out=runs/compile_all          # needs requirements-compile.txt
  JAX_PLATFORMS=cpu python benchmarks/compile_all.py --configs=alexnet --targets=h200 --dtypes=bfloat16 --out=...

For each config (at its native resolution, global batch 256), target and compute dtype: cnn_jax.compile_check's
report of the train and eval programs (memory per device, whether it fits, FLOPs, compile time, cuDNN calls and
layout copies on GPUs, collectives on TPU slices), and the largest global train batch that fits: a search of up
to 8 compiles on GPUs, and on TPUs, whose compiles take minutes, 2 (bf16 only by default: the bracket it ends
with is shown as a range). Writes <out>/<config>_<target>_<dtype>.json and <out>/README.md (one row per
program); combinations already written are not compiled again, and one that fails to compile is a row saying
why (the others go on).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", None, "Folder for the JSON files and README.md.")
_CONFIGS = flags.DEFINE_list("configs", ["alexnet", "vgg", "nin", "lenet"], "configs/<name>.py at native resolution.")
_TARGETS = flags.DEFINE_list("targets", ["h100", "h200", "tpu-v4:2x2x1", "tpu-v5e:2x2", "tpu-v5e:4x4", "tpu-v6e:2x2"],
                             "compile_check targets.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch of the train and eval programs.")
_SEARCH_ON = flags.DEFINE_list("search_on", ["cuda", "tpu:bfloat16"],
                                "Where the largest fitting train batch is searched: PLATFORM or PLATFORM:DTYPE.")
_MAX_COMPILES = flags.DEFINE_list("max_compiles", ["cuda:8", "tpu:2"], "The search's compiles per PLATFORM:N.")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the combinations not yet written; --nocompile writes the "
                             "table of those written, the others listed as not compiled with their command.")
flags.mark_flags_as_required(["out"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gib(x):
  return "–" if x is None else f"{x / 2**30:.2f}"


def _searched(platform: str, dtype: str) -> bool:
  return platform in _SEARCH_ON.value or f"{platform}:{dtype}" in _SEARCH_ON.value


def _max_compiles(platform: str) -> int:
  limits = dict(item.split(":", 1) for item in _MAX_COMPILES.value)
  return int(limits.get(platform, 8))


def _row(name: str, report, program: str) -> str:
  if "error" in report:
    return (f"| {name} | {report['target']} | {report['dtype']} | {program} | {report['batch']} | "
            f"did not compile: {report['error']} |" + " |" * 9)
  p = report["programs"][program]
  m = p["memory"] or {}
  search = p.get("largest_fitting_batch") or {}
  largest = search.get("largest") if search else None
  if search and search.get("limited"):
    largest = f"≥ {largest:,} (limit)" if largest else largest
  elif search and search.get("capped"):
    largest = f"{largest:,}–{search.get('upper'):,}" if largest else largest
  gpu = p.get("gpu_kernels") or {}
  kernels = (f"{sum(gpu.get('cudnn_calls', {}).values())} cuDNN / {gpu.get('layout_kernels', '–')} layout "
             f"({_gib(gpu.get('layout_bytes'))} GiB) / {gpu.get('buffer_copies', '–')} copies "
             f"({_gib(gpu.get('buffer_copy_bytes'))} GiB)"
             if gpu else ", ".join(f"{k} {v['count']}" for k, v in (p.get("collectives") or {}).items()) or "–")
  share = p["share_of_device_memory"]
  return (f"| {name} | {report['target']} | {report['dtype']} | {program} | {p['global_batch']} | "
          f"{_gib(m.get('arguments'))} | {_gib(m.get('temporaries'))} | {_gib(m.get('need'))} | "
          f"{'–' if share is None else f'{100 * share:.1f}%'} | {'yes' if p['fits'] else '**no**'} | "
          f"{largest if largest else '–'} | {(p['flops_per_step'] or 0) / 1e9:,.0f} | {p['compile_s']:.0f} | {kernels} |")


def _write_readme(out: str, rows, commands, missing=()):
  lines = ["# Every shipped config compiled for GPUs and TPUs (compile only)", "",
           "Written by `JAX_PLATFORMS=cpu python benchmarks/compile_all.py --out=docs/results/compile` on a 2-core CPU "
           "with `requirements-compile.txt`; nothing ran on an accelerator. Memory per device from XLA's "
           "`memory_analysis()` (GiB); `need` = arguments + temporaries + outputs − aliased + other resident splits; "
           "fits = need ≤ 75% of a GPU's memory (JAX's allocator share) or of a TPU chip's HBM. GPU programs are "
           "compiled without autotuning (no cuDNN workspace), so real temporaries are somewhat larger. `largest`: "
           "the largest global train batch that fits (a range where the search's compiles ran out before one step "
           "separated them; – not searched). GFLOP per step of the whole network "
           "(counted on the host). Kernels: GPU cuDNN convolutions / layout transposes (copies into another layout) / "
           "buffer copies (same layout, for an in-place op); TPU: collectives "
           "(count). One JSON per row group beside this file.", "",
           "| config | target | dtype | program | batch | arguments | temporaries | need | share | fits | largest "
           "| GFLOP/step | compile s | kernels |",
           "|---" * 14 + "|"] + rows + ["", "Commands:", ""] + [f"- `{c}`" for c in commands]
  if missing:
    lines += ["", "Not compiled yet (each is one command; `compile_all.py` without `--nocompile` runs them all):",
              ""] + [f"- `{c}`" for c in missing]
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _check(name: str, target, dtype: str, searched: bool):
  """compile_check's report of configs/<name>.py for `target` as JSON, or {'error': ...} when it fails."""
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config()
  config.dtype, config.batch_size, config.eval_batch_size = dtype, _BATCH.value, _BATCH.value
  t0 = time.time()
  try:
    report = cc.check(config, target, search=["train"] if searched else [],
                      max_compiles=_max_compiles(target.platform),
                      log=lambda line: print("  " + line, file=sys.stderr, flush=True))
  except Exception as e:  # pylint: disable=broad-except  (a compiler failure is a result too)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    print(f"  failed: {first}", file=sys.stderr, flush=True)
    return {"target": target.name, "dtype": dtype, "batch": _BATCH.value, "error": first,
            "wall_s": time.time() - t0}
  data = report.to_json()
  data["wall_s"] = time.time() - t0
  return data


def main(argv):
  del argv
  sys.path.insert(0, REPO)
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  from cnn_jax import targets  # pylint: disable=g-import-not-at-top
  os.makedirs(_OUT.value, exist_ok=True)
  cc.set_platforms()
  rows, commands, missing = [], [], []
  for name in _CONFIGS.value:
    for target_name in _TARGETS.value:
      target = targets.get(target_name)
      targets.check_requirements(target)
      for dtype in _DTYPES.value:
        path = os.path.join(_OUT.value, f"{name}_{target_name.replace(':', '_')}_{dtype}.json")
        searched = _searched(target.platform, dtype)
        command = (f"python -m cnn_jax.compile_check --config=configs/{name}.py --target={target_name} "
                   f"--config.dtype={dtype} --config.batch_size={_BATCH.value} --config.eval_batch_size={_BATCH.value}"
                   + (f" --max_compiles={_max_compiles(target.platform)}" if searched else " --search=none"))
        commands.append(command)
        if not os.path.exists(path):
          if not _COMPILE.value:
            missing.append(command)
            continue
          print(f"{name} {target_name} {dtype} ...", file=sys.stderr, flush=True)
          data = _check(name, target, dtype, searched)
          with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
        with open(path) as f:
          data = json.load(f)
        rows += [_row(name, data, program) for program in ("train", "eval")]
        _write_readme(_OUT.value, rows, [c for c in commands if c not in missing], missing)
  _write_readme(_OUT.value, rows, [c for c in commands if c not in missing], missing)
  return 0


if __name__ == "__main__":
  app.run(main)
