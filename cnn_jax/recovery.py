"""Stopping, pacing and divergence: the parts of the loop that decide when a run must stop or be distrusted.

  stop = StopRequest.for_run(workdir)      # SIGTERM / SIGINT -> a clean stop (or a clean exit in set-up)
  pacer = DispatchBound(depth=2)           # at most 2 train steps queued on the devices
  monitor = DivergenceMonitor(num_classes) # flags a loss that explodes without becoming NaN

Signals (the exit statuses are the shell's: 128 + the signal number):
  * during set-up (before the first step), and after the loop: the command line exits at once, from a
    watcher thread, whatever the main thread is doing (XLA compiling, TF importing, GC): one line on stderr,
    status 130 for SIGINT, 143 for SIGTERM. Nothing is half-written: checkpoints are only written by the
    loop, and the workdir's JSON files are replaced atomically inside `no_exit()`.
  * during the loop: the step in flight finishes (at most `DispatchBound.depth` steps run after the
    signal), a checkpoint is saved, status 0. A second signal exits at once (130 / 143); the previous
    checkpoint is kept and Orbax removes the unfinished one at the next start.
Raising KeyboardInterrupt from a signal handler while XLA compiled or collected garbage ended in
segmentation faults (status 139); on the command line no handler raises anything any more: the signals are
blocked in every thread and received by one thread with sigwait.
"""

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence

# No numpy/JAX imports at module level: `guard_process` must run before any library starts a thread
# (numpy's OpenBLAS starts one on import), and threads started before it do not block the signals.

EXIT_SIGINT = 130   # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Held while a file is being replaced: an exit on a signal waits for it, so no .tmp file is left behind.
_NO_EXIT = threading.Lock()
_no_exit_owner: Optional[int] = None
_deferred_exit: Optional[int] = None  # a signal that arrived in the owner's own thread, inside no_exit()
_PROCESS_GUARD: Optional["StopRequest"] = None


@contextlib.contextmanager
def no_exit():
  """Defers an exit on a signal until the block ends (for writes that must not be cut in half)."""
  global _no_exit_owner
  with _NO_EXIT:
    _no_exit_owner = threading.get_ident()
    try:
      yield
    finally:
      _no_exit_owner = None
  if _deferred_exit is not None and _PROCESS_GUARD is not None:
    _PROCESS_GUARD._exit(_deferred_exit)  # pylint: disable=protected-access


def _exit_code(signum: int) -> int:
  return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


def _say(text: str) -> None:
  """One line on stderr, written with os.write: safe from a signal handler and from any thread."""
  try:
    os.write(2, (text.rstrip("\n") + "\n").encode())
  except OSError:
    pass


