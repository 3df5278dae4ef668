"""The loop's periodic work, one small object each, with one interface (in the spirit of clu's periodic_actions).

  hook.after_step(step, state, metrics) -> None, or a reason to stop the run before the next step
  hook.at_end(step, state, stopped)       once, after the last step (stopped: the reason, or None)

`step` counts the steps done (1 after the first). The loop calls the hooks in order, so a later hook sees
what an earlier one did at the same step:
  LogTrain         every `log_every_steps`: fetches the interval's metrics, stops on NaN/Inf, watches for
                   divergence, writes the mean and moves the progress bar
  Evaluate         every `eval_every_epochs` and at the last step: the eval split (and `eval_train_split`),
                   the best so far; a stop request abandons an eval in progress (nothing is recorded)
  SaveCheckpoint   every `checkpoint_every_steps`, after each eval (with its top-1) and at the end
Each keeps its own state; they share nothing but what they are given.
"""

import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import divergence
from cnn_jax import pacing
from cnn_jax import perf
from cnn_jax.data import input_api


class NonFiniteError(RuntimeError):
  """Loss, gradient norm or parameters became NaN/Inf; the message names the first bad step and the way back."""


class LogTrain:
  """Fetches the pending train metrics at log steps (one device sync per interval), checks and writes them."""

  def __init__(self, *, every: int, total_steps: int, batch_size: int, steps_per_epoch: int, step_flops: float,
               dtype, writer, progress, monitor: divergence.DivergenceMonitor, advice: Callable[[int], str],
               is_main: bool):
    self.every, self.total_steps, self.batch_size = every, total_steps, batch_size
    self.steps_per_epoch, self.step_flops, self.dtype = steps_per_epoch, step_flops, dtype
    self.writer, self.progress, self.monitor, self.advice = writer, progress, monitor, advice
    self.is_main = is_main
    self.pending: List[Tuple[int, Dict[str, jax.Array]]] = []
    self.train_time = 0.0   # seconds spent training (evals excluded), for the summary's img/s
    self._t_interval = time.time()

  def after_step(self, step, state, metrics):
    del state
    self.pending.append((step, metrics))
    if step % self.every == 0 or step == self.total_steps:
      self.flush(step)

  def exclude(self, seconds: float) -> None:
    """Time the interval must not count as training (an eval ran inside it)."""
    self._t_interval += seconds

  def flush(self, step: int) -> None:
    """Fetches the pending metrics, stops on NaN/Inf, logs the mean over the interval."""
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    fetched = jax.device_get([m for _, m in self.pending])
    for s, m in zip(steps, fetched):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise NonFiniteError(f"loss or gradient became non-finite at step {s} (loss={m['loss']}, grad_norm="
                             f"{m['grad_norm']}); {self.advice(self.monitor.first_bad_step(s))}")
    diverged = self.monitor.update(steps, [float(m["loss"]) for m in fetched])
    if diverged:
      advice = self.advice(diverged["step"])  # on every process: it waits for the saves
      if self.is_main:
        print(f"warning: the training loss exploded at step {diverged['step']} (mean "
              f"{diverged['interval_loss']:.4g} over the log interval, best before {diverged['best_loss']:.4g}): "
              f"the run is diverging; {advice}", file=sys.stderr, flush=True)
    dt = time.time() - self._t_interval
    self.train_time += dt
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    img_s = len(fetched) * self.batch_size / dt
    mean.update(img_per_s=img_s, epoch=step / self.steps_per_epoch,
                mfu=perf.mfu(self.step_flops, dt / len(fetched), jax.devices(), self.dtype))
    self.writer.write("train", step, mean)
    self.progress.update(step, mean["loss"], img_s)
    self.pending.clear()
    self._t_interval = time.time()

  def at_end(self, step, state, stopped):
    del state, stopped
    self.flush(step)


class Abandoned(int):
  """What `evaluate` returns for an eval that a stop request ended: the number of batches it had dispatched."""


def evaluate(eval_program, inp: input_api.Input, state, split: Optional[str] = None,
             stop=None):
  """Means over every example of the eval split (or `split`), or Abandoned(batches dispatched) when `stop`
  asked to stop meanwhile.

  At most two eval batches are queued on the devices (as train steps are), so an abandoned eval ends
  within about a batch of the request; all processes abandon at the same batch.
  """
  pacer = pacing.DispatchBound(depth=2)
  totals = None
  for i, args in enumerate(inp.eval_args(split)):
    pacer.wait_for_room()
    if stop is not None and stop.eval_should_stop(i):
      return Abandoned(i)
    sums = eval_program(state, args)
    pacer.dispatched(sums)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return input_api.finish_eval(totals)


