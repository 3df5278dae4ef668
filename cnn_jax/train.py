"""The training loop: create state -> restore -> loop {step, log, eval, save} -> summary.

Reads top to bottom. All I/O (data, checkpoints, metrics files) happens here; the step functions in
`cnn_jax.steps` are pure and run under one `jax.jit` over a `Mesh` of every device of every process.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import data as data_lib
from cnn_jax import models
from cnn_jax.models import summary as model_summary
from cnn_jax import perf
from cnn_jax import sharding as shd
from cnn_jax import steps as steps_lib
from cnn_jax.errors import UserError
from cnn_jax.fingerprint import fingerprint
from cnn_jax.metrics_writer import MetricsWriter, print_progress, progress_line

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteError(RuntimeError):
  """Loss or gradient norm became NaN/Inf; the message names the first bad step."""


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop polls between steps (the step in flight finishes)."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if self.requested is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.requested = signal.Signals(signum).name

  def uninstall(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _prefetch_to_mesh(it: Iterator[Dict[str, np.ndarray]], mesh, size: int = 2):
  """Keeps `size` global batches already transferred (device_put is asynchronous) ahead of the step."""
  queue = []
  for local in it:
    queue.append(shd.make_global_batch(local, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


def _identity(config, num_classes: int) -> Dict[str, Any]:
  return {"model": config.model, "num_classes": num_classes,
          "model_kwargs": config.model_kwargs.to_dict(), "image_size": config.image_size}


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
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


def build_model(config, num_classes: int):
  """The configured model with its compute dtype."""
  if config.dtype not in _DTYPES:
    raise UserError(f"--config.dtype={config.dtype!r} is not one of {sorted(_DTYPES)}")
  kwargs = dict(config.model_kwargs.to_dict())
  return models.get_model(config.model, num_classes, dtype=_DTYPES[config.dtype], **kwargs)


def evaluate(eval_fn, state, config, mesh) -> Dict[str, float]:
  """Loss, top-1, top-5 over every example of the eval split exactly once (padding masked)."""
  totals = None
  it = data_lib.create_eval_iter(config, process_index=jax.process_index(),
                                 process_count=jax.process_count())
  for batch in _prefetch_to_mesh(it, mesh):
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count, "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count, "count": int(count)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains `config.model` on `config.dataset`; writes metrics/checkpoints to `workdir`; returns the summary."""
  t_start = time.time()
  is_main = jax.process_index() == 0
  _prepare_workdir(workdir)
  config = config.copy_and_resolve_references()
  if not config.get("cache_dir"):
    config.cache_dir = workdir  # dataset statistics (PCA lighting, mean/std) are cached with the run

  # --- Set-up: mesh, data, model, optimiser ---------------------------------------------------
  mesh = shd.make_mesh()
  shd.check_batch_size(config.batch_size, mesh)
  shd.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  # Cheap checks of the model first, so a typo is reported before any data is touched.
  models.check_input_size(config.model, config.image_size, **config.model_kwargs.to_dict())
  info = data_lib.get_dataset_info(config)
  model = build_model(config, info.num_classes)

  # Each process reads its own 1/process_count of the split and drops its last partial batch.
  n_proc = jax.process_count()
  steps_per_epoch = (info.num_train // n_proc) // (config.batch_size // n_proc)
  if steps_per_epoch == 0:
    raise UserError(f"the train split has {info.num_train} examples, fewer than one batch of "
                    f"{config.batch_size}; lower --config.batch_size")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  schedule = steps_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = steps_lib.make_optimizer(config, schedule)

  replicated = shd.replicated(mesh)
  image_shape = (config.image_size, config.image_size, 3)
  init_fn = jax.jit(functools.partial(steps_lib.create_train_state, model, tx, image_shape=image_shape),
                    out_shardings=replicated)
  state = init_fn(jax.random.PRNGKey(config.seed))
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))

  # --- Restore: this workdir's latest checkpoint, else `init_from` -------------------------------
  identity = _identity(config, info.num_classes)
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  state, meta = ckpt_lib.restore_latest(manager, state, identity, workdir)
  start_step = int(jax.device_get(state.step))
  if meta is not None:
    logging.info("resumed from step %d in %s", start_step, workdir)
    if is_main:
      print(f"Resuming {workdir} from step {start_step}.", flush=True)
  elif config.get("init_from"):
    state = ckpt_lib.init_from(state, config.init_from)

  fp = fingerprint(config)
  run_info = {
      "model": config.model, "model_kwargs": config.model_kwargs.to_dict(), "dataset": info.name,
      "num_classes": info.num_classes, "class_names": list(info.class_names or []),
      "num_train": info.num_train, "num_eval": info.num_eval,
      "params": n_params, "image_size": config.image_size, "dtype": config.dtype,
      "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "num_devices": jax.device_count(), "num_processes": jax.process_count(),
      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
      "fingerprint": fp["hash"], "fingerprint_fields": fp["fields"],
  }

  # --- Compile the steps over the mesh ----------------------------------------------------------
  batch_sharding = shd.batch_sharded(mesh)
  train_fn = jax.jit(
      functools.partial(steps_lib.train_step, label_smoothing=config.optimizer.label_smoothing,
                        schedule=schedule),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  eval_fn = jax.jit(steps_lib.eval_step, in_shardings=(replicated, batch_sharding),
                    out_shardings=replicated)

  train_iter = _prefetch_to_mesh(data_lib.create_train_iter(
      config, seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count()), mesh)

  first_batch = next(train_iter)
  lowered = train_fn.lower(state, first_batch)
  compiled = lowered.compile()
  step_flops = perf.step_flops(lowered, compiled, jax.device_count())
  fwd_flops = model_summary.flops_per_example(model, {"params": state.params, **(
      {"batch_stats": state.batch_stats} if state.batch_stats is not None else {})}, config.image_size)
  run_info.update(train_flops_per_step=step_flops, flops_per_example=fwd_flops)

  if is_main:
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    _write_json(os.path.join(workdir, "run_info.json"), run_info)
    print(f"{config.model}: {n_params:,} params, {fwd_flops / 1e9:.3f} GFLOPs/image (forward), "
          f"{info.name} {info.num_train:,} train / {info.num_eval:,} eval, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, {total_steps} steps", flush=True)
  writer = MetricsWriter(workdir, enabled=is_main)

  # --- The loop ---------------------------------------------------------------------------------
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  stop = _StopRequest().install()
  pending = []   # (step, device metrics) since the last log: fetched together to avoid a sync per step
  best = {"top1": -1.0, "top5": -1.0, "step": None}
  last_eval = None
  t_log, n_log, train_time = time.time(), 0, 0.0
  step = start_step
  stopped_by = None

  def meta_now(step):
    return {**identity, "step": step, "pipeline": {"seed": config.seed, "next_step": step},
            "fingerprint": fp["hash"], "dataset": info.name, "config": config.to_json_best_effort()}

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
            f"{m['grad_norm']}); the last good checkpoint in {workdir}/checkpoints is kept. "
            "Lower --config.optimizer.learning_rate or set --config.optimizer.grad_clip_norm")
    dt = time.time() - t_log
    train_time += dt
    n = len(pending)
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    img_s = n * config.batch_size / dt
    mean.update(img_per_s=img_s, epoch=step / steps_per_epoch,
                mfu=perf.mfu(step_flops, dt / n, jax.devices(), config.dtype))
    writer.write("train", step, mean)
    if is_main and config.progress:
      eta = (total_steps - step) * dt / n
      extra = f"eval top1 {last_eval['top1']:.4f}" if last_eval else ""
      print_progress(progress_line(step, total_steps, mean["loss"], img_s, eta, extra))
    pending.clear()
    n_log = 0
    t_log = time.time()

  try:
    batch = first_batch
    while step < total_steps:
      if stop.requested:
        stopped_by = stop.requested
        break
      if batch is None:
        batch = next(train_iter)
      state, metrics = compiled(state, batch)
      batch = None
      step += 1
      pending.append((step, metrics))
      if step % config.log_every_steps == 0 or step == total_steps:
        flush_metrics(step)
      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        flush_metrics(step)
        t_eval = time.time()
        last_eval = evaluate(eval_fn, state, config, mesh)
        writer.write("eval", step, {**last_eval, "epoch": step / steps_per_epoch})
        if last_eval["top1"] > best["top1"]:
          best = {"top1": last_eval["top1"], "top5": last_eval["top5"], "step": step}
        t_log += time.time() - t_eval  # eval time is not train time
      if step % config.checkpoint_every_steps == 0 or is_eval or step == total_steps:
        flush_metrics(step)  # never checkpoint a non-finite state
        ckpt_lib.save(manager, state, meta_now(step),
                      metrics={"top1": last_eval["top1"]} if is_eval else None)
    flush_metrics(step)
    if stopped_by and step > start_step:
      ckpt_lib.save(manager, state, meta_now(step))
  finally:
    manager.wait_until_finished()
    stop.uninstall()
    writer.close()

  if stopped_by:
    if is_main:
      print(f"\nStopped by {stopped_by} after step {step}; checkpoint saved in "
            f"{os.path.join(workdir, 'checkpoints')}. Run the same command to resume.", flush=True)
    return {"stopped": stopped_by, "step": step}

  if last_eval is None:  # resumed a finished run: evaluate the final state again for the summary
    last_eval = evaluate(eval_fn, state, config, mesh)
  summary = {
      "model": config.model, "dataset": info.name, "params": n_params,
      "gflops_per_image": fwd_flops / 1e9, "final_top1": last_eval["top1"],
      "final_top5": last_eval["top5"], "final_loss": last_eval["loss"],
      "best_top1": max(best["top1"], last_eval["top1"]),
      "best_top5": best["top5"] if best["top1"] >= last_eval["top1"] else last_eval["top5"],
      "best_step": best["step"] or step, "steps": step, "eval_examples": last_eval["count"],
      "train_img_per_s": (step - start_step) * config.batch_size / train_time if train_time else None,
      "wall_s": time.time() - t_start, "device_kind": run_info["device_kind"],
      "num_devices": run_info["num_devices"], "fingerprint": fp["hash"],
  }
  if is_main:
    _write_json(os.path.join(workdir, "summary.json"), summary)
    print(f"\nDone: {config.model} on {info.name}: top-1 {summary['final_top1']:.4f}, "
          f"top-5 {summary['final_top5']:.4f} (best top-1 {summary['best_top1']:.4f} at step "
          f"{summary['best_step']}), {n_params:,} params, "
          f"{summary['train_img_per_s'] or 0:.0f} img/s, wall {summary['wall_s']:.0f}s", flush=True)
  return summary
