"""Divergence: a training loss that explodes while staying finite, and which checkpoints are still good."""

import math
import os
from typing import Any, Dict, Optional, Sequence


class DivergenceMonitor:
  """Spots a training loss that explodes while staying finite, and says which checkpoints are still good.

  The mean train loss of each log interval is compared with the lowest interval mean so far: more than
  `margin` above it is an explosion. margin = max(ln(num_classes) / 2, 0.5) nats (1.15 for 10 classes,
  3.45 for 1000): far above the interval-to-interval noise of a healthy run, far below what a diverging
  one shows (learning rate 20 on Fashion-MNIST: 2.4 -> 24.8). The first interval is compared with its
  first step's loss.

  The first explosion is kept (`diverged`: its first bad step, the interval mean and the best before it);
  checkpoints saved from then on are not "good" (`sane` is False), so the advice after a NaN or a divergence
  names a checkpoint from before it. A loss often drifts up before it explodes: intervals more than a quarter
  of the margin above the best so far are a drift (`drift_start`: where the current one began), and from its
  start on checkpoints are not claimed as good either. The record travels in the checkpoint meta (`record()`).
  """

  def __init__(self, num_classes: int, record: Optional[Dict[str, Any]] = None):
    self.margin = max(0.5 * math.log(max(int(num_classes), 2)), 0.5)
    record = record or {}
    self.best_loss: Optional[float] = record.get("best_loss")
    self.diverged: Optional[Dict[str, Any]] = record.get("diverged")
    self.drift_start: Optional[int] = record.get("drift_start")

  @property
  def sane(self) -> bool:
    """True while the run has neither diverged nor drifted up: a checkpoint saved now may be claimed as good."""
    return self.diverged is None and self.drift_start is None

  def threshold(self) -> float:
    """The interval mean above which the loss counts as exploded (inf before the first interval)."""
    return math.inf if self.best_loss is None else self.best_loss + self.margin

  def update(self, steps: Sequence[int], losses: Sequence[float]) -> Optional[Dict[str, Any]]:
    """Feeds one log interval (finite per-step losses); returns the divergence record the first time."""
    if not len(losses):  # pylint: disable=g-explicit-length-test
      return None
    mean = math.fsum(map(float, losses)) / len(losses)
    # The first interval is judged against its own first step (a fresh network's loss can be far from
    # ln(num_classes): NiN small starts at 7.7 for 10 classes).
    reference = self.best_loss if self.best_loss is not None else float(losses[0])
    limit = reference + self.margin
    if mean > limit:
      self.best_loss = reference  # an exploded interval never lowers the baseline
      if self.diverged is not None:
        return None
      first = next((s for s, l in zip(steps, losses) if l > limit), steps[-1])
      self.diverged = {"step": int(first), "interval_loss": mean, "best_loss": reference,
                       "threshold": limit}
      return self.diverged
    self.best_loss = mean if self.best_loss is None else min(self.best_loss, mean)
    if self.diverged is None:
      drifting = mean > self.best_loss + self.margin / 4
      self.drift_start = (self.drift_start or int(steps[0])) if drifting else None
    return None

  def first_bad_step(self, step: int) -> int:
    """The first step whose loss was bad, given that step `step`'s was (a divergence, or the drift up that
    led to it, may have begun earlier)."""
    bad = [step] + ([self.diverged["step"]] if self.diverged else []) + (
        [self.drift_start] if self.drift_start is not None else [])
    return min(bad)

  def record(self) -> Dict[str, Any]:
    """What a checkpoint's meta keeps, so a resumed run goes on comparing with the same history."""
    return {"best_loss": self.best_loss, "diverged": self.diverged, "drift_start": self.drift_start,
            "sane": self.sane}


def lower_learning_rate(learning_rate: float, safe_learning_rate: float) -> float:
  """The learning rate the advice after a divergence names: a tenth of the one that diverged, and no more
  than `safe_learning_rate` (the shared recipe's), so that following the advice once is enough."""
  return float(f"{min(learning_rate / 10, safe_learning_rate):.3g}")


def advice(workdir: str, good_step: Optional[int], learning_rate: float, safe_learning_rate: float) -> str:
  """The way back after the loss went bad, as flags to add to the same command (they work as printed)."""
  lr = lower_learning_rate(learning_rate, safe_learning_rate)
  if good_step is None:
    return ("no good checkpoint was written before it: start again with --config.restore_step=0 (the "
            f"checkpoints are moved aside, not deleted) --config.optimizer.learning_rate={lr}")
  where = os.path.join(os.path.abspath(workdir), "checkpoints", str(good_step))
  new_workdir = os.path.abspath(workdir).rstrip(os.sep) + f"_from{good_step}"
  return (f"the last good checkpoint is step {good_step}: rerun with --config.restore_step={good_step} "
          f"--config.optimizer.learning_rate={lr}, or start a new run from its weights with clipped gradients: "
          f"--workdir={new_workdir} --config.init_from={where} --config.optimizer.grad_clip_norm=1 "
          f"--config.optimizer.learning_rate={lr}")
