"""SIGTERM / SIGINT: a clean stop in the loop, a clean exit anywhere else.

  stop = StopRequest.for_run(workdir)      # the loop polls stop.should_stop(step, every)

The exit statuses are the shell's (128 + the signal number):
  * during set-up (before the first step), and after the loop: the command line exits at once, from a
    watcher thread, whatever the main thread is doing (XLA compiling, TF importing, GC): one line on stderr,
    status 130 for SIGINT, 143 for SIGTERM. Nothing is half-written: checkpoints are only written by the
    loop, and the workdir's JSON files are replaced atomically inside `no_exit()`.
  * during the loop: the step in flight finishes (at most `pacing.DispatchBound.depth` steps run after the
    signal; an eval in progress is abandoned), a checkpoint is saved, status 0. A second signal exits at once
    (130 / 143); the previous checkpoint is kept and Orbax removes the unfinished one at the next start.
Raising KeyboardInterrupt from a signal handler while XLA compiled or collected garbage ends in segmentation
faults; on the command line no handler raises anything: the signals are blocked in every thread and received
by one thread with sigwait.
"""

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

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
    """The signal name if the run must stop before step `step` + 1; all processes get the same answer
    (with several processes they compare at steps that are multiples of `every` only)."""
    self._polled_step = step
    return self._agreed(step % every == 0)

  def eval_should_stop(self, batch: int, every: int = 4) -> Optional[str]:
    """During an eval: the signal name if the eval must be abandoned before its batch `batch`; all processes
    get the same answer (compared every `every` batches)."""
    return self._agreed(batch % every == 0)

  def _agreed(self, compare_now: bool) -> Optional[str]:
    import jax  # pylint: disable=g-import-not-at-top  (see the module's imports)
    self._multi_process = jax.process_count() > 1
    if not self._multi_process:
      return self.requested
    if not compare_now:
      return None
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
    return (self.requested or "a signal to another process") if np.any(flags) else None

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
