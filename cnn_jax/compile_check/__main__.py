r"""python -m cnn_jax.compile_check --config=CONFIG --target=TARGET [--json_out=PATH] [--require_fit] ...

Compiles the config's train and eval programs for TARGET (h100, h200, h100:8, tpu-v4:2x2x1, tpu-v5e:2x2,
tpu-v5e:4x4, tpu-v6e:2x2, ...) on this CPU, runs nothing, and prints one table (see cnn_jax/compile_check).
Progress goes to stderr, the table to stdout. Exit status: 0 (also when a program does not fit, unless
--require_fit: then 1), 2 for bad input (an unknown target, a missing extra package, a bad config).
Needs the packages of requirements-compile.txt.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("target", None, "What to compile for: h100, h200 (NAME:N for N GPUs of one host), "
                    "tpu-v4:2x2x1, tpu-v5e:2x2, tpu-v5e:4x4, tpu-v6e:2x2, ... (an unknown name lists them).")
flags.DEFINE_string("json_out", None, "Also write the numbers as JSON to this file.")
flags.DEFINE_bool("require_fit", False, "Exit with status 1 when a program does not fit.")
flags.DEFINE_list("search", ["train"], "Programs whose largest fitting global batch is searched by compiling "
                  "at other batches: train, eval, both (train,eval) or none.")
flags.DEFINE_integer("batch_step", None, "Granularity of the batch search (default: 8 per device).")
flags.DEFINE_float("memory_fraction", None, "Share of a device's memory a program may use (default: 0.75 on "
                   "GPUs, JAX's default allocator share; 1.0 on TPUs).")
flags.DEFINE_integer("max_compiles", 8, "Most compiles the batch search makes per program.")
flags.mark_flags_as_required(["config", "target"])


def _parse_flags(argv):
  try:
    args = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load reports it only on first use
    return args
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    print(f"error: {lines[-1] if lines else type(e).__name__} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(2)


def _run() -> int:
  from cnn_jax import targets  # pylint: disable=g-import-not-at-top
  target = targets.get(FLAGS.target)  # before JAX starts: a typo costs no start-up
  targets.check_requirements(target)
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  cc.set_platforms()
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()
  search = [s for s in FLAGS.search if s and s != "none"]
  log = lambda line: print(line, file=sys.stderr, flush=True)
  report = cc.check(FLAGS.config, target, search=search, batch_step=FLAGS.batch_step,
                    memory_fraction=FLAGS.memory_fraction, max_compiles=FLAGS.max_compiles, log=log)
  print(cc.format_table(report), flush=True)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
      json.dump(report.to_json(), f, indent=2, sort_keys=True, default=str)
  if not report.fits:
    print("warning: " + ", ".join(n for n, p in report.programs.items() if not p.fits)
          + f" does not fit {target.name}", file=sys.stderr, flush=True)
    if FLAGS.require_fit:
      return 1
  return 0


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value", file=sys.stderr)
    return 2
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.run(_run)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before anything imports jax (cnn_jax.compile_check)
  sys.exit(app.run(main, flags_parser=_parse_flags))
