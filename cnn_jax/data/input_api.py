"""The contract between the training loop and an input mode: data plus a pure function per program.

An input compiles nothing. The loop (`cnn_jax.steps.jit_train_step` / `jit_eval_step`) jits

  train(state, args) = train_step(state, inp.make_batch(args, state.step))
  eval(state, args)  = eval_step(state, inp.make_eval_batch(args))

over the mesh, with `in_shardings` read off `inp.train_spec()` / `inp.eval_spec(split)`, and feeds them
`inp.train_args(step)` and each element of `inp.eval_args(split)`:

  mode    train_args(step)                              make_batch
  host    the next global batch {'image', 'label'}      identity
  device  (resident images, labels, this epoch's        gather this step's examples from the resident split,
          permutation, the augmentation key)            augment them (augment_jax), in the compute dtype

Batches follow one contract: {'image': [B, S, S, 3] (eval: [B, 10, S, S, 3] for ten crops), 'label': int32
[B]}, eval also 'mask': bool [B] (False for padding), with the same augmentation (`config.augment`), the same
eval preprocessing, and every random choice a function of the seed and the step, so both modes resume exactly.
"""

import abc
import os
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp

from cnn_jax.data.info import DatasetInfo
from cnn_jax.sharding import DATA_AXIS

Batch = Dict[str, jax.Array]


class Input(abc.ABC):
  """One input mode. Attributes: mode ('host' | 'device'), info (DatasetInfo), steps_per_epoch, channels
  (what raw images are decoded to: 1 for grayscale, tiled to RGB later), mean_std (the normalisation:
  ((mean,), (std,)) in [0, 1] units, or None)."""
  mode: str
  info: DatasetInfo
  steps_per_epoch: int
  channels: int
  mean_std: Optional[Any]

  @abc.abstractmethod
  def train_spec(self) -> Any:
    """The pytree of `jax.ShapeDtypeStruct`s (with shardings) that `train_args` returns."""

  @abc.abstractmethod
  def train_args(self, step: int) -> Any:
    """What train step `step` (0-based: the state's step before it) takes besides the state, already on the
    devices. Host input: called for consecutive steps (the first call starts the pipeline there)."""

  @abc.abstractmethod
  def make_batch(self, args: Any, step: jax.Array) -> Batch:
    """Traceable: the global train batch {'image', 'label'} of step `step` (a traced int32) from `args`."""

  @abc.abstractmethod
  def eval_spec(self, split: Optional[str] = None) -> Any:
    """The pytree of `jax.ShapeDtypeStruct`s (with shardings) that `eval_args(split)` yields."""

  @abc.abstractmethod
  def eval_args(self, split: Optional[str] = None) -> Iterator[Any]:
    """One element per eval batch of the eval split (or `split`): every example once, padding masked."""

  @abc.abstractmethod
  def make_eval_batch(self, args: Any) -> Batch:
    """Traceable: the eval batch {'image', 'label', 'mask'} from one element of `eval_args`."""

  @abc.abstractmethod
  def describe(self) -> str:
    """One line for the log: mode and what it holds."""


def shardings(spec: Any) -> Any:
  """The shardings of a pytree of ShapeDtypeStructs (a jit's in_shardings)."""
  return jax.tree.map(lambda s: s.sharding, spec)


def batch_spec(mesh, batch_size: int, image_shape, mask: bool = False) -> Dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch {'image': float32 [B, *image_shape], 'label': int32 [B], 'mask'?: bool [B]} split on
  the mesh's `data` axis: what the host input feeds a step (its make_batch is the identity)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  spec = {"image": jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32, sharding=sharding),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  if mask:
    spec["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharding)
  return spec


def host_train_spec(config, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  return batch_spec(mesh, config.batch_size, (config.image_size, config.image_size, 3))


def host_eval_spec(config, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  size = config.image_size
  return batch_spec(mesh, config.eval_batch_size,
                    ((10,) if config.eval_crop == "ten_crop" else ()) + (size, size, 3), mask=True)


def finish_eval(totals) -> Dict[str, float]:
  """Means from summed eval metrics (fetched to the host)."""
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count, "count": int(count)}


def steps_per_epoch(local_examples: int, global_batch: int, process_count: Optional[int] = None) -> int:
  """Train steps per epoch: each of `process_count` processes (default: this run's) draws
  `global_batch / process_count` of its own `local_examples` per step and drops its last partial batch."""
  return local_examples // (global_batch // (process_count or jax.process_count()))


def device_memory_bytes(mesh) -> Optional[int]:
  """Memory of one local device of `mesh`: its allocator limit on accelerators; on CPU the physical RAM
  divided by the local CPU devices (they share it). None if unknown."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (a backend without memory stats)
      stats = {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None
  local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  return ram // max(local, 1)


def describe_bytes(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
