"""Process start-up shared by the command-line entry points.

`setup_runtime` guards the process against signals (cnn_jax.signals.guard_process), sets the (fake) CPU
device count and joins the multi-process runtime (jax.distributed) when asked; `run(fn, ...)` turns a `UserError` into one line on stderr and exit status 2 (NaN/Inf: status 3),
with no traceback. Signals: during set-up SIGINT exits with 130 and SIGTERM with 143 at once; during
training either stops after the step in flight, saves and exits 0; a second one exits at once (130 / 143).

Multi-process: one process per host (or per GPU), all started with the same flags. The coordinator
(process 0's host:port) and the process count/index come from --coordinator_address/--num_processes/
--process_id, or are auto-detected by `jax.distributed.initialize()` under SLURM, Open MPI, Cloud TPU
and Kubernetes JobSet. On CPU the cross-process collectives are gloo (JAX's default). Only process 0
logs below ERROR and prints progress. See docs/multihost.md.
"""

import logging
import os
import re
import sys

from cnn_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT (cnn_jax.signals.EXIT_SIGINT)

# Environment variables by which a cluster launcher tells JAX it is one of several processes;
# `jax.distributed.initialize()` auto-detects the coordinator from them.
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI", "TPU_WORKER_HOSTNAMES": "Cloud TPU",
    "JOBSET_NAME": "Kubernetes JobSet",
}


def _cluster_size_from_env():
  for var, name in _CLUSTER_ENV.items():
    value = os.environ.get(var)
    if value is None:
      continue
    if var == "TPU_WORKER_HOSTNAMES":
      n = len([h for h in value.split(",") if h])
    elif var == "JOBSET_NAME":
      n = 2  # JobSet pods are always launched as a group
    else:
      n = int(value) if value.isdigit() else 1
    if n > 1:
      return name
  return None


def setup_runtime(coordinator_address=None, num_processes=None, process_id=None,
                  cpu_devices=None, distributed="auto"):
  """Configures JAX before first use: fake CPU devices, and jax.distributed when multi-process.

  distributed: 'auto' joins when a coordinator is given or a cluster launcher is detected;
  'on' always calls jax.distributed.initialize() (auto-detection); 'off' never does.
  """
  # Before TensorFlow and JAX start their threads, which inherit the blocked signals (see cnn_jax.signals).
  from cnn_jax import signals  # pylint: disable=g-import-not-at-top
  signals.guard_process()
  # Flags first: a mistake is reported before TensorFlow and JAX take seconds to start.
  explicit = coordinator_address is not None
  detected = _cluster_size_from_env() if distributed == "auto" else None
  join = distributed != "off" and bool(explicit or detected or distributed == "on")
  if cpu_devices is not None and int(cpu_devices) < 1:
    raise UserError(f"--cpu_devices={cpu_devices} must be >= 1")
  if not join and (num_processes is not None or process_id is not None):
    raise UserError("--num_processes/--process_id need --coordinator_address (host:port of process 0)")
  kwargs = {}
  if join and explicit:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id as well")
    if int(num_processes) < 1 or not 0 <= int(process_id) < int(num_processes):
      raise UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if not re.fullmatch(r"\S+:\d+", coordinator_address):
      raise UserError(f"--coordinator_address={coordinator_address!r} must be host:port of process 0")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))

  # TensorFlow is not imported here: the host pipeline imports it (GPUs hidden, cnn_jax/data/tf_runtime.py)
  # only when it runs, and a device-input run never does.
  import jax  # pylint: disable=g-import-not-at-top
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if not join:
    return
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise UserError(f"could not join the multi-process runtime ({first}); check --coordinator_address "
                    "(process 0's host:port, reachable from every host) and that all processes were "
                    "started") from e
  if jax.process_index() != 0:
    # One voice: the other processes only report errors.
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
  logging.info("joined %d processes as process %d (%s)", jax.process_count(), jax.process_index(),
               "explicit coordinator" if explicit else detected or "auto-detected")


class _NoLibraryTracebacks(logging.Filter):
  """Drops Orbax's ERROR records that carry a traceback.

  Orbax logs a failed background write with its traceback and then re-raises the same error in the loop,
  which reports it once: as one line when it is the user's to fix (a full disk), with its traceback
  otherwise. Without this filter a full disk would print several tracebacks before that one line.
  """

  def filter(self, record):
    where = f"{os.sep}orbax{os.sep}"
    if record.name == "asyncio":  # "Task exception was never retrieved" of an Orbax read that failed
      text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
      return where not in text and "tensorstore_spec" not in text
    return not (record.exc_info and where in (record.pathname or ""))


def train_main(config, workdir):
  """The command-line training entry: cnn_jax.train.train_and_evaluate, status 0 (also when stopped)."""
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
    if not any(isinstance(f, _NoLibraryTracebacks) for f in logger.filters):
      logger.addFilter(_NoLibraryTracebacks())
  train.train_and_evaluate(config, workdir)
  return 0


def run(fn, *args, **kwargs) -> int:
  """Calls fn(*args, **kwargs); a UserError becomes 'error: ...' on stderr and a non-zero status."""
  try:
    return fn(*args, **kwargs) or 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "NonFiniteError":
      print(f"error: {e}", file=sys.stderr, flush=True)
      return EXIT_NONFINITE
    raise
