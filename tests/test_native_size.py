"""Images already at the training size are never resampled: a folder of one image size is cached at that size,
the pad-crop at that size is a pure shift, the eval image is the image itself (host and device input alike),
and predict.py on the eval files gives the run's own eval top-1 exactly. The hold-out of a folder works with
the device input too, holding out the same files as the host pipeline.
"""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cnn_jax import sharding as shd
from cnn_jax import train
from cnn_jax.compare.sweep import apply_overrides
from cnn_jax.data import arrays
from cnn_jax.data import datasets
from cnn_jax.data import inputs
from cnn_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
CLASSES = ("bird", "cat", "dog")


def _uniform_folder(root, per_class=(("train", 24), ("test", 8)), size=SIZE, seed=0):
  """root/<split>/<class>/<i>.png, every image size x size RGB; a class-dependent colour plus noise."""
  rng = np.random.default_rng(seed)
  for split, n in per_class:
    for c, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(n):
        base = np.array([60 + 80 * c, 200 - 60 * c, 120], np.float64)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
  return str(root)


def _raw(root, split):
  """{file name: uint8 [H, W, 3]} of one split, read with PIL."""
  out = {}
  for name in CLASSES:
    folder = os.path.join(root, split, name)
    for f in os.listdir(folder):
      out[os.path.join(name, f)] = np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))
  return out


def _config(root, tmp_path, **overrides):
  sys.path.insert(0, REPO)
  from configs import lenet  # pylint: disable=g-import-not-at-top
  config = lenet.get_config("smoke")
  fields = dict(dataset=f"folder:{root}", image_size=SIZE, batch_size=8, eval_batch_size=8, normalize="none",
                array_cache_dir=str(tmp_path / "arrays"), progress=False)
  fields["augment.crop"], fields["augment.pad"], fields["augment.flip"] = "pad_random_crop", 0, False
  return apply_overrides(config, {**fields, **overrides})


def _as_set(images):
  return sorted(np.asarray(x).tobytes() for x in images)


def test_a_folder_of_one_size_is_cached_at_that_size(tmp_path):
  root = _uniform_folder(tmp_path / "f")
  config = _config(root, tmp_path)
  assert datasets.get_source(config).uniform_size() == (SIZE, SIZE)
  inp = inputs.create(config, shd.make_mesh(), announce=lambda line: None)
  assert inp.mode == "device" and "32x32x3 uint8" in inp.describe()
  cached = arrays.get_split(config, "train", None)
  assert cached.images.shape == (72, SIZE, SIZE, 3)
  assert _as_set(cached.images) == _as_set(_raw(root, "train").values())  # the files' very pixels


@pytest.mark.parametrize("mode", ["device", "host"])
def test_native_size_eval_is_the_image_and_pad_crop_a_pure_shift(tmp_path, mode):
  root = _uniform_folder(tmp_path / "f")
  raw_train, raw_test = _raw(root, "train"), _raw(root, "test")
  mesh = shd.make_mesh()
  # Eval: the image itself, /255 (normalize=none).
  config = _config(root, tmp_path, input=mode, eval_batch_size=24)
  if mode == "device":
    inp = inputs.create(config, mesh, announce=lambda line: None)
    make = jax.jit(inp.make_eval_batch)
    evals = [np.asarray(make(args)["image"])[np.asarray(args[3])] for args in inp.eval_args()]
  else:
    evals = [b["image"][b["mask"]] for b in pipeline.create_eval_iter(config)]
  got = np.concatenate(evals)
  assert got.shape == (24, SIZE, SIZE, 3)
  assert _as_set(got) == _as_set(x.astype(np.float32) / 255.0 for x in raw_test.values())
  # Train, pad 4: every augmented image is a window of the zero-padded image, shifted by 0..8 pixels.
  config = _config(root, tmp_path, input=mode, **{"augment.pad": 4})
  if mode == "device":
    batch = np.asarray(inputs.create(config, mesh, announce=lambda line: None).batch(0)["image"])
  else:
    batch = next(pipeline.create_train_iter(config, seed=0))["image"]
  shifted = set()
  for image in raw_train.values():
    padded = np.pad(image.astype(np.float32) / 255.0, ((4, 4), (4, 4), (0, 0)))
    shifted.update(padded[y:y + SIZE, x:x + SIZE].tobytes() for y in range(9) for x in range(9))
  assert all(np.asarray(x, np.float32).tobytes() in shifted for x in batch)


def test_device_holdout_holds_out_the_files_the_host_pipeline_does(tmp_path):
  root = _uniform_folder(tmp_path / "f", per_class=(("train", 20),))  # no test folder
  mesh = shd.make_mesh()
  config = _config(root, tmp_path, eval_split="holdout:25%", eval_batch_size=16)
  device = inputs.create(config, mesh, announce=lambda line: None)
  assert device.mode == "device" and (device.info.num_train, device.info.num_eval) == (45, 15)
  make = jax.jit(device.make_eval_batch)
  device_eval = np.concatenate([np.asarray(make(a)["image"])[np.asarray(a[3])] for a in device.eval_args()])
  host_eval = np.concatenate([b["image"][b["mask"]] for b in pipeline.create_eval_iter(
      apply_overrides(config, {"input": "host"}))])
  assert len(device_eval) == 15 and _as_set(device_eval) == _as_set(host_eval)
  source = datasets.get_source(config)
  held = {os.path.relpath(p, os.path.join(root, "train")) for p, _ in source.splits["holdout"]}
  raw = _raw(root, "train")
  assert _as_set(device_eval) == _as_set(raw[n].astype(np.float32) / 255.0 for n in held)


@pytest.mark.heavy
def test_predict_on_the_eval_files_gives_the_runs_eval_top1(tmp_path):
  """A short device-input run on a 32 px folder (cached at 32 px), weight averaging and flip averaging on, then
  predict.py's Predictor on every test file: the same top-1 as the run's own final eval, exactly."""
  from cnn_jax import predict  # pylint: disable=g-import-not-at-top
  root = _uniform_folder(tmp_path / "f", per_class=(("train", 64), ("test", 30)))
  config = _config(root, tmp_path, num_train_steps=24, eval_flip=True,
                   **{"augment.pad": 4, "augment.flip": True, "optimizer.ema_decay": 0.9})
  config.normalize = "auto"
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  assert summary["eval_examples"] == 90
  predictor = predict.Predictor.from_run(workdir=workdir)
  paths = [os.path.join(root, "test", c, f) for c in CLASSES for f in sorted(os.listdir(os.path.join(root, "test", c)))]
  results = predictor.predict_files(paths, k=1)
  correct = [top[0][0] == os.path.basename(os.path.dirname(path)) for path, top in results]
  assert np.mean(correct) == pytest.approx(summary["final_top1"], abs=1e-9), (np.mean(correct), summary)
