"""Process start-up shared by the command-line entry points.

`run(fn, ...)` hides GPUs from TensorFlow, joins the multi-process runtime when asked, and turns a
`UserError` into one line on stderr and exit status 2 (NaN/Inf: status 3), with no traceback.
"""

import logging
import os
import sys

from cnn_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3

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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only; never competes with JAX for the GPU
  import jax  # pylint: disable=g-import-not-at-top
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  explicit = coordinator_address is not None
  detected = _cluster_size_from_env() if distributed == "auto" else None
  if distributed == "off" or not (explicit or detected or distributed == "on"):
    return
  kwargs = {}
  if explicit:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id as well")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
  jax.distributed.initialize(**kwargs)
  logging.info("joined %d processes as process %d (%s)", jax.process_count(), jax.process_index(),
               "explicit coordinator" if explicit else detected or "auto-detected")


def train_main(config, workdir):
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir)
  return 0


def run(fn, *args, **kwargs) -> int:
  """Calls fn(*args, **kwargs); a UserError becomes 'error: ...' on stderr and a non-zero status."""
  try:
    return fn(*args, **kwargs) or 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "NonFiniteError":
      print(f"error: {e}", file=sys.stderr, flush=True)
      return EXIT_NONFINITE
    raise
