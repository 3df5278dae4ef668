"""The device-resident input (cnn_jax/data/device_input.py) and its array cache (cnn_jax/data/arrays.py).

Real Fashion-MNIST throughout: the session's array cache (conftest.py points CNN_JAX_ARRAY_CACHE_DIR at a
temporary folder) is written once from the prepared tfds data and read with numpy.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_jax import hooks
from cnn_jax import sharding as shd
from cnn_jax import steps as steps_lib
from cnn_jax import train
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.data import arrays
from cnn_jax.data import device_input
from cnn_jax.data import inputs
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A subprocess that cannot import TensorFlow: sys.modules entries of None make `import tensorflow` fail (and
# importlib.util.find_spec say it is not installed), as on an image without it. Every import statement that
# names it is recorded: code that tries TensorFlow and falls back without it would load it, slowly, wherever
# it is installed.
_NO_TF = r"""
import builtins, os, runpy, sys
sys.modules["tensorflow"] = None
sys.modules["tensorflow_datasets"] = None
tried = set()
real_import = builtins.__import__
def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
  if level == 0 and name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
    tried.add(name)
  return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = recording_import
sys.path.insert(0, os.getcwd())
sys.argv = ["train.py"] + sys.argv[1:]
try:
  runpy.run_path("train.py", run_name="__main__")
finally:
  loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
                  and sys.modules[m] is not None)
  print("TF_MODULES_LOADED", loaded, flush=True)
  print("TF_IMPORTS_TRIED", sorted(tried), flush=True)
