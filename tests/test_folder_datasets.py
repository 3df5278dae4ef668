"""Image folders as researchers bring them: git clones, macOS zips, odd files, mismatched splits, no test
folder, numeric class names, BMP/WebP, and large folders listed without opening every file."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cnn_jax.data import datasets
from cnn_jax.data import folders
from cnn_jax.data import pipeline
from cnn_jax.errors import UserError
from tests.conftest import make_image_folder
from tests.test_data import _config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_config(root, **overrides):
  kwargs = dict(dataset=f"folder:{root}", train_split="train", eval_split="auto", image_size=16,
                batch_size=4, eval_batch_size=4)
  kwargs.update(overrides)
  return _config(**kwargs)


def _touch(path, content=b"x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content)


def _names(source, split):
  return sorted(os.path.relpath(p, source.root) for p, _ in source.splits[split])


def test_splits_with_different_classes_are_refused_naming_them(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 2),), classes=("cat", "dog"))
  make_image_folder(tmp_path / "f", splits=(("test", 1),), classes=("Cat", "dog"))
  with pytest.raises(UserError) as e:
    datasets.get_source(_folder_config(root))
  message = str(e.value)
  assert "test/ lacks 'cat' (in train/)" in message and "train/ lacks 'Cat' (in test/)" in message
  assert "case-sensitive: Cat vs cat" in message


def test_hidden_and_system_entries_are_ignored(tmp_path):
  clean = make_image_folder(tmp_path / "clean", splits=(("train", 3), ("test", 2)), classes=("a", "b"))
  root = make_image_folder(tmp_path / "clone", splits=(("train", 3), ("test", 2)), classes=("a", "b"))
  for rel in (".git/HEAD", ".git/objects/ab/cdef", "__MACOSX/train/a/._img_0.png", "train/.ipynb_checkpoints/x.png",
              "train/a/.ipynb_checkpoints/img_0-checkpoint.png", "train/a/._img_0.png", "train/a/.DS_Store",
              "test/b/Thumbs.db", ".DS_Store", "train/__MACOSX/a/img.png"):
    _touch(os.path.join(root, rel))
  source = datasets.get_source(_folder_config(root))
  reference = datasets.get_source(_folder_config(clean))
  assert source.class_names == reference.class_names == ["a", "b"]
  assert sorted(source.splits) == ["test", "train"] and source.skipped == {}
  assert _names(source, "train") == _names(reference, "train")


def test_skipped_files_are_counted_and_reported(tmp_path, capsys):
  root = make_image_folder(tmp_path / "f", splits=(("train", 3), ("test", 2)), classes=("a", "b"))
  _touch(os.path.join(root, "train", "a", "notes.txt"))
  _touch(os.path.join(root, "train", "b", "scan.heic"))
  _touch(os.path.join(root, "train", "b", "more", "img.png"))
  _touch(os.path.join(root, "test", "labels.csv"))
  source = datasets.get_source(_folder_config(root))
  assert source.skipped == {".txt files": 1, ".heic files": 1, "nested folders (their images are not used)": 1,
                            "files outside class folders": 1}
  assert len(source.splits["train"]) == 6
  err = capsys.readouterr().err
  assert "skipped" in err and "1 .heic files" in err and "nested folders" in err


def test_bmp_gif_webp_and_tiff_images_are_read(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = {}
  for split in ("train", "test"):
    for c, ext in enumerate(("bmp", "webp", "tif", "png")):
      folder = tmp_path / "f" / split / f"class_{ext}"
      folder.mkdir(parents=True)
      for i in range(2):
        array = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        path = str(folder / f"{i}.{ext}")
        Image.fromarray(array).save(path, **({"lossless": True} if ext == "webp" else {}))
        pixels[path] = array
  source = datasets.get_source(_folder_config(tmp_path / "f"))
  assert source.skipped == {} and len(source.splits["train"]) == 8
  ds = source.read("train").map(lambda ex: {"image": tf.io.decode_image(ex["image"], channels=3,
                                                                      expand_animations=False),
                                            "label": ex["label"]})
  for (path, label), example in zip(source.splits["train"], ds.as_numpy_iterator()):
    np.testing.assert_array_equal(example["image"], pixels[path], err_msg=path)
    assert example["label"] == label
  batch = next(pipeline.create_train_iter(_folder_config(tmp_path / "f"), seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)


def test_damaged_webp_is_named(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 4), ("test", 1)), classes=("a", "b"))
  _touch(os.path.join(root, "train", "a", "broken.webp"), b"RIFF0000WEBPjunk")
  with pytest.raises(UserError, match="broken.webp"):
    next(pipeline.create_train_iter(_folder_config(root), seed=0))


def test_without_a_test_folder_the_error_offers_the_split_flags_and_a_holdout(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 4),), classes=("a", "b"))
  with pytest.raises(UserError) as e:
    datasets.get_dataset_info(_folder_config(root))
  message = str(e.value)
  assert "no test/, val/, validation/ folder" in message and "--config.eval_split=holdout:10%" in message
  assert "--config.train_split=<folder>" in message


def test_holdout_is_stratified_deterministic_and_disjoint(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 10),), classes=("a", "b", "c"))
  config = _folder_config(root, eval_split="holdout:20%")
  info = datasets.get_dataset_info(config)
  assert (info.num_train, info.num_eval) == (24, 6)
  source = datasets.get_source(config)
  held, kept = source.splits["holdout"], source.splits["train"]
  assert not {p for p, _ in held} & {p for p, _ in kept}
  assert sorted(l for _, l in held) == [0, 0, 1, 1, 2, 2]  # 20% of each class
  again = datasets.get_source(_folder_config(root, eval_split="holdout:0.2"))
  assert again.splits["holdout"] == held and again.splits["train"] == kept
  evals = list(pipeline.create_eval_iter(config))
  assert sum(b["mask"].sum() for b in evals) == 6
  with pytest.raises(UserError, match="holdout:10%"):
    datasets.get_source(_folder_config(root, eval_split="holdout:150%"))
  with pytest.raises(UserError, match="for image folders"):
    datasets.get_source(_config(dataset="mnist", eval_split="holdout:10%"))


def test_numeric_class_names_sort_naturally(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 1), ("test", 1)),
                           classes=("10", "2", "1", "class9", "class10"))
  info = datasets.get_dataset_info(_folder_config(root))
  assert info.class_names == ("1", "2", "10", "class9", "class10")


def test_listing_opens_no_file_and_is_cached(tmp_path, monkeypatch):
  root = make_image_folder(tmp_path / "f", splits=(("train", 3), ("test", 1)), classes=("a", "b"))
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def no_open(*args, **kwargs):
    raise AssertionError("the listing opened an image")

  monkeypatch.setattr(Image, "open", no_open)
  folders._list_image_folder.cache_clear()  # pylint: disable=protected-access
  datasets.get_source(_folder_config(root))
  datasets.get_source(_folder_config(root))
  stats = folders._list_image_folder.cache_info()  # pylint: disable=protected-access
  assert (stats.misses, stats.hits) == (1, 1)
  _touch(os.path.join(root, "train", "a", "new.png"))  # the folder changed: listed again
  assert len(datasets.get_source(_folder_config(root)).splits["train"]) == 7


def test_input_pipeline_benchmark_times_a_users_folder(tmp_path):
  root = make_image_folder(tmp_path / "f", splits=(("train", 8), ("test", 2)), classes=("a", "b"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", f"--folder={root}", "--batches=2",
                         "--warmup=1", "--batch_size=4", "--image_size=32"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "2 classes" in proc.stdout and "listed in" in proc.stdout
  assert any(line.startswith("(d) your folder") and "img/s" in line for line in proc.stdout.splitlines()), \
      proc.stdout
