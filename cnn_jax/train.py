"""The training loop: set up -> restore -> loop {step, hooks} -> summary.

  run = set_up(config, workdir, stop)         # specs, mesh, input, model, state (restored), compiled step
  state, step, stopped = train_loop(run)      # one jitted step per iteration, periodic work in cnn_jax.hooks
  summary = finish(run, state, step, ...)     # summary.json

The step functions in `cnn_jax.steps` are pure; `steps.jit_train_step` puts the input's batch function in
front of the train step and jits both over a `Mesh` of every device of every process. All I/O (data,
checkpoints, metrics files) happens here and in the hooks.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import console
from cnn_jax import divergence
from cnn_jax import hooks as hooks_lib
from cnn_jax import metrics_writer
from cnn_jax import models
from cnn_jax import ops
from cnn_jax import pacing
from cnn_jax import perf
from cnn_jax import predict as predict_lib
from cnn_jax import sharding as shd
from cnn_jax import signals
from cnn_jax import steps as steps_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax.data import inputs as inputs_lib
from cnn_jax.models import summary as model_summary
from cnn_jax import run_record
from cnn_jax.run_record import RunRecord
from cnn_jax import specs
from cnn_jax.specs import LoopSpec, ModelSpec, OptimizerSpec

NonFiniteError = hooks_lib.NonFiniteError

# The learning rate the advice after a divergence never exceeds: the shared recipe's (configs/common.py).
_SAFE_LEARNING_RATE = 0.01


def build_model(config, num_classes: int):
  """The configured model (`config.model`, its switches, the compute dtype) for `num_classes`."""
  spec = ModelSpec.from_config(config)
  return models.get_model(spec.name, num_classes, dtype=spec.compute_dtype, **spec.kwargs)


@dataclasses.dataclass
class Run:
  """Everything the loop and the summary need, built once by `set_up`."""
  config: ml_collections.ConfigDict
  workdir: str
  stop: signals.StopRequest
  loop: LoopSpec
  opt: OptimizerSpec
  mesh: Any
  inp: Any
  model: Any
  state: Any
  start_step: int
  meta: Optional[Dict[str, Any]]
  manager: Any
  record: RunRecord
  steps_per_epoch: int
  total_steps: int
  step_fn: Any = None          # the pure train step with the recipe's loss and schedule bound
  eval_fn: Any = None          # the pure eval step (test-time flips or not)
  train: Any = None            # the compiled train step: (state, inp.train_args(step)) -> (state, metrics)
  eval_program: Any = None     # the jitted eval step: (state, eval args) -> sums
  step_flops: float = 0.0
  flops_per_example: float = 0.0
  t_start: float = 0.0

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.state.params)))

  def evaluate(self, state, split: Optional[str] = None, stop=None) -> Optional[Dict[str, float]]:
    return hooks_lib.evaluate(self.eval_program, self.inp, state, split, stop)

  def advice(self, bad_step: int) -> str:
    return hooks_lib.last_good_advice(self.manager, self.workdir, bad_step, self.opt.learning_rate,
                                      _SAFE_LEARNING_RATE)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Any] = ()) -> Dict[str, Any]:
  """Trains `config.model` on `config.dataset`; writes metrics/checkpoints to `workdir`; returns the summary.

  Restarting with the same config and workdir resumes from the newest complete checkpoint; on CPU the
  resumed run ends bit-identical to an uninterrupted one; a finished run is not run again (its summary is
  returned). SIGTERM/SIGINT finish the step in flight (an eval in progress is abandoned), save and return
  {'stopped': signal name, 'step': step}. NaN/Inf raises NonFiniteError (last good checkpoint kept).
  `hooks`: more objects with the interface of cnn_jax.hooks, called after the run's own at every step.

  BatchNorm statistics are computed over the GLOBAL batch (all devices of all processes): the step is one
  jit over a batch sharded on the `data` mesh axis, so a run's numbers do not depend on the device count.
  """
  config = config.copy_and_resolve_references()
  specs.read(config)  # a field out of range is one line before anything is written
  created = workdir_lib.prepare(workdir)
  # Before the (possibly long) set-up: a signal then ends the process cleanly (command line) or the run
  # before its first step (in-process); see cnn_jax.signals.
  stop = signals.StopRequest.for_run(workdir)
  try:
    with workdir_lib.Lock(workdir, enabled=jax.process_index() == 0, created=created):
      run = set_up(config, workdir, stop)
      if run.start_step >= run.total_steps:
        return finish_again(run)
      compile_programs(run)
      write_run_info(run)
      state, step, stopped, done = train_loop(run, hooks)
      if stopped:
        return report_stop(run, step, stopped)
      return finish(run, state, step, done)
  finally:
    stop.release()


# --- Set-up ---------------------------------------------------------------------------------------

def set_up(config: ml_collections.ConfigDict, workdir: str, stop: signals.StopRequest) -> Run:
  """Specs, mesh, input, model, optimiser, the initial state and the restored checkpoint, if any."""
  t_start = time.time()
  config = config.copy_and_resolve_references()
  if not config.cache_dir:
    config.cache_dir = workdir  # dataset statistics (PCA lighting, mean/std) are cached with the run
  # Every spec first: a typo or an impossible value is reported before any data is touched.
  model_spec, opt, loop = specs.read(config)
  mesh = shd.make_mesh()
  console.say(console.backend_line())
  shd.check_batch_size(loop.batch_size, mesh)
  shd.check_batch_size(loop.eval_batch_size, mesh, "eval_batch_size")
  models.check_input_size(model_spec.name, model_spec.image_size, **model_spec.kwargs)
  console.say(f"data: {config.dataset}")
  inp = inputs_lib.create(config, mesh, announce=console.say)
  config.input = inp.mode  # 'auto' resolved: the fingerprint records the mode that ran
  model = models.get_model(model_spec.name, inp.info.num_classes, dtype=model_spec.compute_dtype,
                           **model_spec.kwargs)
  steps_per_epoch = inp.steps_per_epoch
  total_steps = loop.total_steps(steps_per_epoch)
  schedule = steps_lib.learning_rate_schedule(opt, steps_per_epoch, total_steps)
  tx = steps_lib.make_optimizer(opt, schedule)
  console.say(f"initialising {config.model} ({config.image_size} px, {inp.info.num_classes} classes)")
  init_fn = steps_lib.jit_init(model, tx, (config.image_size, config.image_size, 3), ema=opt.ema_decay > 0,
                               out_shardings=shd.replicated(mesh))
  state = init_fn(jax.random.PRNGKey(loop.seed))
  inference = predict_lib.inference_record(config, inp.info, inp.channels, inp.mean_std)
  record = RunRecord(config, inp.info, run_record.fresh_lineage(), inference)
  manager = ckpt_lib.make_manager(workdir, keep=loop.keep_checkpoints, async_save=loop.checkpoint_async)
  run = Run(config=config, workdir=workdir, stop=stop, loop=loop, opt=opt, mesh=mesh, inp=inp, model=model,
            state=state, start_step=0, meta=None, manager=manager, record=record,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps, t_start=t_start)
  run.step_fn, run.eval_fn = steps_lib.recipe_steps(opt, loop, schedule)
  restore(run)
  return run


def restore(run: Run) -> None:
  """This workdir's newest good checkpoint (or `restore_step`) into run.state, else `init_from`'s weights."""
  state, meta, lineage = ckpt_lib.restore_latest(
      run.manager, run.state, run.record.expected(), run.workdir, restore_step=run.loop.restore_step,
      allow_config_change=run.loop.allow_config_change)
  run.state, run.meta, run.record.lineage = state, meta, lineage
  run.start_step = int(jax.device_get(state.step))
  if run.is_main:
    metrics_writer.rewind(run.workdir, run.start_step)  # also when nothing was restored: no record twice
  if meta is not None:
    logging.info("resumed from step %d in %s", run.start_step, run.workdir)
    if meta.get("num_processes", jax.process_count()) != jax.process_count():
      # Each process shuffles its own slice of the split, so the batches from here on differ from those
      # the original process count would have drawn (still every example once per epoch).
      logging.warning("resuming a %d-process run with %d processes: the input order changes",
                      meta["num_processes"], jax.process_count())
    if run.is_main:
      print(f"Resuming {run.workdir} from step {run.start_step}.", flush=True)
  elif run.loop.init_from:
    run.state = ckpt_lib.init_from(run.state, run.loop.init_from)


def compile_programs(run: Run) -> None:
  """Compiles the train step for the state and the input's arguments; jits the eval step; counts FLOPs."""
  config = run.config
  console.say(f"compiling the train step ({config.model}, batch {config.batch_size}, {config.image_size} px, "
              f"{run.inp.mode} input)")
  t_compile = time.time()
  # On the CPU, ops.compiler_options() turns off XLA's YNNPACK convolutions (see cnn_jax/ops); elsewhere {}.
  jitted = steps_lib.jit_train_step(run.step_fn, run.inp, run.mesh, ops.compiler_options())
  run.train = jitted.lower(run.state, run.inp.train_spec()).compile()
  run.eval_program = steps_lib.jit_eval_step(run.eval_fn, run.inp, run.mesh, compiler_options=ops.compiler_options())
  console.say(f"compiled in {time.time() - t_compile:.1f}s")
  # FLOPs of the network's step (on accelerators also counted on the host CPU: cuDNN convs count 0 there).
  batch_spec = (None if jax.default_backend() == "cpu"
                else jax.eval_shape(run.inp.make_batch, run.inp.train_spec(), run.state.step))
  run.step_flops = perf.step_flops(run.train, jax.device_count(), jax.jit(run.step_fn), run.state, batch_spec)
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  variables = {"params": run.state.params, **(
      {"batch_stats": run.state.batch_stats} if run.state.batch_stats is not None else {})}
  run.flops_per_example = model_summary.flops_per_example(run.model, shapes(variables), config.image_size)


