"""Prediction from a run folder alone (issue #14): the run records everything prediction needs, a damaged
newest checkpoint is skipped, odd image encodings work, and errors name only predict.py's own flags."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax import cli
from cnn_jax import predict
from cnn_jax import train
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gray_run(fashion_mnist_dir, tmp_path_factory):
  """A finished 4-step LeNet run on Fashion-MNIST (grayscale), checkpoints at steps 2 and 4."""
  sys.path.insert(0, REPO)
  from configs import lenet  # pylint: disable=g-import-not-at-top
  config = apply_overrides(lenet.get_config("smoke"), dict(
      data_dir=fashion_mnist_dir, train_split="train[:256]", eval_split="test[:64]", num_train_steps=4,
      checkpoint_every_steps=2, eval_every_epochs=100.0, progress=False))
  workdir = str(tmp_path_factory.mktemp("gray_run"))
  train.train_and_evaluate(config, workdir)
  return workdir


def _copy(workdir, tmp_path):
  dest = str(tmp_path / "run")
  shutil.copytree(workdir, dest)
  return dest


def _png(tmp_path, mode="L"):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  path = str(tmp_path / f"image_{mode}.png")
  Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).convert(mode).save(path)
  return path


def _dataset_moved(workdir):
  """Points the run's config at a data dir that does not exist, as after moving the dataset away."""
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["data_dir"] = "/nonexistent/tfds"
  with open(path, "w") as f:
    json.dump(config, f)


def test_prediction_needs_nothing_but_the_run_folder(gray_run, tmp_path, monkeypatch):
  wd = _copy(gray_run, tmp_path)
  _dataset_moved(wd)
  info = json.load(open(os.path.join(wd, "run_info.json")))
  assert info["channels"] == 1 and info["class_names"][9] == "Ankle boot"
  assert info["eval_preprocess"] == {"eval_crop": "center", "eval_resize_ratio": 1.0, "image_size": 32,
                                     "eval_flip": False}
  assert np.allclose(info["mean_std"], [[0.2860] * 3, [0.3530] * 3])
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top

  def no_dataset(*args, **kwargs):
    raise AssertionError("prediction listed or rebuilt the dataset")

  monkeypatch.setattr(datasets, "get_source", no_dataset)
  predictor = predict.Predictor.from_run(workdir=wd)
  (path, top), = predictor.predict_files([_png(tmp_path)], k=3)
  assert predictor.step == 4 and len(top) == 3 and top[0][0] in info["class_names"]


