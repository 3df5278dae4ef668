"""The training loop: create state -> restore -> loop {step, log, eval, save} -> summary.

Reads top to bottom. All I/O (data, checkpoints, metrics files) happens here; the step functions in
`cnn_jax.steps` are pure and run under one `jax.jit` over a `Mesh` of every device of every process.
"""

import functools
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import console
from cnn_jax.data import inputs as inputs_lib
from cnn_jax import models
from cnn_jax.models import summary as model_summary
from cnn_jax import ops
from cnn_jax import perf
from cnn_jax import predict as predict_lib
from cnn_jax import recovery
from cnn_jax import sharding as shd
from cnn_jax import steps as steps_lib
from cnn_jax.errors import UserError
from cnn_jax.fingerprint import architecture, fingerprint
from cnn_jax import metrics_writer
from cnn_jax.metrics_writer import MetricsWriter

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteError(RuntimeError):
  """Loss or gradient norm became NaN/Inf; the message names the first bad step."""


class _WorkdirLock:
  """An exclusive lock on `<workdir>/.lock` (process 0): two runs writing one workdir corrupt each other.

  flock is released by the kernel when the process dies, even by kill -9, so a lock is never stale.
  """

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, ".lock")
    self._file = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    import fcntl  # pylint: disable=g-import-not-at-top
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

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()  # releases the flock
      self._file = None


def _identity(config, num_classes: int) -> Dict[str, Any]:
  return {"model": config.model, "num_classes": num_classes,
          "model_kwargs": config.model_kwargs.to_dict(), "image_size": config.image_size}


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with recovery.no_exit():  # a signal during set-up exits the process, but not half-way through this
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from e


def _last_good(manager, workdir: str, bad_step: int) -> str:
  """Where to go back to after the loss went bad at `bad_step`, as advice that works.

  Checkpoint c holds the parameters that produced the loss of step c + 1, so the last good one is at most
  bad_step - 2, and none marked as diverged (recovery.DivergenceMonitor) counts.
  """
  _wait_quietly(manager)
  good = ckpt_lib.last_good_step(manager, bad_step - 2)
  if good is None:
    return ("no good checkpoint was written before it: start again with --config.restore_step=0 (the "
            "checkpoints are moved aside, not deleted) and a lower --config.optimizer.learning_rate")
  where = os.path.join(os.path.abspath(workdir), "checkpoints", str(good))
  return (f"the last good checkpoint is step {good}: rerun with --config.restore_step={good} and a lower "
          f"--config.optimizer.learning_rate, or clip gradients in a new --workdir with "
          f"--config.init_from={where} --config.optimizer.grad_clip_norm=1")


def _wait_quietly(manager) -> None:
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("a background checkpoint save failed too: %s", e)


def _check_loop_config(config) -> None:
  """UserError for loop settings that cannot work (instead of a ZeroDivisionError mid-run)."""
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    value = config.get(field)
    if not isinstance(value, int) or value < 1:
      raise UserError(f"--config.{field}={value!r} must be a whole number >= 1")
  if not config.eval_every_epochs > 0:
    raise UserError(f"--config.eval_every_epochs={config.eval_every_epochs!r} must be > 0")
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    raise UserError("set --config.num_epochs > 0 or --config.num_train_steps > 0")
  for field in ("batch_size", "eval_batch_size"):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"--config.{field}={value!r} must be a whole number >= 1 (the global batch)")
  lr = config.optimizer.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr >= 0):
    raise UserError(f"--config.optimizer.learning_rate={lr!r} must be a finite number >= 0")
  restore_step = config.get("restore_step", -1)
  if isinstance(restore_step, bool) or not isinstance(restore_step, int) or restore_step < -1:
    raise UserError(f"--config.restore_step={restore_step!r} must be -1 (the newest checkpoint), 0 (start "
                    "afresh) or a checkpoint's step")


def build_model(config, num_classes: int):
  """The configured model with its compute dtype."""
  if config.dtype not in _DTYPES:
    raise UserError(f"--config.dtype={config.dtype!r} is not one of {sorted(_DTYPES)}")
  kwargs = dict(config.model_kwargs.to_dict())
  return models.get_model(config.model, num_classes, dtype=_DTYPES[config.dtype], **kwargs)


