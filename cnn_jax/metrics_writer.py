"""Where the loop's numbers go: JSON lines and TensorBoard events (the terminal's progress: cnn_jax/console.py)."""

import json
import os
import time
from typing import Any, Dict


def _to_builtin(x):
  try:
    return x.item()
  except AttributeError:
    return x


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`); no-op if not enabled."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      from flax.metrics import tensorboard as flax_tb  # pylint: disable=g-import-not-at-top
      self._tb = flax_tb.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, split: str, step: int, values: Dict[str, Any]) -> None:
    """One record {"split", "step", **values}; scalars also go to TensorBoard as `split/name`."""
    if not self.enabled:
      return
    record = {"split": split, "step": int(step), "time": time.time()}
    record.update({k: _to_builtin(v) for k, v in values.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("split", "step", "time") and isinstance(v, (int, float)):
          self._tb.scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