def test_cmyk_jpeg_on_a_grayscale_run(gray_run, tmp_path):
  """TF cannot decode a CMYK JPEG to one channel (it raised InvalidArgumentError with a traceback)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  cmyk = str(tmp_path / "cmyk.jpg")
  Image.open(_png(tmp_path, "RGB")).convert("CMYK").save(cmyk, quality=95)
  assert Image.open(cmyk).mode == "CMYK"
  predictor = predict.Predictor.from_run(workdir=gray_run)
  (_, top), = predictor.predict_files([cmyk], k=5)
  probs = [p for _, p in top]
  assert len(top) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  # The same picture as a grayscale PNG gets the same input, up to JPEG's loss.
  gray = str(tmp_path / "gray.png")
  Image.open(cmyk).convert("L").save(gray)
  a = predictor.preprocess(open(cmyk, "rb").read()).ravel()
  b = predictor.preprocess(open(gray, "rb").read()).ravel()
  assert np.allclose(a, b, atol=1e-5)


def _truncate(workdir, step):
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    for name in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_checkpoint_is_skipped(gray_run, tmp_path, capfd):
  wd = _copy(gray_run, tmp_path)
  _truncate(wd, 4)
  capfd.readouterr()
  predictor = predict.Predictor.from_run(workdir=wd)
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert predictor.step == 2
  assert len(err) == 1 and err[0].startswith("warning: checkpoint 4") and "damaged" in err[0], err
  # Named explicitly, it is an error naming the one to use instead (a flag predict.py takes).
  with pytest.raises(UserError, match=r"damaged .*--checkpoint=.*checkpoints/2"):
    predict.Predictor.from_run(checkpoint=os.path.join(wd, "checkpoints", "4"))


def test_a_run_without_the_record_names_only_predicts_flags(gray_run, tmp_path, capfd):
  """A run from before the record, whose dataset moved: the error says --data_dir (predict.py's flag),
  never --config.manual_dir / --config.data_dir (train.py's)."""
  wd = _copy(gray_run, tmp_path)
  _dataset_moved(wd)
  path = os.path.join(wd, "run_info.json")
  recorded = ("channels", "mean_std", "eval_preprocess")
  with open(path) as f:
    info = {k: v for k, v in json.load(f).items() if k not in recorded}
  with open(path, "w") as f:
    json.dump(info, f)
  for step in (2, 4):
    meta_path = os.path.join(wd, "checkpoints", str(step), "meta", "metadata")
    with open(meta_path) as f:
      meta = json.load(f)
    meta.pop("inference")
    with open(meta_path, "w") as f:
      json.dump(meta, f)
  capfd.readouterr()
  status = cli.run(predict.Predictor.from_run, workdir=wd)
  err = capfd.readouterr().err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR and len(err) == 1, err
  assert "--data_dir=" in err[0] and "--config." not in err[0], err[0]
  # With --data_dir it works (from the dataset's metadata).
  assert predict.Predictor.from_run(workdir=wd, data_dir=json.load(open(os.path.join(
      gray_run, "config.json")))["data_dir"]).class_names[9] == "Ankle boot"


def test_predict_py_names_its_checkpoint_and_prints_nothing_else(gray_run, tmp_path):
  """The command line: the checkpoint used (its path, its step of the run's) on stderr, the predictions alone
  on stdout; none of Orbax's INFO/WARNING lines (it printed 13-18)."""
  # A user's environment: none of the suite's TensorFlow log settings.
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "predict.py", f"--workdir={gray_run}", "--top_k=2", _png(tmp_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  assert len(out) == 3 and out[0].endswith("image_L.png:"), out
  # Nor TensorFlow's C++ start-up lines (oneDNN's, on AVX-512 CPUs): predict.py imports TensorFlow.
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert err == [f"checkpoint: {os.path.join(gray_run, 'checkpoints', '4')} (step 4 of 4)"], proc.stderr[-3000:]


def test_an_unfinished_run_is_said_to_be_unfinished(gray_run, tmp_path):
  wd = _copy(gray_run, tmp_path)
  path = os.path.join(wd, "run_info.json")
  with open(path) as f:
    info = json.load(f)
  info["total_steps"] = 5616
  with open(path, "w") as f:
    json.dump(info, f)
  line = predict.Predictor.from_run(workdir=wd).checkpoint_line()
  assert line == f"checkpoint: {os.path.join(wd, 'checkpoints', '4')} (step 4 of 5,616: the run is unfinished)"


def test_an_empty_meta_is_damage_and_no_checksums_is_said(gray_run, tmp_path, capfd):
  """Checkpoint 4's meta `{}` (valid JSON): damaged, skipped with one line; checkpoint 2 without checksums (an
  older run's): used, with one line saying it cannot be verified."""
  wd = _copy(gray_run, tmp_path)
  with open(os.path.join(wd, "checkpoints", "4", "meta", "metadata"), "w") as f:
    f.write("{}")
  meta_path = os.path.join(wd, "checkpoints", "2", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  del meta["checksums"]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  capfd.readouterr()
  predictor = predict.Predictor.from_run(workdir=wd)
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert predictor.step == 2
  assert len(err) == 2 and err[0].startswith("warning: checkpoint 4") and "damaged" in err[0], err
  assert err[1].startswith("note: checkpoint 2") and "cannot be verified" in err[1], err