def _all_finite(tree) -> bool:
  """True if every array of `tree` is finite (one small jitted reduction, fetched to the host)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.device_get(_all_finite_jit(leaves)))


@jax.jit
def _all_finite_jit(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains `config.model` on `config.dataset`; writes metrics/checkpoints to `workdir`; returns the summary.

  Restarting with the same config and workdir resumes from the newest complete checkpoint; on CPU the
  resumed run ends bit-identical to an uninterrupted one. SIGTERM/SIGINT finish the current step, save and
  return {'stopped': signal name, 'step': step}. NaN/Inf raises NonFiniteError (last good checkpoint kept).

  BatchNorm statistics are computed over the GLOBAL batch (all devices of all processes): the step is
  one jit over a batch sharded on the `data` mesh axis, and XLA reduces the per-channel moments across
  devices, so a run's numbers do not depend on the device count (pmap-era code used per-device statistics).
  """
  _prepare_workdir(workdir)
  # Before the (possibly long) set-up: a signal then ends the process cleanly (command line) or the run
  # before its first step (in-process); see cnn_jax.recovery.
  stop = recovery.StopRequest.for_run(workdir)
  try:
    with _WorkdirLock(workdir):
      return _train_and_evaluate(config, workdir, stop)
  finally:
    stop.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: recovery.StopRequest) -> Dict[str, Any]:
  t_start = time.time()
  is_main = jax.process_index() == 0
  config = config.copy_and_resolve_references()
  if not config.get("cache_dir"):
    config.cache_dir = workdir  # dataset statistics (PCA lighting, mean/std) are cached with the run

  # --- Set-up: mesh, data, model, optimiser ---------------------------------------------------
  _check_loop_config(config)
  mesh = shd.make_mesh()
  console.say(console.backend_line())
  shd.check_batch_size(config.batch_size, mesh)
  shd.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  # Cheap checks of the model first, so a typo is reported before any data is touched.
  models.check_input_size(config.model, config.image_size, **config.model_kwargs.to_dict())
  # The input mode (config.input): tf.data on the host, or the split resident on the devices.
  # On the CPU, ops.compiler_options() turns off XLA's YNNPACK convolutions (1.5-2.5x slower per step
  # here, see cnn_jax/ops); elsewhere it is empty.
  console.say(f"data: {config.dataset}")
  inp = inputs_lib.create(config, mesh, announce=console.say, compiler_options=ops.compiler_options())
  config.input = inp.mode  # 'auto' resolved: the fingerprint records the mode that ran
  info = inp.info
  model = build_model(config, info.num_classes)

  # Each process reads its own 1/process_count of the split and drops its last partial batch.
  steps_per_epoch = inp.steps_per_epoch
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else max(1, int(config.num_epochs * steps_per_epoch)))
  schedule = steps_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = steps_lib.make_optimizer(config, schedule)

  replicated = shd.replicated(mesh)
  image_shape = (config.image_size, config.image_size, 3)
  init_fn = steps_lib.jit_init(model, tx, image_shape, out_shardings=replicated)
  console.say(f"initialising {config.model} ({config.image_size} px, {info.num_classes} classes)")
  state = init_fn(jax.random.PRNGKey(config.seed))
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

  # --- Restore: this workdir's latest checkpoint, else `init_from` -------------------------------
  identity = _identity(config, info.num_classes)
  fp = fingerprint(config)
  identity_soft = {**identity, "dataset": info.name, "fingerprint_fields": fp["fields"],
                   "config": config.to_json_best_effort()}
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints,
                                  async_save=config.get("checkpoint_async", True))
  state, meta, lineage = ckpt_lib.restore_latest(
      manager, state, identity_soft, workdir, restore_step=config.get("restore_step", -1),
      allow_config_change=bool(config.get("allow_config_change", False)))
  start_step = int(jax.device_get(state.step))
  if is_main:
    metrics_writer.rewind(workdir, start_step)  # also when nothing was restored: no record twice
  if meta is not None:
    logging.info("resumed from step %d in %s", start_step, workdir)
    if meta.get("num_processes", jax.process_count()) != jax.process_count():
      # Each process shuffles its own slice of the split, so the batches from here on differ from
      # those the original process count would have drawn (still every example once per epoch).
      logging.warning("resuming a %d-process run with %d processes: the input order changes",
                      meta["num_processes"], jax.process_count())
    if is_main:
      print(f"Resuming {workdir} from step {start_step}.", flush=True)
  elif config.get("init_from"):
    state = ckpt_lib.init_from(state, config.init_from)

  # All prediction needs, so that it never opens the dataset.
  inference = predict_lib.inference_record(config, info, inp.channels, inp.mean_std)
  run_info = {
      "input": inp.mode, "model": config.model, "model_kwargs": config.model_kwargs.to_dict(), "dataset": info.name,
      "num_classes": info.num_classes, "class_names": list(info.class_names or []),
      "num_train": info.num_train, "num_eval": info.num_eval,
      "params": n_params, "image_size": config.image_size, "dtype": config.dtype,
      "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "num_devices": jax.device_count(), "num_processes": jax.process_count(),
      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
      "fingerprint": recovery.run_fingerprint(fp["hash"], lineage), "fingerprint_fields": fp["fields"],
      "architecture": architecture(config),
      "layer_order": list(steps_lib.layers(state.params)),
      **inference, **lineage,
  }

  # --- Compile the steps over the mesh ----------------------------------------------------------
  step_fn = functools.partial(steps_lib.train_step, label_smoothing=config.optimizer.label_smoothing,
                              schedule=schedule,
                              log_layer_grad_norms=bool(config.get("log_grad_norms", False)))
  console.say(f"compiling the train step ({config.model}, batch {config.batch_size}, "
              f"{config.image_size} px, {inp.mode} input)")
  t_compile = time.time()
  train_step = inp.train_step(step_fn, state, start_step)
  console.say(f"compiled in {time.time() - t_compile:.1f}s")
  # FLOPs of the network's step (on accelerators counted on the host CPU: cuDNN convs count 0 there).
  step_flops = perf.step_flops(train_step.compiled, jax.device_count(), jax.jit(step_fn), state,
                               train_step.batch_spec)
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  fwd_flops = model_summary.flops_per_example(model, shapes({"params": state.params, **(
      {"batch_stats": state.batch_stats} if state.batch_stats is not None else {})}), config.image_size)
  run_info.update(train_flops_per_step=step_flops, flops_per_example=fwd_flops)

  if is_main:
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    _write_json(os.path.join(workdir, "run_info.json"), run_info)
    print(f"{config.model}: {n_params:,} params, {fwd_flops / 1e9:.3f} GFLOPs/image (forward), "
          f"{info.name} {info.num_train:,} train / {info.num_eval:,} eval, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, {total_steps} steps", flush=True)
    console.say(f"Input: {inp.describe()}.")
    cost = console.cpu_cost_warning(config.model, config.model_kwargs.geometry, config.image_size,
                                    total_steps - start_step, step_flops, config.dtype)
    if cost:
      console.warn(cost)
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = console.Progress(total_steps, start_step, enabled=is_main and config.progress)

  # --- The loop ---------------------------------------------------------------------------------
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  pending = []   # (step, device metrics) since the last log: fetched together to avoid a sync per step
  best = {"top1": -1.0, "top5": -1.0, "step": None}
  if meta is not None and isinstance(meta.get("best"), dict):
    best.update(meta["best"])  # the best eval before the interruption still counts
  last_saved = start_step if meta is not None else None
  last_eval = None
  t_log, n_log, train_time = time.time(), 0, 0.0
  step = start_step
  stopped_by = None
  # Accuracy on (part of) the training split with eval preprocessing (no augmentation, no dropout):
  # the train side of the train-test gap the overfitting ablations compare.
  train_eval_split = config.get("eval_train_split") or None
  last_train_eval = None
  monitor = recovery.DivergenceMonitor(info.num_classes, (meta or {}).get("divergence"))
  pacer = recovery.DispatchBound(depth=2)

  def meta_now(step):
    return {**identity, "step": step, "pipeline": {"seed": config.seed, "next_step": step},
            "fingerprint": fp["hash"], "fingerprint_fields": fp["fields"], "dataset": info.name,
            "best": best,
            "num_processes": jax.process_count(), "config": config.to_json_best_effort(),
            "divergence": monitor.record(), "lineage": lineage, "inference": inference}

  def save_checkpoint(step, metrics=None):
    """Saves the state after `step` unless already saved; never a non-finite one."""
    nonlocal last_saved
    if last_saved == step:
      return
    flush_metrics(step)
    if not _all_finite(state.params):
      raise NonFiniteError(
          f"parameters became non-finite at step {step} (loss and gradients were finite); "
          f"{_last_good(manager, workdir, monitor.first_bad_step(step + 1))}")
    ckpt_lib.save(manager, state, meta_now(step), metrics=metrics)
    last_saved = step

  def flush_metrics(step):
    """Fetches pending metrics, stops on NaN/Inf, logs the mean over the interval."""
    nonlocal t_log, n_log, train_time
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise NonFiniteError(
            f"loss or gradient became non-finite at step {s} (loss={m['loss']}, grad_norm="
            f"{m['grad_norm']}); {_last_good(manager, workdir, monitor.first_bad_step(s))}")
    diverged = monitor.update([s for s, _ in pending], [float(m["loss"]) for m in fetched])
    if diverged:
      advice = _last_good(manager, workdir, diverged["step"])  # on every process: it waits for the saves
      if is_main:
        print(f"warning: the training loss exploded at step {diverged['step']} (mean "
              f"{diverged['interval_loss']:.4g} over the log interval, best before "
              f"{diverged['best_loss']:.4g}): the run is diverging; {advice}", file=sys.stderr, flush=True)
    dt = time.time() - t_log
    train_time += dt
    n = len(pending)
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    img_s = n * config.batch_size / dt
    mean.update(img_per_s=img_s, epoch=step / steps_per_epoch,
                mfu=perf.mfu(step_flops, dt / n, jax.devices(), config.dtype))
    writer.write("train", step, mean)
    progress.update(step, mean["loss"], img_s)
    pending.clear()
    n_log = 0
    t_log = time.time()

  stop.enter_loop()
  try:
    while step < total_steps:
      train_step.prepare(step)
      # Step t waits for step t-2 (its input is ready first, so the devices keep one step queued): a
      # stop acts within about one step.
      pacer.wait_for_room()
      stopped_by = stop.should_stop(step, config.log_every_steps)
      if stopped_by:
        break
      state, metrics = train_step(state, step)
      pacer.dispatched(metrics)
      step += 1
      if step == start_step + 1:
        progress.first_step(metrics, config.log_every_steps)
      pending.append((step, metrics))
      if step % config.log_every_steps == 0 or step == total_steps:
        flush_metrics(step)
      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        flush_metrics(step)
        t_eval = time.time()
        progress.evaluating()
        last_eval = inp.evaluate(steps_lib.eval_step, state)
        progress.evaluated(step, step / steps_per_epoch, last_eval)
        if last_eval["top1"] > best["top1"]:
          best = {"top1": last_eval["top1"], "top5": last_eval["top5"], "step": step}
        writer.write("eval", step, {**last_eval, "epoch": step / steps_per_epoch})
        if train_eval_split:
          last_train_eval = inp.evaluate(steps_lib.eval_step, state, split=train_eval_split)
          progress.evaluated(step, step / steps_per_epoch, last_train_eval, name=train_eval_split)
          writer.write("train_eval", step, {**last_train_eval, "epoch": step / steps_per_epoch})
        t_log += time.time() - t_eval  # eval time is not train time
      if step % config.checkpoint_every_steps == 0 or is_eval or step == total_steps:
        save_checkpoint(step, metrics={"top1": last_eval["top1"]} if is_eval else None)
    flush_metrics(step)
    if stopped_by and step > start_step:
      save_checkpoint(step)
  except BaseException:
    _wait_quietly(manager)  # a failed background save must not hide the error in flight
    raise
  else:
    ckpt_lib.wait(manager)
  finally:
    progress.close()
    stop.leave_loop()
    writer.close()

  if stopped_by:
    if is_main:
      where = (f"checkpoint of step {step} is in {os.path.join(workdir, 'checkpoints')}" if step > 0
               else "no step was taken, so there is no checkpoint")
      print(f"\nStopped by {stopped_by} after step {step}; {where}. Run the same command to resume.",
            flush=True)
    return {"stopped": stopped_by, "step": step}

  if last_eval is None:  # resumed a finished run: evaluate the final state again for the summary
    last_eval = inp.evaluate(steps_lib.eval_step, state)
    if train_eval_split:
      last_train_eval = inp.evaluate(steps_lib.eval_step, state, split=train_eval_split)
  summary = {
      "model": config.model, "dataset": info.name, "params": n_params,
      "gflops_per_image": fwd_flops / 1e9, "final_top1": last_eval["top1"],
      "final_top5": last_eval["top5"], "final_loss": last_eval["loss"],
      "best_top1": max(best["top1"], last_eval["top1"]),
      "best_top5": best["top5"] if best["top1"] >= last_eval["top1"] else last_eval["top5"],
      "best_step": best["step"] or step, "steps": step, "eval_examples": last_eval["count"],
      "train_img_per_s": (step - start_step) * config.batch_size / train_time if train_time else None,
      "wall_s": time.time() - t_start, "device_kind": run_info["device_kind"],
      "num_devices": run_info["num_devices"], "fingerprint": run_info["fingerprint"],
      "diverged": monitor.diverged, **lineage,
  }
  if last_train_eval is not None:
    summary.update(train_eval_split=train_eval_split, train_eval_top1=last_train_eval["top1"],
                   train_eval_loss=last_train_eval["loss"],
                   gap_top1=last_train_eval["top1"] - last_eval["top1"])
  if is_main:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"\nDone: {config.model} on {info.name}: top-1 {summary['final_top1']:.4f}, "
          f"top-5 {summary['final_top5']:.4f} (best top-1 {summary['best_top1']:.4f} at step "
          f"{summary['best_step']}), {n_params:,} params, "
          f"{summary['train_img_per_s'] or 0:.0f} img/s, wall {summary['wall_s']:.0f}s", flush=True)
    if monitor.diverged:
      print(f"warning: the training loss diverged at step {monitor.diverged['step']} (summary.json "
            "'diverged'); these numbers are not those of a healthy run", file=sys.stderr, flush=True)
  return summary
