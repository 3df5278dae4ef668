"""Where the loop's numbers go: JSON lines, TensorBoard events, and a live progress line (process 0)."""

import json
import os
import sys
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


def progress_line(step: int, total: int, loss: float, img_per_s: float, eta_s: float,
                  extra: str = "") -> str:
  """'step 120/4680 (2.6%) loss 0.4123 | 812 img/s | ETA 5m32s'."""
  eta = f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m" if eta_s >= 3600 else \
      f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
  return (f"step {step}/{total} ({100 * step / max(total, 1):.1f}%) loss {loss:.4f} | "
          f"{img_per_s:.0f} img/s | ETA {eta}{' | ' + extra if extra else ''}")


def print_progress(line: str, final: bool = False) -> None:
  """Rewrites one terminal line when attached to a TTY, else prints each update on its own line."""
  if sys.stdout.isatty():
    sys.stdout.write("\r" + line + ("\n" if final else ""))
  else:
    sys.stdout.write(line + "\n")
  sys.stdout.flush()