def write_run_info(run: Run) -> None:
  """config.json and run_info.json, and the start-up lines that describe the run."""
  config, info = run.config, run.inp.info
  run_info = run.record.run_info(
      params=run.params, steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
      layer_order=steps_lib.layers(run.state.params), train_flops_per_step=run.step_flops,
      flops_per_example=run.flops_per_example)
  if not run.is_main:
    return
  workdir_lib.write_json(os.path.join(run.workdir, "config.json"), json.loads(config.to_json_best_effort()))
  workdir_lib.write_json(os.path.join(run.workdir, "run_info.json"), run_info)
  run.stop.context = f"nothing was trained; {run.workdir} holds its config.json and run_info.json"
  print(f"{config.model}: {run.params:,} params, {run.flops_per_example / 1e9:.3f} GFLOPs/image (forward), "
        f"{info.name} {info.num_train:,} train / {info.num_eval:,} eval, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, {run.total_steps} steps", flush=True)
  console.say(f"Input: {run.inp.describe()}.")
  cost = console.cpu_cost_warning(config.model, config.model_kwargs.geometry, config.image_size,
                                  run.total_steps - run.start_step, run.step_flops, config.dtype)
  if cost:
    console.warn(cost)


# --- The loop -------------------------------------------------------------------------------------

