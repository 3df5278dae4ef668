r"""Trains one of cnn_jax's networks.

  python train.py --config=configs/vgg.py:quick               # minutes on a CPU; workdir runs/vgg_quick
  python train.py --config=configs/nin.py --workdir=runs/nin
  python train.py --config=configs/alexnet.py:small,dataset=cifar10 --workdir=runs/alexnet \
      --config.batch_size=256

Multi-process (one process per host, all with the same flags): see docs/multihost.md.
"""

import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries (default: "
                    "runs/<config name>[_<config args>]; the same command resumes there).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs without a cluster launcher.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "auto: join jax.distributed when a coordinator is given or SLURM/Open MPI/Cloud TPU/"
                  "Kubernetes is detected; on: always (JAX auto-detects the cluster); off: never.")
flags.DEFINE_integer("cpu_devices", None, "Number of (fake) CPU devices, for testing meshes on one CPU.")
flags.mark_flags_as_required(["config"])


def _flag_error_line(error: BaseException, argv) -> str:
  """One line for a command-line error (absl would print 'FATAL Flags parsing error' and, for a bad
  config file or an unknown --config.FIELD, a traceback)."""
  text = str(error).strip()
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: an override names a field the config does not have. The message is a repr of
    # "'field'" plus, for a near miss, 'Did you mean "x" instead of "y"?'.
    match = re.search(r"[\\']*'?(\w+)[\\']*", text)
    field = match.group(1) if match else "?"
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and a.split("=")[0].rsplit(".", 1)[-1] == field),
                f"--config.{field}")
    hint = re.search(r"Did you mean \"[^\"]+\" instead of \"[^\"]+\"\?", text)
    return (f"{flag}: the config has no field {field!r}{' (' + hint.group(0) + ')' if hint else ''}; "
            "the fields are in configs/common.py (and the model's config file)")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if isinstance(error, OSError) and lines:
    return f"--config: cannot load the config file: {lines[-1]}"
  if len(lines) > 1:  # a config file's traceback: its last line is the exception
    first = lines[0].rstrip(":")
    return f"{first}: {lines[-1]}" if first.startswith("flag ") else lines[-1]
  return lines[0] if lines else type(error).__name__


def _parse_flags(argv):
  """absl flag parsing with every failure reduced to one 'error: ...' line and exit status 2."""
  try:
    args = FLAGS(argv)
    if FLAGS["config"].present:
      FLAGS.config.keys()  # a config file that failed to load reports it only on first use
    return args
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    print(f"error: {_flag_error_line(e, argv)} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like --name=value", file=sys.stderr)
    return 2
  # Library chatter (TensorFlow start-up, tfds, Orbax, JAX backends) only with --verbosity; this must run
  # before TensorFlow is imported.
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()
  workdir = FLAGS.workdir or console.default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  # At once, before the seconds TensorFlow and JAX take to start.
  print(f"workdir: {workdir}" + ("" if FLAGS.workdir else " (--workdir not given; the same command resumes "
                                 "there)"), flush=True)
  # Imported here so `--help` and flag errors do not pay for JAX/TF start-up.
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  status = cli.run(cli.setup_runtime, FLAGS.coordinator_address, FLAGS.num_processes,
                   FLAGS.process_id, FLAGS.cpu_devices, FLAGS.distributed)
  return status or cli.run(cli.train_main, FLAGS.config, workdir)


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=_parse_flags))
