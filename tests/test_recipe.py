"""The shared recipe's parts: schedules, weight averaging (EMA), test-time flips, and its bad values."""

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

from cnn_jax import cli
from cnn_jax import models
from cnn_jax import steps as steps_lib
from cnn_jax import train
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.errors import UserError
from cnn_jax.specs import OptimizerSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  sys.path.insert(0, REPO)
  from configs import common  # pylint: disable=g-import-not-at-top
  return apply_overrides(common.get_config("smoke"), overrides)


def _schedule(name, warmup_epochs, total=100, lr=0.1):
  config = _config(**{"schedule.name": name, "schedule.warmup_epochs": warmup_epochs,
                      "optimizer.learning_rate": lr, "batch_size": 128})
  return steps_lib.learning_rate_schedule(OptimizerSpec.from_config(config), steps_per_epoch=10, total_steps=total)


def test_linear_to_zero_and_onecycle_schedules():
  lin = _schedule("linear", 1.0)
  np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10, 55, 100)], [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)
  with pytest.raises(UserError, match="linear rises to its peak"):  # it needs its rise (specs.py)
    _schedule("linear", 0.0)
  one = _schedule("onecycle", 3.0)
  values = np.array([float(one(s)) for s in range(101)])
  assert int(np.argmax(values)) == 30 and values.max() == pytest.approx(0.1, rel=1e-5)
  assert values[0] == pytest.approx(0.1 / 25, rel=1e-4) and values[100] < 1e-5


def _tiny_state(ema):
  model = models.get_model("lenet", 10, width=0.25)
  return steps_lib.jit_init(model, optax.sgd(0.5, momentum=0.9), (28, 28, 1), ema=ema)(jax.random.PRNGKey(0))


def test_ema_follows_the_weights_and_eval_uses_it():
  state = _tiny_state(ema=True)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  step = jax.jit(functools.partial(steps_lib.train_step, ema_decay=0.9))
  expected = jax.tree.map(np.asarray, state.ema["params"])
  for t in range(5):
    state, _ = step(state, batch)
    decay = min(0.9, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p), expected, state.params)
  for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(state.ema["params"])):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.ema["params"]),
                                                     jax.tree.leaves(state.params)))
  eval_batch = dict(batch, mask=jnp.ones(16, bool))
  on_ema = steps_lib.eval_step(state, eval_batch)
  on_raw = steps_lib.eval_step(state.replace(ema=None), eval_batch)
  on_avg = steps_lib.eval_step(state.replace(params=state.ema["params"], ema=None), eval_batch)
  assert float(on_ema["loss"]) == pytest.approx(float(on_avg["loss"]), rel=1e-6)
  assert float(on_ema["loss"]) != pytest.approx(float(on_raw["loss"]), rel=1e-6)


def test_flip_averages_the_logits_of_the_image_and_its_mirror():
  state = _tiny_state(ema=False)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28, 28, 1)), jnp.float32)
  labels = jnp.arange(4, dtype=jnp.int32)
  batch = {"image": x, "label": labels, "mask": jnp.ones(4, bool)}
  logits = lambda images: state.apply_fn({"params": state.params}, images, train=False)
  mean = (logits(x) + logits(x[:, :, ::-1])) / 2
  want = float(jnp.sum(steps_lib.cross_entropy(mean, labels)))
  assert float(steps_lib.eval_step(state, batch, flip=True)["loss"]) == pytest.approx(want, rel=1e-5)
  mirrored = dict(batch, image=x[:, :, ::-1])
  assert float(steps_lib.eval_step(state, mirrored, flip=True)["loss"]) == pytest.approx(want, rel=1e-5)


