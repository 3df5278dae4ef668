"""Checkpoints and fault tolerance: retention, resume after SIGTERM / kill -9 (bit-identical on CPU), damaged
checkpoints, NaN, incompatible configs, fine-tuning from another run's weights.

The end-to-end runs use a slice of the real Fashion-MNIST (`fashion_mnist_dir`) and tiny networks; the
subprocess runs inherit the session's XLA compilation cache (conftest.py), so relaunches do not recompile.
"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cnn_jax import checkpoint as ckpt_lib
from cnn_jax import checkpoint_files
from cnn_jax import cli
from cnn_jax import train
from cnn_jax import workdir as workdir_lib
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMING_KEYS = {"time", "img_per_s", "mfu", "wall_s"}


def _config(module="lenet", arg="smoke", **overrides):
  sys.path.insert(0, REPO)
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  config.progress = False
  return apply_overrides(config, overrides)


def load_state(workdir, step):
  """{'params': ..., ...} of `workdir`'s checkpoint `step` as numpy arrays (independent of its mesh)."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  metadata = manager.item_metadata(step)["state"]
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), metadata)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return jax.tree.map(np.asarray, state)


def assert_trees_equal(a, b):
  """Bit-for-bit equality of two trees of arrays (same structure, shapes, dtypes, values)."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), "arrays differ"


def steps_in(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tensorboard_points(workdir):
  """[(tag, step)] of every scalar in the run's TensorBoard event files."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  tb = os.path.join(workdir, "tb")
  points = []
  for name in sorted(os.listdir(tb)):
    for event in event_file_loader.EventFileLoader(os.path.join(tb, name)).Load():
      points += [(v.tag, event.step) for v in event.summary.value]
  return points


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(l).items() if k not in _TIMING_KEYS} for l in f]


# --- Retention policy (no training) ----------------------------------------------------------------

class _State:
  """The fields checkpoint.state_to_tree reads."""

  def __init__(self, step, value):
    self.step = jnp.int32(step)
    self.params = {"w": jnp.full((4,), value, jnp.float32)}
    self.opt_state = {"m": jnp.zeros((4,), jnp.float32)}
    self.rng = jax.random.PRNGKey(step)
    self.batch_stats = None
    self.ema = None


def test_keeps_last_n_and_the_best(tmp_path):
  manager = ckpt_lib.make_manager(str(tmp_path), keep=2, async_save=True)
  top1 = {2: 0.3, 4: 0.9, 6: 0.5, 8: 0.4}  # the best (step 4) is neither of the last two
  for step in range(1, 11):
    metrics = {"top1": top1[step]} if step in top1 else None
    assert ckpt_lib.save(manager, _State(step, step), {"step": step}, metrics=metrics)
  ckpt_lib.wait(manager)
  assert sorted(manager.all_steps()) == [4, 9, 10]
  # A step that exists is not written again (a resumed run reaching a saved step must not crash).
  assert not ckpt_lib.save(manager, _State(10, -1.0), {"step": 10})
  ckpt_lib.wait(manager)
  assert float(load_state(str(tmp_path), 10)["params"]["w"][0]) == 10.0
  # After a restart (a new manager) the best is still known, so still kept.
  manager = ckpt_lib.make_manager(str(tmp_path), keep=2, async_save=True)
  for step in (11, 12):
    ckpt_lib.save(manager, _State(step, step), {"step": step})
  ckpt_lib.wait(manager)
  assert sorted(manager.all_steps()) == [4, 11, 12]


def test_a_save_on_cpu_devices_compiles_nothing(tmp_path, backend_compiles):
  """Orbax's replica-parallel saving is off on the CPU (checkpoint.use_replica_parallel): a state replicated
  over the 8 devices is saved without compiling anything (with it, every array shape got a slice program at
  a process's first save) and reads back bit for bit."""
  from cnn_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  assert not ckpt_lib.use_replica_parallel()
  replicated = shd.replicated(shd.make_mesh())
  state = _State(3, 0.0)
  rng = np.random.default_rng(0)
  state.params = {"w": rng.normal(size=(3, 3, 8, 40)).astype(np.float32), "b": rng.normal(size=(40,)).astype(np.float32)}
  state.params, state.opt_state = jax.device_put((state.params, {"m": state.params}), replicated)
  manager = ckpt_lib.make_manager(str(tmp_path), async_save=True)
  with backend_compiles() as compiles:
    assert ckpt_lib.save(manager, state, {"step": 3})
    ckpt_lib.wait(manager)
  assert not compiles, compiles
  saved = load_state(str(tmp_path), 3)
  assert_trees_equal(saved["params"], jax.device_get(state.params))
  assert_trees_equal(saved["opt_state"], jax.device_get(state.opt_state))


# --- Interrupted runs resume bit-identically (subprocesses) ----------------------------------------

