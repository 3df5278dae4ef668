r"""Runs a sweep (one base config, many named overrides) locally, or prints one train.py command per run.

  python sweep.py --sweep=configs/sweeps/families.py --root=runs/families --set=data_dir=/data/tfds
  python sweep.py --sweep=configs/sweeps/families.py:seeds=5,width=0.25 --root=runs/families --dry_run
  python sweep.py --sweep=configs/sweeps/families.py --root=runs/families --print_commands | sbatch-array

Runs train one after another in <root>/<run name>. Running the same command again resumes partial runs
from their checkpoints and skips finished ones; a workdir holding a different run is refused.
"""

import sys

from absl import app
from absl import flags

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file configs/sweeps/NAME.py[:args].")
_ROOT = flags.DEFINE_string("root", None, "Folder holding one workdir per run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what each run would do (train/resume/skip) only.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one `python train.py ...` line per run and exit.")
_ONLY = flags.DEFINE_string("only", None, "Regex: only runs whose name matches (re.search).")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE applied to every run, e.g. data_dir=/data/tfds.")
_PYTHON = flags.DEFINE_string("python", "python", "Interpreter named in --print_commands lines.")
flags.mark_flags_as_required(["sweep", "root"])


def _main():
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # library chatter only with --verbosity (before TensorFlow loads)
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  from cnn_jax.compare import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  sweep = sweep_lib.load_sweep(_SWEEP.value)
  extra = sweep_lib.parse_overrides(_SET.value)
  runs = sweep_lib.select(sweep, _ONLY.value)
  if _PRINT.value:
    for run in runs:
      sweep_lib.run_config(sweep, run, extra)  # a bad override fails here, not on the cluster
      print(sweep_lib.train_command(sweep, run, _ROOT.value, extra, python=_PYTHON.value))
    return 0
  if not _DRY_RUN.value:
    cli.setup_runtime(distributed="off")
  outcomes = sweep_lib.run_sweep(sweep, _ROOT.value, only=_ONLY.value, extra=extra, dry_run=_DRY_RUN.value)
  if not _DRY_RUN.value:
    print("\n".join(f"{name:24s} {outcome}" for name, outcome in outcomes.items()))
  return 1 if any(o.startswith("failed") for o in outcomes.values()) else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_main)


if __name__ == "__main__":
  sys.exit(app.run(main))
