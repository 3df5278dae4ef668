"""The interface between the training loop and where its batches come from, and the choice of mode.

  inp = inputs.create(config, mesh)                    # HostInput or DeviceInput (config.input)
  inp.info, inp.steps_per_epoch, inp.mode, inp.describe()
  train = inp.train_step(step_fn, state, start_step)  # compiles once
  state, metrics = train(state, step)                  # runs the step that turns `step` into `step + 1`
  totals = inp.evaluate(eval_fn, state, split=None)    # sums over every example of the split exactly once

`step_fn(state, batch) -> (state, metrics)` and `eval_fn(state, batch) -> sums` are the pure functions of
`cnn_jax.steps`; the input jits them over the mesh with its own way of producing `batch` — a global batch
from the host (host_input.py), or a gather + augmentation from the device-resident split inside the same
jit (device_input.py). The batches follow one contract: {'image': [B, S, S, 3] (eval: [B, 10, S, S, 3] for
ten crops), 'label': int32 [B], eval also 'mask': bool [B]}, with the same augmentation (`config.augment`),
the same eval preprocessing, and every random choice a function of the seed and the step (device) or of
(seed, epoch, example) (host), so both resume exactly.

config.input: 'host' | 'device' | 'auto' (default). auto picks device when the decoded splits it would keep
resident (train, eval, eval_train_split; this process's part) fit `config.input_memory_share` of one
device's memory (CPU: the host RAM divided among the local CPU devices), else host.
"""

import abc
import logging
import os
from typing import Any, Callable, Dict, Optional

import jax

from cnn_jax.data.info import DatasetInfo
from cnn_jax.errors import UserError

MODES = ("auto", "device", "host")
DEFAULT_MEMORY_SHARE = 0.25


class TrainStep(abc.ABC):
  """A compiled train step bound to its input: `__call__(state, step) -> (state, metrics)`.

  `compiled` is the XLA executable (its cost analysis gives FLOPs); `batch_spec` the shapes/dtypes of the
  batch the step function sees (for counting the network's FLOPs without the input's work).
  """
  compiled: Any
  batch_spec: Dict[str, jax.ShapeDtypeStruct]

  def prepare(self, step: int) -> None:
    """Gets step `step`'s input ready on the host before the loop waits for the devices (host input:
    the next batch); a no-op where the input already lives on the devices."""
    del step

  @abc.abstractmethod
  def __call__(self, state, step: int):
    """Runs train step number `step` (0-based: the state's step before it) on `state` (donated)."""


class Input(abc.ABC):
  """One input mode. Attributes: mode ('host' | 'device'), info (DatasetInfo), steps_per_epoch, channels
  (what raw images are decoded to: 1 for grayscale, tiled to RGB later), mean_std (the normalisation:
  ((mean,) , (std,)) in [0, 1] units, or None)."""
  mode: str
  info: DatasetInfo
  steps_per_epoch: int
  channels: int
  mean_std: Optional[Any]

  @abc.abstractmethod
  def train_step(self, step_fn: Callable, state, start_step: int) -> TrainStep:
    """Jits `step_fn` with this input in front of it, compiled for `state`; batches start at `start_step`."""

  @abc.abstractmethod
  def evaluate(self, eval_fn: Callable, state, split: Optional[str] = None) -> Dict[str, float]:
    """{'loss', 'top1', 'top5' (means), 'count'} over the eval split (or `split`), every example once."""

  @abc.abstractmethod
  def describe(self) -> str:
    """One line for the log: mode and what it holds."""


def finish_eval(totals) -> Dict[str, float]:
  """Means from summed eval metrics (fetched to the host)."""
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count, "count": int(count)}


def device_memory_bytes(mesh) -> Optional[int]:
  """Memory of one local device of `mesh`: its allocator limit on accelerators; on CPU the physical RAM
  divided by the local CPU devices (they share it). None if unknown."""
  device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None
  local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  return ram // max(local, 1)


def _memory_share(config) -> float:
  share = float(config.get("input_memory_share", DEFAULT_MEMORY_SHARE))
  if not 0 < share <= 1:
    raise UserError(f"--config.input_memory_share={share} must be in (0, 1]")
  return share


def create(config, mesh, announce: Callable[[str], None] = print,
           compiler_options: Optional[Dict[str, Any]] = None) -> Input:
  """The input of `config.input` for `mesh` ('auto': device if it fits, else host); `compiler_options`
  go to every jit it makes; `announce` prints progress lines (e.g. writing the array cache)."""
  mode = config.get("input", "auto") or "auto"
  if mode not in MODES:
    raise UserError(f"--config.input={mode!r} is not one of {list(MODES)}")
  if mode == "host":
    from cnn_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.HostInput(config, mesh, compiler_options, announce)
  if str(config.get("eval_split") or "").startswith("holdout:"):
    # A hold-out of a folder's train split is drawn by the host pipeline (datasets.py).
    if mode == "device":
      raise UserError("--config.eval_split=holdout:... is drawn by the host pipeline; use --config.input=host "
                      "(or auto), or name an eval folder")
    from cnn_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.HostInput(config, mesh, compiler_options, announce)
  from cnn_jax.data import device_input  # pylint: disable=g-import-not-at-top
  plan = device_input.plan(config, mesh)
  budget = device_memory_bytes(mesh)
  share = _memory_share(config)
  fits = budget is None or plan.bytes_per_device <= share * budget
  if not fits:
    need = (f"{plan.describe()} needs {plan.bytes_per_device / 2**30:.2f} GiB on each device, more than "
            f"input_memory_share={share:g} of its {budget / 2**30:.1f} GiB "
            f"({share * budget / 2**30:.2f} GiB)")
    if mode == "device":
      raise UserError(f"--config.input=device: {need}; use --config.input=host (tf.data), a smaller "
                      "--config.array_cache_res or train_split, or raise --config.input_memory_share")
    logging.info("input: host (%s)", need)
    announce(f"Input: host tf.data pipeline ({need}).")
    from cnn_jax.data import host_input  # pylint: disable=g-import-not-at-top
    return host_input.HostInput(config, mesh, compiler_options, announce)
  return device_input.DeviceInput(config, mesh, plan, announce=announce, compiler_options=compiler_options)


def describe_bytes(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