"""


def _config(data_dir, **overrides):
  sys.path.insert(0, REPO)
  from configs import lenet  # pylint: disable=g-import-not-at-top
  config = lenet.get_config("smoke")
  config.progress = False
  return apply_overrides(config, dict(dict(data_dir=data_dir, input="device"), **overrides))


def _run_no_tf(args, tmp_path, env=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-c", _NO_TF] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


# --- The array cache -----------------------------------------------------------------------------

def test_array_cache_holds_the_tfds_images_and_labels(fashion_mnist_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(fashion_mnist_dir)
  cached = arrays.get_split(config, "test", None)
  assert cached.images.shape == (10_000, 28, 28, 1) and cached.images.dtype == np.uint8
  assert cached.labels.dtype == np.int32 and len(cached.class_names) == 10
  ds = tfds.load("fashion_mnist", split="test[:200]", data_dir=fashion_mnist_dir, as_supervised=True)
  for i, (image, label) in enumerate(tfds.as_numpy(ds)):
    np.testing.assert_array_equal(cached.images[i], image)
    assert cached.labels[i] == label


def _damage(path, how):
  images = os.path.join(path, "images.npy")
  if how == "truncated":
    with open(images, "r+b") as f:
      f.truncate(os.path.getsize(images) - 100)
  elif how == "bit_flip":
    with open(images, "r+b") as f:
      f.seek(5000)
      byte = f.read(1)
      f.seek(5000)
      f.write(bytes([byte[0] ^ 0x10]))
  elif how == "shape":
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["files"]["images.npy"]["shape"] = [10_000, 28, 28, 3]
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
  elif how == "meta_missing":
    os.remove(os.path.join(path, "meta.json"))


@pytest.mark.parametrize("how,reason", [("truncated", "bytes"), ("bit_flip", "SHA-256"),
                                        ("shape", "meta.json says"), ("meta_missing", "missing")])
def test_damaged_cache_is_detected_and_rebuilt(fashion_mnist_dir, tmp_path, capsys, how, reason):
  config = _config(fashion_mnist_dir, array_cache_dir=str(tmp_path / "arrays"))
  path = arrays.get_split(config, "test", None).path
  good = np.array(np.load(os.path.join(path, "images.npy")))
  _damage(path, how)
  if how != "meta_missing":
    with pytest.raises(arrays.StaleCacheError, match=reason):
      arrays.load_split(path)
  capsys.readouterr()
  rebuilt = arrays.get_split(config, "test", None)
  out = capsys.readouterr().out
  assert ("rebuilding" in out or "Writing" in out), out
  np.testing.assert_array_equal(np.asarray(rebuilt.images), good)


def test_damaged_cache_without_tensorflow_is_refused_in_one_line(fashion_mnist_dir, tmp_path):
  cache = str(tmp_path / "arrays")
  config = _config(fashion_mnist_dir, array_cache_dir=cache, train_split="test[:512]",
                   eval_split="test[512:768]")
  path = arrays.get_split(config, "test", None).path
  _damage(path, "bit_flip")
  before = open(os.path.join(path, "images.npy"), "rb").read()
  proc = _run_no_tf(["--config=configs/lenet.py:smoke", f"--workdir={tmp_path / 'w'}",
                     f"--config.data_dir={fashion_mnist_dir}", "--config.input=device",
                     f"--config.array_cache_dir={cache}", "--config.train_split=test[:512]",
                     "--config.eval_split=test[512:768]"], tmp_path)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert "SHA-256" in errors[0] and "python -m cnn_jax.data.prepare --arrays" in errors[0], errors
  assert "Traceback" not in proc.stderr
  assert open(os.path.join(path, "images.npy"), "rb").read() == before  # nothing touched


def test_changed_folder_source_is_rebuilt(image_folder_factory, tmp_path):
  from tests.conftest import make_image_folder  # pylint: disable=g-import-not-at-top
  root = image_folder_factory()
  config = _config(None, dataset=f"folder:{root}", array_cache_dir=str(tmp_path / "arrays"), array_cache_res=20,
                   image_size=16)
  first = arrays.get_split(config, "train", 20)
  assert first.images.shape == (18, 20, 20, 3) and first.class_names == ("bird", "cat", "dog")
  assert arrays.load_split(first.path).images.shape[0] == 18  # unchanged source: used as is
  make_image_folder(os.path.join(root, "extra"), splits=(("train", 1),), seed=5)  # new files...
  for name in ("bird", "cat", "dog"):  # ...moved into the real class folders
    for f in os.listdir(os.path.join(root, "extra", "train", name)):
      os.replace(os.path.join(root, "extra", "train", name, f), os.path.join(root, "train", name, "new_" + f))
  shutil.rmtree(os.path.join(root, "extra"))
  with pytest.raises(arrays.StaleCacheError, match="changed"):
    arrays.load_split(first.path)
  assert arrays.get_split(config, "train", 20).images.shape[0] == 21


# --- Training without TensorFlow ------------------------------------------------------------------

def test_a_cached_dataset_trains_two_epochs_without_tensorflow(fashion_mnist_dir, tmp_path):
  config = _config(fashion_mnist_dir)
  for split in ("train", "test"):
    arrays.get_split(config, split, None)  # written here (with TensorFlow) before the TF-less run
  workdir = tmp_path / "run"
  proc = _run_no_tf(["--config=configs/lenet.py:smoke", f"--workdir={workdir}", "--cpu_devices=2",
                     f"--config.data_dir={fashion_mnist_dir}", "--config.input=auto",
                     "--config.train_split=train[:1024]", "--config.eval_split=test[:256]",
                     "--config.num_train_steps=-1", "--config.num_epochs=2", "--config.log_every_steps=8"],
                    tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "TF_MODULES_LOADED []" in proc.stdout, proc.stdout[-2000:]
  # Nothing even tried (TensorBoard's writer would, and load TensorFlow where it is installed: 5-7 s here).
  assert "TF_IMPORTS_TRIED []" in proc.stdout, proc.stdout[-2000:]
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 2 * 1024 // 32 and summary["eval_examples"] == 256
  evals = [json.loads(l) for l in open(workdir / "metrics.jsonl") if '"eval"' in l]
  assert [r["epoch"] for r in evals] == [1.0, 2.0]
  assert json.load(open(workdir / "run_info.json"))["input"] == "device"
  assert json.load(open(workdir / "run_info.json"))["fingerprint_fields"]["input"] == "device"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tb"))


# --- Batches ---------------------------------------------------------------------------------------

def _input(data_dir, mesh=None, **overrides):
  config = _config(data_dir, **overrides)
  config.augment.crop = "random_resized"
  config.augment.update(dict(flip=True, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05,
                             pca_lighting=0.1))
  mesh = mesh or shd.make_mesh()
  return inputs.create(config, mesh, announce=lambda line: None)


def test_batches_are_a_function_of_seed_and_step_only(fashion_mnist_dir):
  a = _input(fashion_mnist_dir, train_split="train[:4096]")
  b = _input(fashion_mnist_dir, train_split="train[:4096]")
  other = _input(fashion_mnist_dir, train_split="train[:4096]", seed=1)
  assert isinstance(a, device_input.DeviceInput) and a.steps_per_epoch == 4096 // 32
  for step in (0, 5, a.steps_per_epoch + 3):
    x, y = a.batch(step), b.batch(step)
    np.testing.assert_array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    np.testing.assert_array_equal(np.asarray(x["label"]), np.asarray(y["label"]))
    assert not np.array_equal(np.asarray(x["image"]), np.asarray(other.batch(step)["image"]))
  assert not np.array_equal(np.asarray(a.batch(0)["image"]), np.asarray(a.batch(1)["image"]))
  batch = a.batch(0)
  assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32


def test_batches_do_not_depend_on_the_device_count(fashion_mnist_dir):
  one = _input(fashion_mnist_dir, mesh=shd.make_mesh(jax.devices()[:1]), train_split="train[:2048]")
  eight = _input(fashion_mnist_dir, train_split="train[:2048]")
  for step in (0, 7):
    np.testing.assert_allclose(np.asarray(one.batch(step)["image"]), np.asarray(eight.batch(step)["image"]),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(one.batch(step)["label"]), np.asarray(eight.batch(step)["label"]))


def test_each_epoch_visits_distinct_examples_in_a_new_order(fashion_mnist_dir):
  inp = _input(fashion_mnist_dir, train_split="train[:1000]")  # 31 steps of 32; 8 examples left out
  e0, e1 = np.asarray(inp._permutation(0)), np.asarray(inp._permutation(1))  # pylint: disable=protected-access
  assert e0.shape == (31, 32)
  for perm in (e0, e1):
    flat = perm.ravel()
    assert len(set(flat)) == len(flat) and flat.min() >= 0 and flat.max() < 1000
  assert not np.array_equal(e0, e1)


def test_each_process_draws_only_its_own_part(fashion_mnist_dir):
  """With 3 processes each holds a disjoint, contiguous third (tfds.even_splits' rule, remainder dropped)."""
  config = _config(fashion_mnist_dir)
  split = {"train": arrays.get_split(config, "train", None)}
  parts = []
  for index in range(3):
    images, labels, count = device_input.process_part("train[:1000]", split, drop_remainder=True,
                                                      process_index=index, process_count=3)
    assert count == 333 and len(labels) == 333
    parts.append(images)
  whole = np.asarray(split["train"].images[:999])
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_eval_covers_every_example_once(fashion_mnist_dir):
  """Device eval of the whole test split with odd batch padding = the host pipeline's eval, same state."""
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh()
  device = _input(fashion_mnist_dir, eval_split="test[:1000]", eval_batch_size=96)
  host = inputs.create(apply_overrides(_config(fashion_mnist_dir, eval_split="test[:1000]", eval_batch_size=96),
                                       {"input": "host"}), mesh)
  model = models.get_model("lenet", 10)
  state = steps_lib.jit_init(model, optax.sgd(0.1), (32, 32, 3), out_shardings=shd.replicated(mesh))(
      jax.random.PRNGKey(0))
  a, b = (hooks.evaluate(steps_lib.jit_eval_step(steps_lib.eval_step, inp, mesh), inp, state)
          for inp in (device, host))
  assert a["count"] == b["count"] == 1000
  assert abs(a["top1"] - b["top1"]) < 1e-3 and abs(a["loss"] - b["loss"]) < 1e-3 * b["loss"]


def test_runs_that_differ_only_in_their_seed_compile_one_step(fashion_mnist_dir):
  """The augmentation key is an argument of the jitted step, not a constant in it: seeds 0 and 1 lower the
  very same program, so a seed sweep compiles it once (or loads it from a compilation cache). That the seeds
  still draw different batches: test_batches_are_a_function_of_seed_and_step_only."""
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh()
  state = steps_lib.jit_init(models.get_model("lenet", 10, width=0.25), optax.sgd(0.1), (32, 32, 3),
                             out_shardings=shd.replicated(mesh))(jax.random.PRNGKey(0))
  lowered = []
  for seed in (0, 1):
    inp = inputs.create(_config(fashion_mnist_dir, train_split="train[:1024]", seed=seed), mesh,
                        announce=lambda line: None)
    lowered.append(steps_lib.jit_train_step(steps_lib.train_step, inp, mesh).lower(state, inp.train_spec()).as_text())
  assert lowered[0] == lowered[1]


# --- Choosing the mode ------------------------------------------------------------------------------

def test_a_dataset_too_large_for_the_device_is_one_line_or_falls_back_to_host(fashion_mnist_dir):
  mesh = shd.make_mesh()
  with pytest.raises(UserError, match=r"input=device: .* needs .* GiB on each device.*--config.input=host"):
    inputs.create(_config(fashion_mnist_dir, input_memory_share=1e-6), mesh)
  lines = []
  chosen = inputs.create(_config(fashion_mnist_dir, input="auto", input_memory_share=1e-6), mesh,
                         announce=lines.append)
  assert chosen.mode == "host" and "Input: host" in lines[0]
  with pytest.raises(UserError, match="input"):
    inputs.create(_config(fashion_mnist_dir, input="gpu"), mesh)


# --- Resume -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_mode", ["device", "host"])
def test_stop_and_resume_is_bit_identical(fashion_mnist_dir, tmp_path, input_mode):
  """A run stopped by SIGTERM after step 5 and resumed ends with the same parameters, bit for bit, as an
  uninterrupted run: the resumed input continues with the very batches the uninterrupted run drew (device
  input: they are a function of the step; host input: the tf.data pipeline, which had already prefetched
  batches past the stop, starts again at the resumed step). LeNet with dropout 0.5: the dropout RNG resumes
  too. The same with real processes and kill -9: tests/test_checkpoint.py::test_interrupted_runs_resume_bit_identical."""
  from tests.test_checkpoint import assert_trees_equal, load_state  # pylint: disable=g-import-not-at-top
  fields = dict(train_split="train[:512]", eval_split="test[:128]", num_train_steps=12,
                checkpoint_every_steps=100, eval_every_epochs=0.5, log_every_steps=4, input=input_mode)
  fields["model_kwargs.dropout_rate"] = 0.5
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(_config(fashion_mnist_dir, **fields), reference)

  class SignalAfterStep5:  # the loop's own hook interface: the loop stops before step 6
    def after_step(self, step, state, metrics):
      if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)

    def at_end(self, step, state, stopped):
      pass

  resumed = str(tmp_path / "resumed")
  result = train.train_and_evaluate(_config(fashion_mnist_dir, **fields), resumed, hooks=[SignalAfterStep5()])
  assert result["stopped"] == "SIGTERM" and result["step"] == 5
  summary = train.train_and_evaluate(_config(fashion_mnist_dir, **fields), resumed)
  assert summary["steps"] == 12
  assert json.load(open(os.path.join(reference, "run_info.json")))["input"] == input_mode
  assert_trees_equal(load_state(resumed, 12), load_state(reference, 12))
  ref_summary = json.load(open(os.path.join(reference, "summary.json")))
  for k in ("final_top1", "final_loss", "eval_examples"):
    assert summary[k] == ref_summary[k], k


