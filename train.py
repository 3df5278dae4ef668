r"""Trains one of cnn_jax's networks.

  python train.py --config=configs/vgg.py:quick               # minutes on a CPU; workdir runs/vgg_quick
  python train.py --config=configs/nin.py --workdir=runs/nin
  python train.py --config=configs/alexnet.py:small,dataset=cifar10 --workdir=runs/alexnet \
      --config.batch_size=256

Multi-process (one process per host, all with the same flags): see docs/multihost.md.
"""

import os
import re
import signal
import sys
import traceback


def _exit_at_once(signum, frame):
  del frame
  os.write(2, f"\n{signal.Signals(signum).name} during start-up: exiting (status {128 + signum})\n".encode())
  os._exit(128 + signum)  # pylint: disable=protected-access


# Before the imports below (a few tenths of a second): a Ctrl-C then exits with one line instead of a
# KeyboardInterrupt traceback. cnn_jax.signals.guard_process takes over once the flags are parsed.
for _signal in (signal.SIGINT, signal.SIGTERM):
  signal.signal(_signal, _exit_at_once)

from absl import app  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging as absl_logging  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

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


def _user_frame(frames, config_path: str):
  """(file, line) of the innermost frame in the config file or the project's code, else None."""
  config_path = os.path.abspath(config_path) if config_path else None
  here = os.path.abspath(__file__)

  def ours(filename):
    return (not filename.startswith("<") and os.path.abspath(filename) != here
            and "site-packages" not in filename and not filename.startswith(sys.base_prefix))

  frames = [(f, int(n)) for f, n in frames]
  for want in (lambda f: config_path and os.path.abspath(f) == config_path, ours):
    chosen = [(f, n) for f, n in frames if want(f)]
    if chosen:
      return chosen[-1]
  return None


def _config_file_error_line(error: BaseException, argv) -> str:
  """'file:line: Type: message' for an error raised by the --config file itself (SyntaxError,
  ImportError, NameError, ...), instead of a 40-line traceback."""
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  path = spec.split(":", 1)[0]
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return f"--config={path}: the file defines no get_config(arg=None) function returning the config"
  if isinstance(error, SyntaxError) and error.filename:
    where = (error.filename, error.lineno or 0)
    message = error.msg
  else:
    text = str(error).strip()
    # ml_collections re-raises a config file's TypeError/ValueError with the traceback in its message.
    frames = re.findall(r'File "([^"]+)", line (\d+)', text) or [
        (f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
    where = _user_frame(frames, path)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    message = lines[-1] if lines else type(error).__name__
    prefix = f"{type(error).__name__}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
  if where is None:
    return f"--config={path}: {type(error).__name__}: {message}"
  filename = os.path.relpath(where[0]) if not os.path.relpath(where[0]).startswith("..") else where[0]
  return f"{filename}:{where[1]}: {type(error).__name__}: {message}"


def _flag_error_line(error: BaseException, argv) -> str:
  """One line for a command-line error (absl would print 'FATAL Flags parsing error' and, for a bad
  config file or an unknown --config.FIELD, a traceback)."""
  text = str(error).strip()
  if isinstance(error, AttributeError) and "get_config" in text:
    return _config_file_error_line(error, argv)
  if "--config must have a value other than None" in text:  # get_config() returned None
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
    return f"--config={spec.split(':', 1)[0]}: get_config() returned None (a missing return?)"
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
    if first.startswith("flag "):
      return f"{first}: {lines[-1]}"
    return _config_file_error_line(error, argv)
  return lines[0] if lines else type(error).__name__


def _parse_flags(argv):
  """absl flag parsing with every failure reduced to one 'error: ...' line and exit status 2."""
  # First of all: Ctrl-C / SIGTERM from here on exit cleanly (status 130 / 143) instead of raising
  # KeyboardInterrupt wherever the interpreter happens to be (see cnn_jax/signals.py).
  from cnn_jax import signals  # pylint: disable=g-import-not-at-top
  signals.guard_process()
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  try:
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # ml_collections warns of a config that returned None
    try:
      args = FLAGS(argv)
    finally:
      absl_logging.set_verbosity(verbosity)
    if FLAGS["config"].present and FLAGS.config is None:
      print(f"error: --config={spec.split(':', 1)[0]}: get_config() returned None (a missing return?)",
            file=sys.stderr, flush=True)
      sys.exit(2)
    if FLAGS["config"].present:
      FLAGS.config.keys()  # a config file that failed to load reports it only on first use
    return args
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    print(f"error: {_flag_error_line(e, argv)} (see --helpshort)", file=sys.stderr, flush=True)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except
    # The config file's own error (SyntaxError, ImportError, NameError, ...): its file and line.
    print(f"error: {_config_file_error_line(e, argv)}", file=sys.stderr, flush=True)
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