def test_a_run_with_ema_resumes_bit_identical(fashion_mnist_dir, fashion_mnist_arrays, tmp_path):
  """The average is part of the train state: saved, restored, and the resumed run ends where an
  uninterrupted one does, bit for bit (device input, LeNet)."""
  from tests.test_checkpoint import assert_trees_equal, load_state  # pylint: disable=g-import-not-at-top
  fields = {"model": "lenet", "data_dir": fashion_mnist_dir, "input": "device", "train_split": "train[:512]",
            "eval_split": "test[:128]", "num_train_steps": 8, "checkpoint_every_steps": 4, "progress": False,
            "optimizer.ema_decay": 0.99, "eval_flip": True}
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_config(**fields), reference)

  class StopAfterStep4:
    def after_step(self, step, state, metrics):
      return "a test's stop" if step == 4 else None

    def at_end(self, step, state, stopped):
      pass

  resumed = str(tmp_path / "resumed")
  assert train.train_and_evaluate(_config(**fields), resumed, hooks=[StopAfterStep4()])["step"] == 4
  summary = train.train_and_evaluate(_config(**fields), resumed)
  assert summary["steps"] == 8
  a, b = load_state(resumed, 8), load_state(reference, 8)
  assert "ema" in a
  assert_trees_equal(a, b)
  assert summary["final_top1"] == json.load(open(os.path.join(reference, "summary.json")))["final_top1"]


@pytest.mark.parametrize("flag,expect", [
    ("--config.optimizer.label_smoothing=-0.1", "--config.optimizer.label_smoothing=-0.1 must be a finite number in [0, 1)"),
    ("--config.optimizer.ema_decay=1.0", "--config.optimizer.ema_decay=1.0 must be a finite number in [0, 1)"),
    ("--config.optimizer.momentum=1.5", "--config.optimizer.momentum=1.5 must be"),
    ("--config.schedule.warmup_epochs=-1", "--config.schedule.warmup_epochs=-1"),
    ("--config.schedule.name=triangle", "--config.schedule.name='triangle' is not one of"),
    ("--config.schedule.warmup_epochs=0 --config.schedule.name=onecycle", "onecycle rises to its peak"),
    ("--config.schedule.warmup_epochs=0 --config.schedule.name=linear", "linear rises to its peak"),
])
def test_recipe_fields_out_of_range_are_one_line_and_write_nothing(flag, expect, tmp_path):
  workdir = tmp_path / "w"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "train.py", "--config=configs/nin.py:smoke", f"--workdir={workdir}"]
                        + flag.split(), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == cli.EXIT_USER_ERROR and len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_the_recipe_sweep_varies_one_part_of_the_recipe_for_every_family_at_once():
  from cnn_jax.compare import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  sweep = sweep_lib.load_sweep("configs/sweeps/recipe.py:stage=schedule,epochs=2,lr=0.1,"
                               "optimizer.nesterov=True,dataset=folder:/data/x")
  assert sweep.varies == ("model", "schedule.name")  # the family and the studied part, nothing else
  assert len(sweep.runs) == 9 and {r.overrides["model"] for r in sweep.runs} == {"alexnet", "vgg11", "nin"}
  config = sweep_lib.run_config(sweep, sweep.runs[0])
  assert config.optimizer.nesterov and config.optimizer.learning_rate == 0.1 and config.num_epochs == 2
  assert config.dataset == "folder:/data/x" and config.model_kwargs.width == 0.25
  assert config.model_kwargs.geometry == "small"
  lrs = sweep_lib.load_sweep("configs/sweeps/recipe.py:stage=lr,values=0.05+0.1,models=nin")
  assert [r.overrides["optimizer.learning_rate"] for r in lrs.runs] == [0.05, 0.1]
  # A stage's own field without a dot (batch_size, eval_flip) sets the base recipe too, as the search passes it.
  later = sweep_lib.load_sweep("configs/sweeps/recipe.py:stage=lr,values=0.05,models=nin,batch_size=64,eval_flip=True")
  config = sweep_lib.run_config(later, later.runs[0])
  assert config.batch_size == 64 and config.eval_flip and config.optimizer.learning_rate == 0.05
