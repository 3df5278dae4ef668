"""The run's folder: checked writable, locked against a second run, JSON files replaced atomically."""

import fcntl
import json
import os
import socket

from cnn_jax import signals
from cnn_jax.errors import UserError


def prepare(workdir: str) -> bool:
  """Creates `workdir` if needed (True when this call created it); UserError if it cannot be written (a
  file, read-only, no permission)."""
  created = not os.path.exists(workdir)
  if not created and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is a file, not a folder; pass another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from e
  return created


def write_json(path: str, obj) -> None:
  """Writes `obj` to `path` through a temporary file and a rename: never half a file, also on a signal."""
  tmp = path + ".tmp"
  with signals.no_exit():
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str):
  """The JSON object in `path`, or None if it is missing or not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class Lock:
  """An exclusive lock on `<workdir>/.lock` (process 0): two runs writing one workdir corrupt each other.

  flock is released by the kernel when the process dies, even by kill -9, so a lock is never stale. A run
  refused for bad input (a UserError) takes back what it made and left empty: the lock file, new empty folders
  (e.g. checkpoints/), and the workdir itself when `created` (the run made it) and nothing else is in it.
  """

  def __init__(self, workdir: str, enabled: bool = True, created: bool = False):
    self._path = os.path.join(workdir, ".lock")
    self._enabled = enabled
    self._created = created
    self._file = None

  def __enter__(self):
    if not self._enabled:
      return self
    self._before = set(os.listdir(os.path.dirname(self._path)))
    self._file = open(self._path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      self._file = None
      raise UserError(f"workdir {os.path.dirname(self._path)} is in use by another run ({holder}); wait for "
                      "it to finish or stop it, or pass another --workdir") from e
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
    self._file.flush()
    return self

  def __exit__(self, exc_type, exc, tb):
    if self._file is None:
      return
    refused = exc_type is not None and issubclass(exc_type, UserError)
    workdir = os.path.dirname(self._path)
    if refused and ".lock" not in self._before:
      os.remove(self._path)  # while the lock is held: no other run is between its open and its flock
    self._file.close()  # releases the flock
    self._file = None
    if not refused:
      return
    new = [os.path.join(workdir, n) for n in set(os.listdir(workdir)) - self._before]
    for path in new + ([workdir] if self._created else []):
      try:
        os.rmdir(path)  # empty folders only: anything with content stays
      except OSError:
        pass
