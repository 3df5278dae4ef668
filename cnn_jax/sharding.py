"""Device mesh and shardings: the batch is split on a `data` axis, parameters are replicated.

Everything is written as single-device code under `jax.jit`; XLA inserts the cross-device reductions
(gradient all-reduce, BatchNorm statistics over the global batch) from these shardings. So BatchNorm
normalises with the statistics of the GLOBAL batch, over all devices of all processes, whatever the device
count (pmap-era code normalised per device); a run on 8 devices equals the run on 1 up to float rounding.
The mesh keeps a `data` axis; a second axis (e.g. `model` for sharding the FC weights of AlexNet/VGG)
is the seam left for later: add it to `make_mesh` and give the large kernels a `PartitionSpec` naming it.
"""

from typing import Any, Dict

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax.errors import UserError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices of all processes, axis name `data`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding for parameters and optimiser state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding for batch arrays: the leading (example) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises UserError unless the global batch splits evenly over devices and processes."""
  n_dev = mesh.devices.size
  n_proc = jax.process_count()
  if batch_size <= 0 or batch_size % n_dev or batch_size % n_proc:
    raise UserError(
        f"--config.{what}={batch_size} is not divisible by the {n_dev} devices"
        f"{f' and {n_proc} processes' if n_proc > 1 else ''}; use a multiple of {n_dev}, "
        f"e.g. --config.{what}={max(n_dev, (batch_size // n_dev) * n_dev or n_dev)}")


def make_global_batch(local_batch: Dict[str, Any], mesh: Mesh) -> Dict[str, jax.Array]:
  """Assembles per-process numpy arrays [B_local, ...] into global arrays [B_global, ...] on `data`.

  Every process calls it with its own B_local = B_global / process_count examples; each lands on that
  process's devices (with the usual process-major device order: process 0's rows first). Nothing crosses
  the network here; the step's collectives do that.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)