def make_hooks(run: Run, writer, progress) -> Dict[str, Any]:
  """The run's periodic work: log, evaluate, checkpoint (cnn_jax.hooks), in the order they run."""
  meta = run.meta or {}
  monitor = divergence.DivergenceMonitor(run.inp.info.num_classes, meta.get("divergence"))
  log = hooks_lib.LogTrain(
      every=run.loop.log_every_steps, total_steps=run.total_steps, batch_size=run.loop.batch_size,
      steps_per_epoch=run.steps_per_epoch, step_flops=run.step_flops, dtype=run.config.dtype, writer=writer,
      progress=progress, monitor=monitor, advice=run.advice, is_main=run.is_main)
  evaluate = hooks_lib.Evaluate(
      every=run.loop.eval_every_steps(run.steps_per_epoch), total_steps=run.total_steps,
      steps_per_epoch=run.steps_per_epoch, run_eval=run.evaluate, train_eval_split=run.loop.eval_train_split,
      stop=run.stop, log=log, writer=writer, progress=progress,
      best=meta.get("best") if isinstance(meta.get("best"), dict) else None)
  save = hooks_lib.SaveCheckpoint(
      every=run.loop.checkpoint_every_steps, total_steps=run.total_steps, manager=run.manager,
      meta=lambda step: run.record.checkpoint_meta(step, evaluate.best, monitor.record()), log=log,
      evaluate_hook=evaluate, advice=run.advice, saved_step=run.start_step if run.meta is not None else None)
  return {"log": log, "evaluate": evaluate, "save": save}


