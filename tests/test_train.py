"""The spine end to end: sharded step equivalence, real learning on Fashion-MNIST, train.py runs, bad input."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import models
from cnn_jax import sharding as shd
from cnn_jax import steps as steps_lib
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.specs import OptimizerSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  sys.path.insert(0, REPO)
  from configs import common  # pylint: disable=g-import-not-at-top
  return apply_overrides(common.get_config("smoke"), overrides)


def _one_step(state, mesh, batch):
  repl = shd.replicated(mesh)
  state = jax.device_put(state, repl)
  step = jax.jit(steps_lib.train_step, in_shardings=(repl, shd.batch_sharded(mesh)),
                 out_shardings=(repl, repl))
  global_batch = shd.make_global_batch(batch, mesh)
  for _ in range(2):
    state, metrics = step(state, global_batch)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("name,kwargs", [
    ("nin", dict(geometry="small", width=0.25)),           # dropout: masks must not depend on sharding
    ("vgg11_bn", dict(geometry="small", width=0.125)),     # BatchNorm: statistics over the global batch
])
def test_sharded_step_matches_single_device(name, kwargs):
  """Two SGD steps on 8 devices (batch split on `data`) equal the same steps on 1 device."""
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see conftest.py)"
  model = models.get_model(name, 10, **kwargs)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size=16).astype(np.int32)}
  state = steps_lib.jit_init(model, optax.sgd(0.1, momentum=0.9), (32, 32, 3))(jax.random.PRNGKey(0))
  s1, m1 = _one_step(state, shd.make_mesh(jax.devices()[:1]), batch)
  s8, m8 = _one_step(state, shd.make_mesh(), batch)
  # Same math, different reduction order across devices: float32 rounding only.
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if s1.batch_stats is not None:
    for a, b in zip(jax.tree.leaves(s1.batch_stats), jax.tree.leaves(s8.batch_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s8.step) == 2


@pytest.mark.parametrize("name,kwargs", [("lenet", {}), ("nin", dict(geometry="small", width=0.25))])
def test_init_at_o2_is_bit_identical(name, kwargs):
  """steps.jit_init compiles the init at LLVM -O2 (1.6-5x less compile time than -O3 on this CPU,
  benchmarks/init_compile.py): the very same parameters, optimiser state and key as XLA's default, bit for bit."""
  from tests.test_checkpoint import assert_trees_equal  # pylint: disable=g-import-not-at-top
  model = models.get_model(name, 10, **kwargs)
  tx = optax.sgd(0.1, momentum=0.9)
  key = jax.random.PRNGKey(3)
  assert steps_lib.init_compiler_options() == {"xla_backend_optimization_level": 2}  # on the CPU
  fast = steps_lib.jit_init(model, tx, (32, 32, 3))(key)
  default = jax.jit(lambda k: steps_lib.create_train_state(model, tx, k, (32, 32, 3)))(key)
  assert len(jax.tree.leaves(fast)) > 4
  assert_trees_equal(fast, default)


def test_fresh_and_restored_states_trace_the_same_train_step():
  """A restored state holds plain int32 / float32 arrays; a fresh one must too (flax's TrainState.create starts
  `step` at a weakly typed 0). Otherwise the first launch and every resume trace different train steps, and a
  restart compiles again instead of loading the first launch's executable from a persistent compilation cache
  (the HLO differed in how the schedule's clip on `step` and on the optimiser's count were shared)."""
  config = _config(batch_size=16)
  schedule = steps_lib.learning_rate_schedule(OptimizerSpec.from_config(config), steps_per_epoch=10, total_steps=100)
  model = models.get_model("lenet", 10, width=0.25)
  fresh = steps_lib.jit_init(model, steps_lib.make_optimizer(OptimizerSpec.from_config(config), schedule), (28, 28, 1))(
      jax.random.PRNGKey(0))
  assert not any(jax.typeof(x).weak_type for x in jax.tree.leaves(fresh)), jax.tree.map(jax.typeof, fresh)
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), fresh)  # what a checkpoint restore returns
  batch = {"image": jnp.zeros((16, 28, 28, 1)), "label": jnp.zeros((16,), jnp.int32)}
  step = jax.jit(functools.partial(steps_lib.train_step, schedule=schedule))
  assert step.lower(fresh, batch).as_text() == step.lower(restored, batch).as_text()