def _launch(args, log_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "train.py"] + args, cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def _log(proc):
  with open(proc.log_path) as f:
    return f.read()


def _wait_until(condition, proc, timeout=180):
  """Polls `condition` every 20 ms while `proc` runs; fails the test on timeout or early exit."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      pytest.fail(f"process exited ({proc.returncode}) before the kill point:\n{_log(proc)[-3000:]}")
    time.sleep(0.02)
  pytest.fail(f"kill point not reached in {timeout}s:\n{_log(proc)[-3000:]}")


def _finish(proc, timeout=240):
  try:
    return proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.heavy
def test_interrupted_runs_resume_bit_identical(fashion_mnist_dir, fashion_mnist_arrays, tmp_path):
  """train.py launched as a user does: SIGTERM, then kill -9 during start-up, then kill -9 mid-training (maybe
  mid-save); the resumed run ends with the same checkpoint arrays (bit for bit), the same eval metrics and the
  same metrics.jsonl as an uninterrupted run. LeNet with dropout 0.5 on its hidden FC layers (the paper's LeNet
  has none): the dropout RNG is part of what must resume exactly. (LeNet, not NiN: the same checks for a third
  less CPU per launch.)

  The signal handling, the kills, the checkpoint layer and the restart are the same for both input modes: run
  with the device input (its launches read the session's array cache, no TensorFlow). What depends on the
  input mode, that the resumed input continues with the very batches the uninterrupted run drew, is shown for
  both modes in one process by tests/test_device_input.py::test_stop_and_resume_is_bit_identical (three
  launches of train.py with the host input cost ~50 CPU-seconds, mostly TensorFlow start-up)."""
  args = ["--config=configs/lenet.py:smoke", "--config.model_kwargs.dropout_rate=0.5",
          f"--config.data_dir={fashion_mnist_dir}", "--config.input=device",
          "--config.train_split=train[:2048]", "--config.eval_split=test[:512]",
          "--config.num_train_steps=40", "--config.log_every_steps=5", "--config.checkpoint_every_steps=3",
          "--config.eval_every_epochs=0.3", "--config.progress=false", "--cpu_devices=2"]
  ref_dir, run_dir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  reference = _launch(args + [f"--workdir={ref_dir}"], tmp_path / "reference.log")
  procs = [reference]
  try:
    # The interrupted run starts once the reference has compiled its train step: it then loads that from
    # the session's compilation cache (as every relaunch below does) instead of compiling it a second time.
    _wait_until(lambda: "compiled in" in _log(reference), reference)
    # 1. SIGTERM once a few checkpoints exist: finishes the step, saves, exits 0 with a message.
    proc = _launch(args + [f"--workdir={run_dir}"], tmp_path / "run1.log")
    procs.append(proc)
    _wait_until(lambda: any(s >= 6 for s in steps_in(run_dir)), proc)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 0, _log(proc)[-3000:]
    out = _log(proc)
    assert "Stopped by SIGTERM after step" in out and "Run the same command to resume" in out, out[-2000:]
    stopped_at = max(steps_in(run_dir))  # the stop's checkpoint is the newest; the message names it
    assert stopped_at < 40 and f"after step {stopped_at};" in out, out[-2000:]

    # 2. kill -9 while the resumed run starts up (restore, compile).
    proc = _launch(args + [f"--workdir={run_dir}"], tmp_path / "run2.log")
    procs.append(proc)
    _wait_until(lambda: "Resuming" in _log(proc), proc)
    proc.kill()
    proc.wait()
    assert f"from step {stopped_at}." in _log(proc)

    # 3. kill -9 mid-training, shortly after a checkpoint appeared (often while the next one is written).
    proc = _launch(args + [f"--workdir={run_dir}"], tmp_path / "run3.log")
    procs.append(proc)
    _wait_until(lambda: any(s >= 24 for s in steps_in(run_dir)), proc)
    time.sleep(0.1)  # LeNet: a step or two later (40 steps take a few seconds)
    proc.kill()
    proc.wait()

    # 4. The same command again runs to the end.
    proc = _launch(args + [f"--workdir={run_dir}"], tmp_path / "run4.log")
    procs.append(proc)
    assert _finish(proc) == 0, _log(proc)[-3000:]
    resumed_from = int(_log(proc).split("Resuming")[1].split("from step ")[1].split(".")[0])
    assert 24 <= resumed_from < 40
    assert _finish(reference) == 0, _log(reference)[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  assert_trees_equal(load_state(run_dir, 40), load_state(ref_dir, 40))
  ref_summary = json.load(open(os.path.join(ref_dir, "summary.json")))
  run_summary = json.load(open(os.path.join(run_dir, "summary.json")))
  for k in ("final_top1", "final_top5", "final_loss", "best_top1", "best_top5", "best_step", "steps",
            "eval_examples"):
    assert run_summary[k] == ref_summary[k], k
  # Eval records are identical; train records too from the last resume on (before it, the SIGTERM
  # stop logged a shorter interval). Nothing is logged twice.
  ref_records, run_records = records(ref_dir), records(run_dir)
  assert [r for r in run_records if r["split"] == "eval"] == [r for r in ref_records if r["split"] == "eval"]
  tail = lambda rs: [r for r in rs if r["split"] == "train" and r["step"] > resumed_from]
  assert tail(run_records) == tail(ref_records) and tail(ref_records)
  run_steps = [(r["split"], r["step"]) for r in run_records]
  assert len(run_steps) == len(set(run_steps))
  points = tensorboard_points(run_dir)
  evals = lambda ps: sorted(p for p in ps if p[0].startswith("eval/"))
  assert len(points) == len(set(points)) and evals(points) == evals(tensorboard_points(ref_dir))


# --- In-process scenarios on one small finished run -------------------------------------------------

def _lenet_config(data_dir, **overrides):
  # 512 train images, batch 32: 16 steps per epoch; eval every 4 steps; checkpoints at 2, 4, 6, 8.
  fields = dict(data_dir=data_dir, train_split="train[:512]", eval_split="test[:128]", num_train_steps=8,
                checkpoint_every_steps=2, eval_every_epochs=0.25, log_every_steps=2, keep_checkpoints=3)
  return _config("lenet", **{**fields, **overrides})


@pytest.fixture(scope="module")
def lenet_run(fashion_mnist_dir, tmp_path_factory):
  """A finished 8-step LeNet run (in-process, 8 devices): (workdir, summary). Copy it before changing it."""
  workdir = str(tmp_path_factory.mktemp("lenet_run"))
  summary = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), workdir)
  return workdir, summary


def _copy(workdir, tmp_path):
  dest = str(tmp_path / "copy")
  shutil.copytree(workdir, dest)
  return dest


def _snapshot(directory):
  """Every file under `directory` with its size and mtime."""
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), directory)] = (st.st_size, st.st_mtime_ns)
  return out


def test_finished_run_keeps_last_n_plus_best_and_restarts_as_a_no_op(lenet_run, fashion_mnist_dir, tmp_path):
  workdir, summary = lenet_run
  assert summary["steps"] == 8
  assert set(steps_in(workdir)) == {4, 6, 8} | {summary["best_step"]}
  meta = json.load(open(os.path.join(workdir, "checkpoints", "8", "meta", "metadata")))
  assert meta["model"] == "lenet" and meta["num_classes"] == 10 and meta["dataset"] == "fashion_mnist"
  assert meta["pipeline"] == {"seed": 0, "next_step": 8} and "config" in meta and meta["fingerprint"]
  # Running the finished run again restores step 8, trains nothing, saves nothing, reports the same.
  wd = _copy(workdir, tmp_path)
  before = _snapshot(os.path.join(wd, "checkpoints"))
  again = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  assert again["final_top1"] == summary["final_top1"] and again["best_top1"] == summary["best_top1"]
  assert _snapshot(os.path.join(wd, "checkpoints")) == before


def test_damaged_checkpoints_fall_back_and_are_moved_aside(lenet_run, fashion_mnist_dir, tmp_path, capfd):
  """Newest truncated, the one before missing a file: resume from the third, retrain, same arrays."""
  wd = _copy(lenet_run[0], tmp_path)
  good_8 = load_state(wd, 8)
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(wd, "checkpoints", "8", "state", "d"))
                for f in fs]
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  os.remove(os.path.join(wd, "checkpoints", "6", "state", "manifest.ocdbt"))

  summary = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  err = capfd.readouterr().err
  assert "checkpoint 8" in err and "checkpoint 6" in err and "damaged" in err, err
  assert summary["steps"] == 8 and summary["final_top1"] == lenet_run[1]["final_top1"]
  moved = sorted(os.listdir(os.path.join(wd, ckpt_lib.DAMAGED_DIR)))
  assert [m.split("-")[0] for m in moved] == ["6", "8"]  # kept for inspection, not deleted
  assert_trees_equal(load_state(wd, 8), good_8)  # steps 6 and 8 written again, identically


def test_incompatible_config_is_refused_and_checkpoints_untouched(lenet_run, fashion_mnist_dir,
                                                                  image_folder_dir, tmp_path, capfd):
  wd = _copy(lenet_run[0], tmp_path)
  before = _snapshot(os.path.join(wd, "checkpoints"))
  # A different model.
  status = cli.run(cli.train_main, _lenet_config(fashion_mnist_dir, model="vgg11"), wd)
  err = capfd.readouterr().err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR
  assert len(err) == 1 and "different run" in err[0] and "model: checkpoint 'lenet' vs config 'vgg11'" in err[0]
  assert "new --workdir" in err[0]
  # A different class count (a 3-class image folder).
  config = _lenet_config(None, dataset=f"folder:{image_folder_dir}", batch_size=8, eval_batch_size=8)
  config.train_split, config.eval_split = "train", "test"
  status = cli.run(cli.train_main, config, wd)
  err = capfd.readouterr().err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR and len(err) == 1
  assert "num_classes: checkpoint 10 vs config 3" in err[0], err
  assert _snapshot(os.path.join(wd, "checkpoints")) == before


def test_init_from_copies_matching_weights_and_keeps_a_fresh_head(lenet_run, image_folder_dir, tmp_path, capfd):
  """Fine-tune the 10-class Fashion-MNIST LeNet on a 3-class folder: all but the classifier copied."""
  source_dir = lenet_run[0]
  config = _lenet_config(None, dataset=f"folder:{image_folder_dir}", batch_size=8, eval_batch_size=8,
                         num_train_steps=1, init_from=source_dir)
  config.train_split, config.eval_split = "train", "test"
  config.optimizer.learning_rate = 0.0  # the one step leaves the weights as initialised
  config.optimizer.weight_decay = 0.0
  wd = str(tmp_path / "finetune")
  summary = train.train_and_evaluate(config, wd)
  assert summary["steps"] == 1
  assert "Initialised from" in capfd.readouterr().out
  source = load_state(source_dir, 8)["params"]
  tuned = load_state(wd, 1)["params"]
  for layer in ("conv1", "conv2"):
    assert_trees_equal(tuned[layer], source[layer])
  assert_trees_equal(tuned["head"]["fc1"], source["head"]["fc1"])
  assert tuned["head"]["logits"]["kernel"].shape[-1] == 3 and source["head"]["logits"]["kernel"].shape[-1] == 10
  # Resuming the fine-tuning run uses its own checkpoint, not init_from again.
  config.num_train_steps = 2
  assert train.train_and_evaluate(config, wd)["steps"] == 2
  assert "Initialised from" not in capfd.readouterr().out


def test_nonfinite_loss_stops_with_status_3_and_keeps_last_good(fashion_mnist_dir, tmp_path, capfd):
  config = _lenet_config(fashion_mnist_dir, num_train_steps=30, checkpoint_every_steps=1, log_every_steps=1,
                         eval_every_epochs=100.0)
  config.optimizer.learning_rate = 1e6
  config.schedule.warmup_epochs = 0.0
  wd = str(tmp_path / "nan")
  status = cli.run(cli.train_main, config, wd)
  err = [l for l in capfd.readouterr().err.splitlines() if l.startswith("error:")]
  assert status == cli.EXIT_NONFINITE and len(err) == 1, err
  # The way back: a good checkpoint to restore, or (here: checkpoint 1's weights already gave an exploded
  # loss at step 2) starting afresh; checkpoints are never deleted for it.
  assert "non-finite at step" in err[0] and "--config.restore_step=" in err[0], err
  bad_step = int(err[0].split("at step ")[1].split(" ")[0])
  kept = steps_in(wd)
  assert kept and max(kept) < bad_step
  last = load_state(wd, max(kept))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(last["params"]))


def test_sigint_in_process_finishes_the_step_and_saves(fashion_mnist_dir, tmp_path):
  """Ctrl-C during training: the step finishes, a checkpoint is written, the summary says 'stopped'."""

  class InterruptAfterStep6:  # a hook of the loop's (cnn_jax.hooks interface)
    def after_step(self, step, state, metrics):
      if step == 6:
        os.kill(os.getpid(), signal.SIGINT)

    def at_end(self, step, state, stopped):
      pass

  wd = str(tmp_path / "sigint")
  before = signal.getsignal(signal.SIGINT)
  result = train.train_and_evaluate(_lenet_config(fashion_mnist_dir, num_train_steps=50, input="host",
                                                  checkpoint_every_steps=100, eval_every_epochs=100.0), wd,
                                    hooks=[InterruptAfterStep6()])
  assert result["stopped"] == "SIGINT" and 0 < result["step"] < 50
  assert steps_in(wd) == [result["step"]]
  assert signal.getsignal(signal.SIGINT) is before  # our handler is uninstalled


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  wd = str(tmp_path / "busy")
  os.makedirs(wd)
  with workdir_lib.Lock(wd):
    with pytest.raises(UserError, match="in use by another run"):
      train.train_and_evaluate(_config("lenet"), wd)
  with workdir_lib.Lock(wd):  # released, so it can be taken again
    pass


# --- Issue #14: never discard progress, trust only verified checkpoints -----------------------------

def _workdir_snapshot(directory):
  """Every file of a workdir with its size and mtime, except the lock (each start rewrites it)."""
  return {k: v for k, v in _snapshot(directory).items() if k != ".lock"}


@pytest.mark.parametrize("field,value", [("optimizer.grad_clip_norm", 1.0), ("optimizer.weight_decay", 0.0)])
def test_optimizer_structure_change_is_refused_not_taken_for_damage(lenet_run, fashion_mnist_dir, tmp_path,
                                                                   capfd, field, value):
  """grad_clip_norm 0 -> 1 adds an optimiser state entry, weight_decay -> 0 removes one: one line naming
  the field and the ways on, status 2, nothing moved or rewritten (it was taken for damage: every
  checkpoint moved aside and training restarted at step 0)."""
  wd = _copy(lenet_run[0], tmp_path)
  before = _workdir_snapshot(wd)
  capfd.readouterr()
  status = cli.run(cli.train_main, _lenet_config(fashion_mnist_dir, num_train_steps=12, **{field: value}), wd)
  err = capfd.readouterr().err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR and len(err) == 1, err
  assert field in err[0] and "--config.init_from=" in err[0] and "new --workdir" in err[0], err[0]
  assert "nothing was moved" in err[0]
  assert not os.path.exists(os.path.join(wd, ckpt_lib.DAMAGED_DIR))
  assert _workdir_snapshot(wd) == before


def test_batch_size_or_dataset_change_is_refused_unless_allowed_then_recorded(
    lenet_run, fashion_mnist_dir, image_folder_factory, tmp_path, capfd):
  wd = _copy(lenet_run[0], tmp_path)
  before = _workdir_snapshot(wd)
  # Another dataset with the same class count and the same model: refused.
  classes = tuple(f"c{i}" for i in range(10))
  root = image_folder_factory(splits=(("train", 4), ("test", 2)), classes=classes)
  config = _lenet_config(None, dataset=f"folder:{root}", num_train_steps=12)
  config.train_split, config.eval_split = "train", "test"
  for changed in (config, _lenet_config(fashion_mnist_dir, batch_size=64, num_train_steps=12)):
    capfd.readouterr()
    status = cli.run(cli.train_main, changed, wd)
    err = capfd.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_USER_ERROR and len(err) == 1, err
    assert ("batch_size 32 -> 64" in err[0] or "dataset 'fashion_mnist' ->" in err[0]), err[0]
    assert "--config.allow_config_change=True" in err[0] and "new --workdir" in err[0], err[0]
    assert _workdir_snapshot(wd) == before  # config.json, run_info.json, metrics, checkpoints as they were

  # Allowed: the run goes on and keeps the history (with the step), and stops claiming the old recipe.
  from cnn_jax.fingerprint import fingerprint  # pylint: disable=g-import-not-at-top
  config = _lenet_config(fashion_mnist_dir, batch_size=64, num_train_steps=12, allow_config_change=True)
  summary = train.train_and_evaluate(config, wd)
  change = {"step": 8, "field": "batch_size", "from": 32, "to": 64}
  assert summary["steps"] == 12 and change in summary["config_changes"]
  run_info = json.load(open(os.path.join(wd, "run_info.json")))
  assert change in run_info["config_changes"] and run_info["fingerprint_fields"]["batch_size"] == 64
  assert summary["fingerprint"] != fingerprint(config)["hash"]  # not "as if it had used 64 throughout"
  assert summary["fingerprint"].startswith("changed-") and run_info["fingerprint"] == summary["fingerprint"]
  meta = json.load(open(os.path.join(wd, "checkpoints", "12", "meta", "metadata")))
  assert change in meta["lineage"]["config_changes"]  # carried to the next resume


def _flip_a_silent_bit(wd, step):
  """Flips one bit in the array data of checkpoint `step` such that plain Orbax restores it without an
  error but with other values (what a bit flip on disk does to the data TensorStore does not checksum);
  returns the file changed.

  Small arrays sit inside OCDBT's b-tree nodes, which carry a CRC; larger ones are values in data files
  without one: the bit is flipped in the middle of such a value (found by its bytes).
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  state_dir = os.path.join(wd, "checkpoints", str(step), "state")
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
  values = [bytes(kv.read(k).result().value) for k in kv.list().result() if not k.endswith(b".zarray")]
  files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs if os.path.basename(r) == "d"]
  good = jax.tree.leaves(load_state(wd, step))
  for value in sorted(values, key=len, reverse=True):
    for path in files:
      original = open(path, "rb").read()
      start = original.find(value) if len(value) > 64 else -1
      if start < 0:
        continue
      for offset in range(len(value) // 2, len(value) - 8, 7):
        data = bytearray(original)
        data[start + offset] ^= 0x08
        with open(path, "wb") as f:
          f.write(data)
        try:
          restored = jax.tree.leaves(load_state(wd, step))
        except Exception:  # pylint: disable=broad-except
          continue  # this byte made the value undecodable: not the silent case
        if any(not np.array_equal(a, b) for a, b in zip(restored, good)):
          return path
      with open(path, "wb") as f:
        f.write(original)
  raise AssertionError("found no array value outside the checksummed b-tree nodes to flip a bit in")


def test_flipped_bit_in_array_data_is_detected_and_falls_back(fashion_mnist_dir, tmp_path, capfd):
  """One flipped bit in checkpoint 4's data restored silently with other weights; the checksums recorded
  at save catch it: one warning line, checkpoint 4 moved aside, resume from 2, the same step 4 again.
  LeNet at full width: its larger arrays are stored outside TensorStore's own CRC-checked nodes."""
  wd = str(tmp_path / "run")
  config = _lenet_config(fashion_mnist_dir, num_train_steps=4, eval_every_epochs=100.0)
  config.model_kwargs.width = 1.0
  train.train_and_evaluate(config, wd)
  good_4 = load_state(wd, 4)
  _flip_a_silent_bit(wd, 4)
  capfd.readouterr()
  summary = train.train_and_evaluate(config, wd)
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("warning: checkpoint 4") and "checksum mismatch" in err[0], err
  assert [m.split("-")[0] for m in os.listdir(os.path.join(wd, ckpt_lib.DAMAGED_DIR))] == ["4"]
  assert summary["steps"] == 4
  assert_trees_equal(load_state(wd, 4), good_4)


def _truncate_data(wd, step):
  for root, _, files in os.walk(os.path.join(wd, "checkpoints", str(step), "state")):
    for name in files:
      if os.sep + "d" in root:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_init_from_falls_back_past_a_damaged_newest_checkpoint(lenet_run, fashion_mnist_dir, tmp_path, capfd):
  source = _copy(lenet_run[0], tmp_path)
  _truncate_data(source, 8)
  config = _lenet_config(fashion_mnist_dir, num_train_steps=1, init_from=source)
  config.optimizer.learning_rate = 0.0
  config.optimizer.weight_decay = 0.0
  capfd.readouterr()
  train.train_and_evaluate(config, str(tmp_path / "tuned"))
  captured = capfd.readouterr()
  warnings = [l for l in captured.err.splitlines() if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint 8" in warnings[0] and "damaged" in warnings[0], captured.err
  assert "step 6" in captured.out
  assert_trees_equal(load_state(str(tmp_path / "tuned"), 1)["params"], load_state(source, 6)["params"])
  # Named explicitly, a damaged checkpoint is an error that names the earlier ones.
  config.init_from = os.path.join(source, "checkpoints", "8")
  status = cli.run(cli.train_main, config, str(tmp_path / "tuned2"))
  err = capfd.readouterr().err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR and len(err) == 1, err
  assert "damaged" in err[0] and f"--config.init_from={os.path.join(source, 'checkpoints', '6')}" in err[0]


def test_restart_without_a_restorable_checkpoint_writes_each_record_once(lenet_run, fashion_mnist_dir,
                                                                        tmp_path):
  """Every checkpoint damaged (as when a run is killed before its first one): the restart trains from
  step 0 and metrics.jsonl holds each record once, not twice."""
  wd = _copy(lenet_run[0], tmp_path)
  for step in steps_in(wd):
    os.remove(os.path.join(wd, "checkpoints", str(step), "state", "manifest.ocdbt"))
  summary = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  assert summary["steps"] == 8
  keys = [(r["split"], r["step"]) for r in records(wd)]
  assert len(keys) == len(set(keys)) and ("train", 2) in keys and ("eval", 8) in keys
  points = tensorboard_points(wd)  # TensorBoard too: the first run's events were rewound, not repeated
  assert len(points) == len(set(points)) and ("eval/top1", 8) in points


def _lenet_args(wd, data_dir):
  """train.py's flags for the run `_lenet_config` describes."""
  return ["--config=configs/lenet.py:smoke", f"--workdir={wd}", f"--config.data_dir={data_dir}",
          "--config.train_split=train[:512]", "--config.eval_split=test[:128]", "--config.num_train_steps=8",
          "--config.checkpoint_every_steps=2", "--config.eval_every_epochs=0.25",
          "--config.log_every_steps=2", "--config.progress=false"]


def _user_env():
  """The environment of a user's shell: none of the suite's TensorFlow log settings (TensorFlow's own start-up
  lines, e.g. oneDNN's on AVX-512 CPUs, are the product's to keep quiet)."""
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  return dict(env, JAX_PLATFORMS="cpu")


def _train_py(args, prefix=()):
  """train.py launched as a user does (optionally under `prefix`, e.g. a mount namespace)."""
  env = _user_env()
  return subprocess.run(list(prefix) + [sys.executable, "train.py"] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


_NOISE = ("Traceback", "pybind11", "Exception ignored", "TensorStore(", "coroutine", "Task exception",
          "future: <Task", "RuntimeWarning", "Event loop is closed", "Failed to json parse")


def test_damaged_checkpoints_print_one_line_each_on_the_command_line(lenet_run, fashion_mnist_dir, tmp_path):
  """The command-line path: one warning line per damaged checkpoint, no TensorStore/asyncio tracebacks,
  no pybind11 text, nothing printed twice."""
  wd = _copy(lenet_run[0], tmp_path)
  _truncate_data(wd, 8)
  os.remove(os.path.join(wd, "checkpoints", "6", "state", "manifest.ocdbt"))
  proc = _train_py(_lenet_args(wd, fashion_mnist_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  damaged = [l for l in lines if "damaged" in l]
  assert len(damaged) == 2 and damaged[0].startswith("warning: checkpoint 8") and \
      damaged[1].startswith("warning: checkpoint 6"), proc.stderr[-3000:]
  for noise in _NOISE:
    assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
  assert "Resuming" in proc.stdout and "from step 4." in proc.stdout


# --- Issue #26: no damaged file may block a restart ---------------------------------------------------

def _write(wd, step, name, data: bytes):
  with open(os.path.join(wd, "checkpoints", str(step), name), "wb") as f:
    f.write(data)


def _rename_6_to_8(wd):
  """Checkpoint 6's directory renamed to 8 (the real 8 gone): a step the run saves again later."""
  shutil.rmtree(os.path.join(wd, "checkpoints", "8"))
  os.rename(os.path.join(wd, "checkpoints", "6"), os.path.join(wd, "checkpoints", "8"))


_SMALL_FILE_DAMAGE = {
    "metrics_garbage": lambda wd: _write(wd, 8, "metrics/metrics", b"{garbage\n"),
    "metrics_empty": lambda wd: _write(wd, 8, "metrics/metrics", b""),
    "checkpoint_metadata_garbage": lambda wd: _write(wd, 8, "_CHECKPOINT_METADATA", b"{garbage\n"),
    "meta_garbage": lambda wd: _write(wd, 8, "meta/metadata", b"{garbage\n"),
    "meta_empty_object": lambda wd: _write(wd, 8, "meta/metadata", b"{}"),
    "array_metadata_empty": lambda wd: _write(wd, 8, "state/_METADATA", b""),
    "renamed_directory": _rename_6_to_8,
}


@pytest.mark.parametrize("damage", sorted(_SMALL_FILE_DAMAGE))
def test_a_damaged_small_file_is_damage_not_a_blocked_restart(lenet_run, fashion_mnist_dir, tmp_path, capfd,
                                                             damage):
  """Checkpoint 8 with a damaged small file (garbage or empty JSON, a meta `{}`, a directory renamed from 6):
  one warning line, moved to checkpoints_damaged/, the previous one restored, steps up to 8 trained again
  bit for bit. (A garbage `metrics` raised JSONDecodeError out of Orbax's CheckpointManager() at every
  restart; `{}` was "a different run"; the renamed 8 was restored as step 8 and left in place.)"""
  wd = _copy(lenet_run[0], tmp_path)
  good = {s: load_state(wd, s) for s in (6, 8)}
  _SMALL_FILE_DAMAGE[damage](wd)
  capfd.readouterr()
  summary = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  captured = capfd.readouterr()
  err = [l for l in captured.err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("warning: checkpoint 8") and "damaged" in err[0], err
  if damage == "renamed_directory":
    assert "renamed" in err[0], err[0]
  resumed = 4 if damage == "renamed_directory" else 6
  assert f"from step {resumed}." in captured.out, captured.out
  assert [m.split("-")[0] for m in os.listdir(os.path.join(wd, ckpt_lib.DAMAGED_DIR))] == ["8"]
  assert summary["steps"] == 8 and summary["final_top1"] == lenet_run[1]["final_top1"]
  for step, state in good.items():
    assert_trees_equal(load_state(wd, step), state)


def test_every_small_file_zeroed_starts_afresh_with_all_moved_aside(lenet_run, fashion_mnist_dir, tmp_path,
                                                                    capfd):
  """As after a power loss: every small file of every checkpoint empty (the array data intact). Each
  checkpoint is one warning line and moved aside (none deleted); the run starts afresh, ends as before."""
  wd = _copy(lenet_run[0], tmp_path)
  kept = steps_in(wd)
  for root, _, names in os.walk(os.path.join(wd, "checkpoints")):
    for name in names:
      if os.path.basename(root) != "d":
        open(os.path.join(root, name), "wb").close()
  capfd.readouterr()
  summary = train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  captured = capfd.readouterr()
  err = [l for l in captured.err.splitlines() if l.strip()]
  assert len(err) == len(kept) and all(l.startswith("warning: checkpoint") and "damaged" in l for l in err), err
  assert "Resuming" not in captured.out
  assert sorted(int(m.split("-")[0]) for m in os.listdir(os.path.join(wd, ckpt_lib.DAMAGED_DIR))) == kept
  assert summary["steps"] == 8 and summary["final_top1"] == lenet_run[1]["final_top1"]
  assert_trees_equal(load_state(wd, 8), load_state(lenet_run[0], 8))


def _drop_checksums(wd, step):
  path = os.path.join(wd, "checkpoints", str(step), "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  del meta["checksums"]
  with open(path, "w") as f:
    json.dump(meta, f)


def test_a_checkpoint_without_checksums_is_used_and_said_to_be_unverified(lenet_run, fashion_mnist_dir,
                                                                         tmp_path, capfd):
  """A checkpoint of an older run (no checksums in its meta) cannot be verified, so a flipped bit in it
  would go unseen: one line says so, and it is used (restored, nothing moved)."""
  wd = _copy(lenet_run[0], tmp_path)
  _drop_checksums(wd, 8)
  capfd.readouterr()
  train.train_and_evaluate(_lenet_config(fashion_mnist_dir), wd)
  captured = capfd.readouterr()
  err = [l for l in captured.err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("note: checkpoint 8") and "cannot be verified" in err[0], err
  assert "from step 8." in captured.out and not os.path.exists(os.path.join(wd, ckpt_lib.DAMAGED_DIR))


def test_damaged_small_files_print_one_line_each_on_the_command_line(lenet_run, fashion_mnist_dir, tmp_path):
  """train.py with checkpoint 8's `_CHECKPOINT_METADATA` garbage (Orbax logged a raw 'Failed to json parse'
  line and restored it) and one bit flipped in checkpoint 6's array metadata ("jax.Array" -> "jay.Array"):
  two warning lines, nothing else on stderr, resumed from 4."""
  wd = _copy(lenet_run[0], tmp_path)
  _write(wd, 8, "_CHECKPOINT_METADATA", b"{garbage\n")
  path = os.path.join(wd, "checkpoints", "6", "state", "_METADATA")
  with open(path, "rb") as f:
    data = f.read()
  _write(wd, 6, "state/_METADATA", data.replace(b'"jax.Array"', b'"jay.Array"', 1))
  proc = _train_py(_lenet_args(wd, fashion_mnist_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 2 and lines[0].startswith("warning: checkpoint 8") and \
      lines[1].startswith("warning: checkpoint 6"), proc.stderr[-3000:]
  for noise in _NOISE:
    assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
  assert "from step 4." in proc.stdout


def test_a_flipped_bit_in_the_array_metadata_is_one_reason_without_warnings(lenet_run, tmp_path):
  """One bit flipped in each array's type in `state/_METADATA` ("jax.Array" -> "kax.Array"): Damaged with a
  one-line reason, and none of the "coroutine 'ArrayHandler.metadata' was never awaited" RuntimeWarnings of
  the reads Orbax abandons (they are freed with Orbax's exception, after the read)."""
  wd = _copy(lenet_run[0], tmp_path)
  step_dir = os.path.join(wd, "checkpoints", "8")
  path = os.path.join(step_dir, "state", "_METADATA")
  with open(path, "rb") as f:
    original = f.read()
  meta = json.load(open(os.path.join(step_dir, "meta", "metadata")))
  starts = [i for i in range(len(original)) if original.startswith(b'"jax.Array"', i)]
  assert len(starts) > 10
  for start in starts:
    with open(path, "wb") as f:
      f.write(original[:start + 1] + b"k" + original[start + 2:])  # 'j' ^ 0x01
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with pytest.raises(checkpoint_files.Damaged, match="kax.Array") as damaged:
        checkpoint_files.saved_arrays(step_dir, meta)
      del damaged
      gc.collect()
    assert not [str(w.message) for w in caught], (start, [str(w.message) for w in caught])


def _small_filesystem_prefix(tmp_path, size_kb):
  """A command prefix that runs the rest with a `size_kb` tmpfs mounted on tmp_path/small (a private mount
  namespace: no root needed, nothing left mounted), or skips the test where that is not allowed."""
  mount = tmp_path / "small"
  mount.mkdir()
  script = f'mount -t tmpfs -o size={size_kb}k tmpfs "{mount}" && exec "$@"'
  prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
  if not shutil.which("unshare") or subprocess.run(prefix + ["true"], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs in a user namespace here (unshare)")
  return prefix, str(mount)


def test_a_full_disk_is_one_line_without_tracebacks(fashion_mnist_dir, tmp_path):
  """The workdir on a real 150 KiB file system, full at the first checkpoint (~120 KiB): status 2 and the one
  `error:` line. Before, dozens of 'RuntimeError: Event loop is closed' tracebacks came first: tensorstore's
  completions of the writes Orbax abandoned, reported from C++ threads (tests/test_errors.py's disk-full test
  fails Python's writes only, which never reach them)."""
  prefix, mount = _small_filesystem_prefix(tmp_path, 150)
  proc = _train_py(_lenet_args(os.path.join(mount, "w"), fashion_mnist_dir), prefix)
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: could not write the checkpoint"), proc.stderr[-3000:]
  assert "no space left" in lines[0]
  for noise in _NOISE:
    assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
