"""The config read once: a small typed spec per area, built from the ConfigDict here and nowhere else.

`configs/common.py` declares every field with its default (tests/test_config_fields.py checks that the code
reads no other); the specs copy them without defaults of their own and check what cannot work, so a typo
or an impossible value is one `error:` line before any data is touched:

  ModelSpec      the network: family, its switches, compute dtype, input size   -> cnn_jax.models
  OptimizerSpec  SGD, weight decay, clipping, loss, schedule                     -> cnn_jax.steps
  LoopSpec       length, logging, evals, checkpoints, resume                     -> cnn_jax.train
The data code reads its fields (dataset, splits, augmentation, input mode, ...) by attribute from the
config itself: they are listed in `cnn_jax/data/__init__.py`.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import jax.numpy as jnp

from cnn_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCHEDULES = ("cosine", "linear", "onecycle", "step", "constant")


def _whole(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise UserError(f"--config.{name}={value!r} must be a whole number >= {minimum}")
  return value


def _number(name: str, value, lo: float = -math.inf, hi: float = math.inf, hi_open: bool = False) -> float:
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
  if not ok:
    bound = f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}" if math.isfinite(hi) else f">= {lo:g}"
    raise UserError(f"--config.{name}={value!r} must be a finite number {bound}")
  return float(value)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """name: a cnn_jax.models name; kwargs: the family's switches (None = the family's default);
  dtype: the compute dtype's name (parameters stay float32); image_size: the square input side."""
  name: str
  kwargs: Dict[str, Any]
  dtype: str
  image_size: int

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    if config.dtype not in DTYPES:
      raise UserError(f"--config.dtype={config.dtype!r} is not one of {sorted(DTYPES)}")
    # The input size is checked against the network (cnn_jax.models.check_input_size): it knows the minimum.
    return cls(config.model, config.model_kwargs.to_dict(), config.dtype, config.image_size)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """The learning-rate schedule (cnn_jax.steps.learning_rate_schedule)."""
  name: str
  warmup_epochs: float
  step_epochs: Tuple[float, ...]
  step_factor: float


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """SGD with momentum, L2 weight decay, optional global-norm clipping, label smoothing, the schedule;
  `learning_rate` is for a global batch of 128 and scaled linearly with `batch_size`."""
  learning_rate: float
  momentum: float
  nesterov: bool
  weight_decay: float
  decay_biases: bool
  grad_clip_norm: float
  label_smoothing: float
  ema_decay: float
  batch_size: int
  schedule: ScheduleSpec

  @classmethod
  def from_config(cls, config) -> "OptimizerSpec":
    opt, sched = config.optimizer, config.schedule
    if sched.name not in SCHEDULES:
      raise UserError(f"--config.schedule.name={sched.name!r} is not one of {list(SCHEDULES)}")
    schedule = ScheduleSpec(sched.name, _number("schedule.warmup_epochs", sched.warmup_epochs, 0.0),
                            tuple(float(e) for e in sched.step_epochs),
                            _number("schedule.step_factor", sched.step_factor, 0.0))
    if sched.name in ("onecycle", "linear") and not schedule.warmup_epochs > 0:
      raise UserError(f"--config.schedule.name={sched.name} rises to its peak over --config.schedule.warmup_epochs; "
                      "set it > 0 (e.g. 0.25 epochs; for a decay from the peak at once use "
                      "--config.schedule.name=cosine)")
    return cls(
        learning_rate=_number("optimizer.learning_rate", opt.learning_rate, 0.0),
        momentum=_number("optimizer.momentum", opt.momentum, 0.0, 1.0, hi_open=True),
        nesterov=bool(opt.nesterov),
        weight_decay=_number("optimizer.weight_decay", opt.weight_decay, 0.0),
        decay_biases=bool(opt.decay_biases),
        grad_clip_norm=_number("optimizer.grad_clip_norm", opt.grad_clip_norm, 0.0),
        label_smoothing=_number("optimizer.label_smoothing", opt.label_smoothing, 0.0, 1.0, hi_open=True),
        ema_decay=_number("optimizer.ema_decay", opt.ema_decay, 0.0, 1.0, hi_open=True),
        batch_size=_whole("batch_size", config.batch_size, 1),
        schedule=schedule)

  @property
  def peak_learning_rate(self) -> float:
    """The learning rate at this global batch (linear scaling from batch 128)."""
    return self.learning_rate * self.batch_size / 128


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """How long the loop runs and what it does periodically (steps are global train steps)."""
  seed: int
  num_epochs: float
  num_train_steps: int
  batch_size: int
  eval_batch_size: int
  log_every_steps: int
  eval_every_epochs: float
  eval_train_split: str
  checkpoint_every_steps: int
  keep_checkpoints: int
  checkpoint_async: bool
  init_from: Optional[str]
  restore_step: int
  allow_config_change: bool
  progress: bool
  log_grad_norms: bool
  eval_flip: bool

  @classmethod
  def from_config(cls, config) -> "LoopSpec":
    if config.num_train_steps <= 0 and not config.num_epochs > 0:
      raise UserError("set --config.num_epochs > 0 or --config.num_train_steps > 0")
    if not (isinstance(config.eval_every_epochs, (int, float)) and config.eval_every_epochs > 0):
      raise UserError(f"--config.eval_every_epochs={config.eval_every_epochs!r} must be > 0")
    if isinstance(config.restore_step, bool) or not isinstance(config.restore_step, int) or config.restore_step < -1:
      raise UserError(f"--config.restore_step={config.restore_step!r} must be -1 (the newest checkpoint), 0 "
                      "(start afresh) or a checkpoint's step")
    for field in ("batch_size", "eval_batch_size"):
      value = config[field]
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--config.{field}={value!r} must be a whole number >= 1 (the global batch)")
    return cls(
        seed=int(config.seed), num_epochs=float(config.num_epochs), num_train_steps=int(config.num_train_steps),
        batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
        log_every_steps=_whole("log_every_steps", config.log_every_steps, 1),
        eval_every_epochs=float(config.eval_every_epochs), eval_train_split=config.eval_train_split or "",
        checkpoint_every_steps=_whole("checkpoint_every_steps", config.checkpoint_every_steps, 1),
        keep_checkpoints=_whole("keep_checkpoints", config.keep_checkpoints, 1),
        checkpoint_async=bool(config.checkpoint_async), init_from=config.init_from or None,
        restore_step=config.restore_step, allow_config_change=bool(config.allow_config_change),
        progress=bool(config.progress), log_grad_norms=bool(config.log_grad_norms),
        eval_flip=bool(config.eval_flip))

  def total_steps(self, steps_per_epoch: int) -> int:
    return self.num_train_steps if self.num_train_steps > 0 else max(1, int(self.num_epochs * steps_per_epoch))

  def eval_every_steps(self, steps_per_epoch: int) -> int:
    return max(1, int(round(self.eval_every_epochs * steps_per_epoch)))


def read(config) -> Tuple[ModelSpec, OptimizerSpec, LoopSpec]:
  """Every spec of `config` (each checks its fields): the config, read once."""
  return ModelSpec.from_config(config), OptimizerSpec.from_config(config), LoopSpec.from_config(config)