class StopRequest:
  """Turns SIGTERM / SIGINT into a stop the loop polls between steps, or an exit where nothing can be saved.

  Two modes:
    * command line (`guard_process()`, installed before TensorFlow/JAX start): SIGINT and SIGTERM are
      blocked in every thread and taken by one watcher thread with sigwait, so a signal acts while the main
      thread is inside XLA. Outside the loop it exits the process (status 130 / 143) with one line. (A
      thread started before the guard still takes signals; for those a Python handler does the same from
      the main thread, once it is back from C.)
    * library (`train_and_evaluate` called in-process, e.g. by a test or a notebook): a Python handler
      records the signal; a signal during set-up stops the run before its first step, a second Ctrl-C in
      the loop raises KeyboardInterrupt. The previous handlers come back when the run ends.

  With several processes the signal of any one stops all at the same step: they compare flags (one tiny
  allgather) only at log steps, where the loop synchronises with the devices anyway, so every process runs
  the same number of collective steps and none waits forever for the others.
  """

  def __init__(self, exit_outside_loop: bool):
    self.exit_outside_loop = exit_outside_loop
    self.requested: Optional[str] = None
    self.phase = "setup"       # setup -> loop -> after
    self.context = ""          # what an exit in set-up leaves behind, for its message
    self._polled_step: Optional[int] = None
    self._multi_process = False
    self._lock = threading.RLock()
    self._old = {}

  # --- Installing ------------------------------------------------------------------------------------

  @classmethod
  def for_run(cls, workdir: str) -> "StopRequest":
    """The process guard (command line) reset for a new run, else a fresh library-mode request."""
    if _PROCESS_GUARD is not None:
      guard = _PROCESS_GUARD
      with guard._lock:
        guard.requested, guard.phase, guard._polled_step = None, "setup", None
        guard.context = f"nothing was trained, {workdir} is as it was"
      if threading.current_thread() is threading.main_thread():
        # Again: jax.distributed installs its own SIGTERM handler (its preemption notice), which would
        # swallow a SIGTERM that reaches a thread started before the guard.
        for sig in _SIGNALS:
          signal.signal(sig, guard._on_signal)
      return guard
    return cls(exit_outside_loop=False)._install_handlers()

  def _install_handlers(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._old[sig] = signal.signal(sig, self._on_signal)
    return self

  def release(self) -> None:
    """Ends the run's use: the process guard goes back to exiting on a signal; a library one uninstalls."""
    with self._lock:
      self.phase = "setup"
      self.context = ""
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  # --- The loop's side -------------------------------------------------------------------------------

  def enter_loop(self) -> None:
    """From here on a signal stops the run after the step in flight (instead of exiting at once)."""
    with self._lock:
      self.phase = "loop"  # a library-mode signal during set-up is already recorded: no first step

  def leave_loop(self) -> None:
    """The last checkpoint is complete: a signal may exit at once again."""
    with self._lock:
      self.phase = "after"

  def should_stop(self, step: int, every: int) -> Optional[str]:
    """The signal name if the run must stop before step `step` + 1; all processes get the same answer."""
    import jax  # pylint: disable=g-import-not-at-top
    self._polled_step = step
    self._multi_process = jax.process_count() > 1
    if not self._multi_process:
      name = self.requested
    elif step % every:
      return None
    else:
      import numpy as np  # pylint: disable=g-import-not-at-top
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
      name = (self.requested or "a signal to another process") if np.any(flags) else None
    return name

  # --- Receiving signals -----------------------------------------------------------------------------

  # Each signal reaches exactly one receiver: the watcher (sigwait) when every thread blocks it, else the
  # Python handler (a thread started before the guard, e.g. by a wrapper that imported TensorFlow first,
  # does not block it; the handler then runs in the main thread).

  def _on_signal(self, signum, frame):
    del frame
    self._act(signum, from_handler=True)

  def _watch(self):
    while True:
      self._act(signal.sigwait(set(_SIGNALS)), from_handler=False)

  def _act(self, signum: int, from_handler: bool) -> None:
    name = signal.Signals(signum).name
    with self._lock:
      if self.phase == "loop" and self.requested is None:
        self.requested = name
        if self._multi_process:
          where = "stopping all processes at the next log step"
        elif self._polled_step is not None:
          where = f"stopping after step {self._polled_step + 1}"
        else:
          where = "stopping before the first step"
        _say(f"{name}: {where}, then saving a checkpoint (a second signal exits at once)")
        return
      if not self.exit_outside_loop:
        if self.phase == "setup":
          self.requested = self.requested or name  # the loop stops before its first step
        elif self.phase == "loop" and signum == signal.SIGINT and from_handler:
          raise KeyboardInterrupt  # a second Ctrl-C in-process stops at once, as Python's default would
        return
    self._exit(signum)

  def _exit(self, signum: int) -> None:
    global _deferred_exit
    if _no_exit_owner == threading.get_ident():  # this thread is replacing a file: finish that first
      _deferred_exit = signum
      return
    name = signal.Signals(signum).name
    if self.phase == "loop":
      why = "again: exiting without waiting for the checkpoint in progress (the previous one is kept)"
    elif self.phase == "after":
      why = "after training: exiting (the checkpoints are complete)"
    else:
      why = f"during set-up: exiting before the first step{'; ' + self.context if self.context else ''}"
    _NO_EXIT.acquire(timeout=60)  # let an atomic file replacement finish
    _say(f"\n{name} {why} (status {_exit_code(signum)})")
    try:
      sys.stdout.flush()
    except Exception:  # pylint: disable=broad-except
      pass
    os._exit(_exit_code(signum))  # pylint: disable=protected-access


def guard_process() -> Optional[StopRequest]:
  """Command line: from now on SIGINT/SIGTERM exit cleanly outside the loop and stop it cleanly inside.

  Call first thing, from the main thread, before TensorFlow or JAX start their threads: the signals are
  blocked in this thread and every thread started later, and one watcher thread takes them with sigwait.
  Idempotent; a no-op outside the main thread.
  """
  global _PROCESS_GUARD
  if _PROCESS_GUARD is not None or threading.current_thread() is not threading.main_thread():
    return _PROCESS_GUARD
  guard = StopRequest(exit_outside_loop=True)
  _PROCESS_GUARD = guard
  for sig in _SIGNALS:  # for threads started before now, which do not block the signals
    signal.signal(sig, guard._on_signal)  # pylint: disable=protected-access
  signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
  watch = guard._watch  # pylint: disable=protected-access
  threading.Thread(target=watch, name="cnn_jax-signals", daemon=True).start()
  return guard


# --- Pacing the dispatch queue ---------------------------------------------------------------------

class DispatchBound:
  """Keeps at most `depth` train steps queued on the devices: before step t is dispatched, t - depth is done.

  JAX dispatches asynchronously: without a bound the host runs ahead of the devices (about 32 steps on the
  CPU) and a stop request waits for the whole queue. Waiting for step t-2 before dispatching t still keeps
  one step queued behind the running one, so the devices never idle for it (measured: no loss of
  throughput, see README "Reliability"). It needs only each step's metrics (any pytree of arrays the step
  returns), so it works for whatever produces the step.
  """

  def __init__(self, depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth={depth} must be >= 1")
    self.depth = depth
    self._in_flight: List[Any] = []

  def wait_for_room(self) -> None:
    """Blocks until fewer than `depth` dispatched steps are unfinished."""
    import jax  # pylint: disable=g-import-not-at-top
    while len(self._in_flight) >= self.depth:
      jax.block_until_ready(self._in_flight.pop(0))

  def dispatched(self, metrics: Any) -> None:
    """Records a just-dispatched step by its output `metrics`."""
    self._in_flight.append(metrics)


# --- Divergence -----------------------------------------------------------------------------------

class DivergenceMonitor:
  """Spots a training loss that explodes while staying finite, and says which checkpoints are still good.

  The mean train loss of each log interval is compared with the lowest interval mean so far: more than
  `margin` above it is an explosion. margin = max(ln(num_classes) / 2, 0.5) nats (1.15 for 10 classes,
  3.45 for 1000): far above the interval-to-interval noise of a healthy run, far below what a diverging
  one shows (learning rate 20 on Fashion-MNIST: 2.4 -> 24.8). The first interval is compared with its
  first step's loss.

  The first explosion is kept (`diverged`: its first bad step, the interval mean and the best before it);
  checkpoints saved from then on are not "good" (`sane` is False), so the advice after a NaN or a divergence
  names a checkpoint from before it. The record travels in the checkpoint meta (`record()`).
  """

  def __init__(self, num_classes: int, record: Optional[Dict[str, Any]] = None):
    self.margin = max(0.5 * math.log(max(int(num_classes), 2)), 0.5)
    record = record or {}
    self.best_loss: Optional[float] = record.get("best_loss")
    self.diverged: Optional[Dict[str, Any]] = record.get("diverged")

  @property
  def sane(self) -> bool:
    """True while the run has not diverged: a checkpoint saved now may be claimed as good."""
    return self.diverged is None

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
    return None

  def first_bad_step(self, step: int) -> int:
    """The first step whose loss was bad, given that step `step`'s was (the divergence may be earlier)."""
    return min(step, self.diverged["step"]) if self.diverged else step

  def record(self) -> Dict[str, Any]:
    """What a checkpoint's meta keeps, so a resumed run goes on comparing with the same history."""
    return {"best_loss": self.best_loss, "diverged": self.diverged, "sane": self.sane}


def run_fingerprint(config_hash: str, lineage: Dict[str, Any]) -> str:
  """The fingerprint a run reports: its config's, or, once the config changed mid-run, a different one
  (so report.py does not compare the run as if it had used the new values throughout)."""
  changes = lineage.get("config_changes") or []
  if not changes:
    return config_hash
  blob = json.dumps([config_hash, changes], sort_keys=True, default=str).encode()
  return "changed-" + hashlib.sha256(blob).hexdigest()[:16]
