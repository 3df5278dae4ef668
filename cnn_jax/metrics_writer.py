"""Where the loop's numbers go: JSON lines and TensorBoard events (the terminal's progress: cnn_jax/console.py)."""

import json
import os
import sys
import time
import types
from typing import Any, Dict


def _tensorboard_without_tensorflow(path: str) -> None:
  """Lets TensorBoard's file I/O use its own TensorFlow stub unless TensorFlow is already loaded.

  `tensorboard.compat.tf` imports TensorFlow whenever it is installed (5-7 s of start-up on a 2-core CPU, for a
  device-input run that never needs it); a module named `tensorboard.compat.notf` is TensorBoard's own switch to
  its stub, which reads and writes local files the same way. Remote paths (gs://...) keep TensorFlow's file
  systems.
  """
  if sys.modules.get("tensorflow") is not None or "://" in path:
    return
  sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def _to_builtin(x):
  try:
    return x.item()
  except AttributeError:
    return x


class TensorBoardWriter:
  """Scalar summaries in TensorBoard event files, written with the `tensorboard` package alone (flax's
  writer imports TensorFlow, which a device-input run never loads)."""

  def __init__(self, logdir: str):
    _tensorboard_without_tensorflow(logdir)
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    self._logdir = logdir
    self._writer = EventFileWriter(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def rewind_tensorboard(logdir: str, step: int) -> int:
  """Drops the events after `step` from every event file in `logdir` (rewriting the files that have
  any), so a resumed run's TensorBoard shows each step once. Returns the number of events dropped."""
  if not os.path.isdir(logdir):
    return 0
  _tensorboard_without_tensorflow(logdir)
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
  dropped = 0
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name or name.endswith(".tmp"):
      continue
    path = os.path.join(logdir, name)
    try:
      events = list(event_file_loader.EventFileLoader(path).Load())
    except Exception:  # pylint: disable=broad-except  (a file torn by kill -9 keeps what reads)
      events = []
    kept = [e for e in events if not e.HasField("summary") or e.step <= step]
    if len(kept) == len(events):
      continue
    dropped += len(events) - len(kept)
    with open(path + ".tmp", "wb") as f:
      writer = RecordWriter(f)
      for event in kept:
        writer.write(event.SerializeToString())
      writer.flush()
    os.replace(path + ".tmp", path)
  return dropped


def rewind(workdir: str, step: int) -> None:
  """Drops every record after `step` from `<workdir>/metrics.jsonl` and its TensorBoard events: a resumed
  run writes them again, so no step appears twice in either."""
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except ValueError:
        pass  # a line torn by kill -9
    if len(kept) != len(lines):
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
  rewind_tensorboard(os.path.join(workdir, "tb"), step)


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tb`); no-op if not enabled."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self._path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      self._tb = TensorBoardWriter(os.path.join(workdir, "tb"))

  def write(self, split: str, step: int, values: Dict[str, Any], tensorboard: bool = True) -> None:
    """One record {"split", "step", **values}; scalars also go to TensorBoard as `split/name` (unless not
    `tensorboard`)."""
    if not self.enabled:
      return
    record = {"split": split, "step": int(step), "time": time.time()}
    record.update({k: _to_builtin(v) for k, v in values.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None and tensorboard:
      for k, v in record.items():
        if k not in ("split", "step", "time") and isinstance(v, (int, float)):
          self._tb.scalar(f"{split}/{k}", v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