class Evaluate:
  """Evaluates at eval steps and at the last step; keeps the latest result and the best."""

  def __init__(self, *, every: int, total_steps: int, steps_per_epoch: int, run_eval: Callable,
               train_eval_split: str, stop, log: LogTrain, writer, progress,
               best: Optional[Dict[str, Any]] = None):
    self.every, self.total_steps, self.steps_per_epoch = every, total_steps, steps_per_epoch
    self.run_eval, self.train_eval_split, self.stop = run_eval, train_eval_split, stop
    self.log, self.writer, self.progress = log, writer, progress
    self.best = {"top1": -1.0, "top5": -1.0, "step": None, **(best or {})}
    self.last: Optional[Dict[str, float]] = None
    self.last_train_eval: Optional[Dict[str, float]] = None
    self.last_step: Optional[int] = None  # the step of the latest complete eval

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.total_steps

  def after_step(self, step, state, metrics):
    del metrics
    if not self.due(step):
      return None
    self.log.flush(step)
    t_eval = time.time()
    try:
      return self._evaluate(step, state)
    finally:
      self.log.exclude(time.time() - t_eval)  # eval time is not train time

  def _evaluate(self, step, state):
    epoch = step / self.steps_per_epoch
    self.progress.evaluating()
    result = self.run_eval(state, None, self.stop)
    if isinstance(result, Abandoned):
      return self._abandoned(step, "eval", result)
    self.progress.evaluated(step, epoch, result)
    if result["top1"] > self.best["top1"]:
      self.best = {"top1": result["top1"], "top5": result["top5"], "step": step}
    self.writer.write("eval", step, {**result, "epoch": epoch})
    if self.train_eval_split:
      train_eval = self.run_eval(state, self.train_eval_split, self.stop)
      if isinstance(train_eval, Abandoned):
        return self._abandoned(step, "train_eval", train_eval)
      self.progress.evaluated(step, epoch, train_eval, name=self.train_eval_split)
      self.writer.write("train_eval", step, {**train_eval, "epoch": epoch})
      self.last_train_eval = train_eval
    self.last, self.last_step = result, step
    return None

  def _abandoned(self, step: int, split: str, batches: Abandoned) -> str:
    """Records (metrics.jsonl only) that the eval of `step` was abandoned and after how many batches; the
    stop's reason."""
    self.writer.write("eval_abandoned", step, {"of": split, "batches": int(batches)}, tensorboard=False)
    return self.stop.requested or "a signal to another process"

  def at_end(self, step, state, stopped):
    del step, state, stopped


class SaveCheckpoint:
  """Saves the state every `every` steps, after each complete eval (with its top-1) and at the end; never a
  non-finite state, never the same step twice."""

  def __init__(self, *, every: int, total_steps: int, manager, meta: Callable[[int], Dict[str, Any]],
               log: LogTrain, evaluate_hook: Evaluate, advice: Callable[[int], str], saved_step: Optional[int]):
    self.every, self.total_steps, self.manager, self.meta = every, total_steps, manager, meta
    self.log, self.evaluate_hook, self.advice = log, evaluate_hook, advice
    self.saved_step = saved_step

  def after_step(self, step, state, metrics):
    del metrics
    if step % self.every == 0 or step == self.total_steps or self.evaluate_hook.last_step == step:
      self.save(step, state)

  def save(self, step: int, state) -> None:
    if self.saved_step == step:
      return
    self.log.flush(step)  # a NaN loss is reported as such, before the parameters are checked
    if not all_finite(state.params):
      raise NonFiniteError(f"parameters became non-finite at step {step} (loss and gradients were finite); "
                           f"{self.advice(self.log.monitor.first_bad_step(step + 1))}")
    ev = self.evaluate_hook
    metrics = {"top1": ev.last["top1"]} if ev.last_step == step else None
    ckpt_lib.save(self.manager, state, self.meta(step), metrics=metrics)
    self.saved_step = step

  def at_end(self, step, state, stopped):
    if stopped and step > (self.saved_step or 0):
      self.save(step, state)
    ckpt_lib.wait(self.manager)


def all_finite(tree) -> bool:
  """True if every floating array of `tree` is finite (one small jitted reduction, fetched to the host)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.device_get(_all_finite_jit(leaves)))


@jax.jit
def _all_finite_jit(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def wait_quietly(manager) -> None:
  """Waits for a background save; its error is logged, not raised (another error is already in flight)."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: a background checkpoint save failed too: {e}", file=sys.stderr, flush=True)


def last_good_advice(manager, workdir: str, bad_step: int, learning_rate: float, safe_learning_rate: float) -> str:
  """Where to go back to after the loss went bad at `bad_step`, as flags that work when added as printed.

  Checkpoint c holds the parameters that produced the loss of step c + 1, so the last good one is at most
  bad_step - 2, and none marked as diverged (cnn_jax.divergence) counts.
  """
  wait_quietly(manager)
  good = ckpt_lib.last_good_step(manager, bad_step - 2)
  return divergence.advice(workdir, good, learning_rate, safe_learning_rate)