# --- The two modes train alike ------------------------------------------------------------------------

@pytest.mark.heavy
def test_host_and_device_input_reach_the_same_accuracy(fashion_mnist_dir, fashion_mnist_arrays, tmp_path):
  """LeNet, small geometry (32 px, pad-crop + flip), 2 epochs of a quarter of the Fashion-MNIST train split (234
  steps), once per input mode (train.py on one CPU device, both at once): both learn (LeNet's learning
  test), and the top-1 on the whole test split lands within 1 point (different random draws from the same
  distributions). Measured, seeds 0 / 1 / 2: host 0.7482 / 0.7563 / 0.7486, device 0.7459 / 0.7533 / 0.7516
  (the same seed: 0.2-0.3 points apart; the farthest pair of different seeds, 0.7563 vs 0.7459: 1.04). On half
  the split (468 steps, twice the cost): host 0.7856 / 0.7856 / 0.7892, device 0.7852 / 0.7847 / 0.7850; on the
  whole split, seed 0: 0.8250 / 0.8214."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  procs = {}
  for mode in ("host", "device"):
    procs[mode] = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/lenet.py:small,epochs=2", f"--workdir={tmp_path / mode}",
         "--cpu_devices=1", f"--config.data_dir={fashion_mnist_dir}", f"--config.input={mode}",
         "--config.train_split=train[:15000]",
         "--config.optimizer.learning_rate=0.05", "--config.progress=false", "--config.log_every_steps=50",
         "--config.checkpoint_every_steps=100000", "--config.eval_every_epochs=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for mode, proc in procs.items():
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
  summaries = {mode: json.load(open(tmp_path / mode / "summary.json")) for mode in procs}
  top1 = {mode: s["final_top1"] for mode, s in summaries.items()}
  assert summaries["host"]["eval_examples"] == summaries["device"]["eval_examples"] == 10_000
  assert summaries["host"]["steps"] == summaries["device"]["steps"] == 2 * (15_000 // 128)
  print("top-1 after 2 epochs:", top1)
  assert min(top1.values()) > 0.7, top1  # both learned
  assert abs(top1["host"] - top1["device"]) < 0.01, top1
  for mode, summary in summaries.items():  # what tests/test_train.py checks of the other families' runs
    records = [json.loads(l) for l in open(tmp_path / mode / "metrics.jsonl")]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) >= 4 and train_losses[-1] < 0.9 * train_losses[0], (mode, train_losses)
    assert summary["final_top5"] > summary["final_top1"]
    assert os.path.exists(tmp_path / mode / "run_info.json")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / mode / "tb"))