def train_loop(run: Run, extra_hooks: Sequence[Any] = ()):
  """Runs the train steps from run.start_step to run.total_steps; returns (state, step, stopped, hooks).

  Step t is dispatched once step t-2 is done (pacing.DispatchBound): the devices keep one step queued, and a
  stop request acts within about one step. A hook may stop the run too (an eval abandoned on a signal).
  """
  state, step, stopped = run.state, run.start_step, None
  args = run.inp.train_args(step)  # host input: starts the pipeline (before the clocks start)
  writer = metrics_writer.MetricsWriter(run.workdir, enabled=run.is_main)
  progress = console.Progress(run.total_steps, run.start_step, enabled=run.is_main and run.loop.progress)
  done = make_hooks(run, writer, progress)
  hooks = list(done.values()) + list(extra_hooks)
  pacer = pacing.DispatchBound(depth=2)
  run.stop.enter_loop()
  try:
    while step < run.total_steps and not stopped:
      if args is None:
        args = run.inp.train_args(step)  # host input: the next batch is on its way before the wait
      pacer.wait_for_room()
      stopped = run.stop.should_stop(step, run.loop.log_every_steps)
      if stopped:
        break
      state, metrics = run.train(state, args)
      args = None
      pacer.dispatched(metrics)
      step += 1
      if step == run.start_step + 1:
        progress.first_step(metrics, run.loop.log_every_steps)
      stopped = next((r for r in [h.after_step(step, state, metrics) for h in hooks] if r), None)
    for hook in hooks:
      hook.at_end(step, state, stopped)
  except BaseException:
    hooks_lib.wait_quietly(run.manager)  # a failed background save must not hide the error in flight
    raise
  finally:
    progress.close()
    run.stop.leave_loop()
    writer.close()
  return state, step, stopped, done


# --- The end --------------------------------------------------------------------------------------

def report_stop(run: Run, step: int, stopped: str) -> Dict[str, Any]:
  if run.is_main:
    where = (f"checkpoint of step {step} is in {os.path.join(run.workdir, 'checkpoints')}" if step > 0
             else "no step was taken, so there is no checkpoint")
    print(f"\nStopped by {stopped} after step {step}; {where}. Run the same command to resume.", flush=True)
  return {"stopped": stopped, "step": step}


def finish(run: Run, state, step: int, done: Dict[str, Any]) -> Dict[str, Any]:
  """summary.json of a run that reached its last step, and the closing line."""
  log, evaluate = done["log"], done["evaluate"]
  train_time = log.train_time
  summary = run.record.summary(
      params=run.params, flops_per_example=run.flops_per_example, step=step, final=evaluate.last,
      best=evaluate.best, train_img_per_s=(step - run.start_step) * run.loop.batch_size / train_time
      if train_time else None, wall_s=time.time() - run.t_start, diverged=log.monitor.diverged,
      train_eval=evaluate.last_train_eval)
  return write_summary(run, summary)


def finish_again(run: Run) -> Dict[str, Any]:
  """A run resumed at its last step: the summary it wrote, untouched; if it has none (stopped between the
  last checkpoint and the summary), evaluates the final state and writes it."""
  path = os.path.join(run.workdir, "summary.json")
  summary = workdir_lib.read_json(path)
  if isinstance(summary, dict) and summary.get("steps") == run.start_step:
    if run.is_main:
      print(f"{run.workdir} is finished (step {run.start_step} of {run.total_steps}); its summary.json is kept.",
            flush=True)
      print(done_line(summary), flush=True)
    return summary
  compile_programs(run)
  final = run.evaluate(run.state)
  train_eval = run.evaluate(run.state, run.loop.eval_train_split) if run.loop.eval_train_split else None
  best = (run.meta or {}).get("best") or {"top1": -1.0, "top5": -1.0, "step": None}
  summary = run.record.summary(
      params=run.params, flops_per_example=run.flops_per_example, step=run.start_step, final=final, best=best,
      train_img_per_s=None, wall_s=time.time() - run.t_start,
      diverged=((run.meta or {}).get("divergence") or {}).get("diverged"), train_eval=train_eval)
  return write_summary(run, summary)


def write_summary(run: Run, summary: Dict[str, Any]) -> Dict[str, Any]:
  if run.is_main:
    workdir_lib.write_json(os.path.join(run.workdir, "summary.json"), summary)
    print("\n" + done_line(summary), flush=True)
    if summary["diverged"]:
      print(f"warning: the training loss diverged at step {summary['diverged']['step']} (summary.json "
            "'diverged'); these numbers are not those of a healthy run", file=sys.stderr, flush=True)
  return summary


def done_line(summary: Dict[str, Any]) -> str:
  """'Done: vgg11 on fashion_mnist: top-1 0.8454, top-5 0.9972 (best ...), 1,769,066 params, 1011 img/s, wall 245s'."""
  speed = f"{summary['train_img_per_s']:.0f} img/s, " if summary.get("train_img_per_s") else ""
  return (f"Done: {summary['model']} on {summary['dataset']}: top-1 {summary['final_top1']:.4f}, "
          f"top-5 {summary['final_top5']:.4f} (best top-1 {summary['best_top1']:.4f} at step "
          f"{summary['best_step']}), {summary['params']:,} params, {speed}wall {summary['wall_s']:.0f}s")