def test_learning_rate_schedules():
  config = _config(batch_size=128)
  config.optimizer.learning_rate = 0.1
  config.schedule.warmup_epochs = 1.0
  cos = steps_lib.learning_rate_schedule(OptimizerSpec.from_config(config), steps_per_epoch=10, total_steps=100)
  assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 0.1) < 1e-6 and float(cos(100)) < 1e-6
  config.schedule.name = "step"
  config.schedule.warmup_epochs = 0.0
  config.schedule.step_epochs = (5, 8)
  st = steps_lib.learning_rate_schedule(OptimizerSpec.from_config(config), steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([float(st(s)) for s in (0, 49, 50, 79, 80)],
                             [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_weight_decay_skips_biases():
  config = _config()
  config.optimizer.weight_decay = 0.5
  tx = steps_lib.make_optimizer(OptimizerSpec.from_config(config), optax.constant_schedule(1.0))
  params = {"conv": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)  # -lr * wd * w
  np.testing.assert_allclose(updates["conv"]["bias"], 0.0)


def test_topk_matches_lax_top_k_including_ties():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.integers(0, 3, size=(64, 10)).astype(np.float32))  # many ties
  labels = jnp.asarray(rng.integers(0, 10, size=64).astype(np.int32))
  for k in (1, 5):
    _, top = jax.lax.top_k(logits, k)
    expected = np.any(np.asarray(top) == np.asarray(labels)[:, None], axis=-1)
    np.testing.assert_array_equal(np.asarray(steps_lib._topk_correct(logits, labels, k)), expected)


def test_eval_step_masks_padding_and_averages_crops():
  model = models.get_model("lenet", 10)
  state = steps_lib.jit_init(model, optax.sgd(0.1), (28, 28, 3))(jax.random.PRNGKey(0))
  x = np.random.default_rng(1).normal(size=(4, 28, 28, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3], np.int32)
  full = steps_lib.eval_step(state, {"image": x, "label": labels, "mask": np.ones(4, bool)})
  part = steps_lib.eval_step(state, {"image": x, "label": labels, "mask": np.array([1, 1, 0, 0], bool)})
  assert float(full["count"]) == 4 and float(part["count"]) == 2
  assert float(part["loss"]) < float(full["loss"])
  # Two identical crops per example average to the single-crop logits.
  crops = steps_lib.eval_step(state, {"image": np.stack([x, x], 1), "label": labels,
                                      "mask": np.ones(4, bool)})
  np.testing.assert_allclose(crops["loss"], full["loss"], rtol=1e-5)


# --- Real learning on Fashion-MNIST (real data from ../shared, prepared once per session) --------

# NiN is the slow starter (ReLUs right before global average pooling, no FC head; the chapter says it "can
# take longer to train", and at LR 0.05 this tiny one collapsed to constant logits): it gets twice the steps,
# a lower LR and a lower bar — 0.2 on 10,000 test images is still far outside chance (0.10 +- 0.003). Its full-length accuracy is measured by the comparison runs (README).
# At width 1/8 like the others (measured: top-1 0.339, train loss 3.02 -> 1.85; 80 CPU-s where width 1/4 took 115).
# LeNet's learning run is tests/test_device_input.py::test_host_and_device_input_reach_the_same_accuracy
# (2 epochs, once per input mode, the same checks as here).
@pytest.mark.heavy
@pytest.mark.parametrize("model,kwargs,lr,steps,min_top1", [
    ("alexnet", dict(geometry="small", width=0.125), 0.04, 150, 0.5),
    ("vgg11", dict(geometry="small", width=0.125), 0.04, 150, 0.5),
    ("nin", dict(geometry="small", width=0.125), 0.02, 300, 0.2),
])
def test_short_fashion_mnist_run_learns(model, kwargs, lr, steps, min_top1, fashion_mnist_dir, tmp_path):
  """A few hundred steps lower the loss and beat chance (0.10) clearly on the whole test split."""
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(model=model, data_dir=fashion_mnist_dir, num_train_steps=steps, batch_size=64,
                   eval_batch_size=512, log_every_steps=25, checkpoint_every_steps=1000)
  config.model_kwargs.update(dict(kwargs, dropout_rate=0.0 if model == "nin" else 0.5))
  config.model_kwargs.width = kwargs.get("width", 1.0)
  config.optimizer.learning_rate = lr
  config.schedule.warmup_epochs = 0.1
  config.progress = False
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["eval_examples"] == 10_000
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert train_losses[-1] < 0.9 * train_losses[0], train_losses
  assert summary["final_top1"] > min_top1, summary
  assert summary["final_top5"] > summary["final_top1"]
  assert os.path.exists(tmp_path / "summary.json") and os.path.exists(tmp_path / "run_info.json")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


# --- train.py as a user runs it ----------------------------------------------------------------

def _run(args, timeout=300, mock_examples=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  cmd = [sys.executable] + (["tests/mock_train.py", str(mock_examples)] if mock_examples else ["train.py"])
  return subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.heavy
@pytest.mark.parametrize("dataset,model", [("cifar10", "nin"), ("imagenet2012", "alexnet")])
def test_train_py_end_to_end_on_mock_data(dataset, model, tmp_path):
  workdir = tmp_path / "run"
  proc = _run([f"--config=configs/{model}.py:smoke,dataset={dataset}", f"--workdir={workdir}",
               "--cpu_devices=4", "--config.num_train_steps=6", "--config.eval_batch_size=16",
               f"--config.data_dir={tmp_path / 'tfds'}"], mock_examples=40)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 6 and summary["num_devices"] == 4
  assert summary["eval_examples"] == 40
  assert "Done:" in proc.stdout and "img/s" in proc.stdout


def test_a_finished_run_run_again_keeps_its_record(fashion_mnist_dir, fashion_mnist_arrays, tmp_path, capsys):
  """The same command after the run finished: it says so and shows the result; summary.json, metrics.jsonl and
  the checkpoints are left exactly as they were (no second eval, no new wall time or img/s)."""
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(model="lenet", data_dir=fashion_mnist_dir, input="device", num_train_steps=4,
                   train_split="train[:512]", eval_split="test[:128]", progress=False)
  workdir = tmp_path / "run"
  first = train.train_and_evaluate(config, str(workdir))
  files = {name: (workdir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))
  capsys.readouterr()
  again = train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert again == json.loads(files["summary.json"]) and again["final_top1"] == first["final_top1"]
  assert "is finished (step 4 of 4)" in out and "Done: lenet" in out, out
  assert {name: (workdir / name).read_bytes() for name in files} == files
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/nin.py:smoke", "--config.model=resnet50"], "resnet50"),
    (["--config=configs/nin.py:smoke,dataset=no_such_dataset"], "no_such_dataset"),
    (["--config=configs/nin.py:smoke", "--cpu_devices=8", "--config.batch_size=12"], "divisible"),
    (["--config=configs/nin.py:smoke", "--config.data_dir=/nonexistent/tfds"], "manual_dir"),
    (["--config=configs/alexnet.py:smoke", "--config.model_kwargs.geometry=native"], "at least"),
])
def test_bad_input_gives_one_clear_line(args, expect, tmp_path, monkeypatch):
  monkeypatch.setenv("CNN_JAX_ARRAY_CACHE_DIR", str(tmp_path / "arrays"))  # nothing cached: data is read
  proc = _run(args + [f"--workdir={tmp_path / 'w'}"], timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
