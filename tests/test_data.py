"""The input pipeline on real Fashion-MNIST, tfds mock data and generated image folders.

Most tests read small slices ('train[:1000]') so that each builds its pipeline in about a second.
"""

import hashlib
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.data import datasets
from cnn_jax.data import pipeline
from cnn_jax.errors import UserError
from configs import common

NO_AUGMENT = dict(crop="none", flip=False)


def _config(**overrides) -> ml_collections.ConfigDict:
  config = common.get_config()  # every field at its default, then these
  config.update(dict(
      dataset="fashion_mnist", data_dir=None, manual_dir=None, download=False, train_split="train[:1000]",
      eval_split="test[:1000]", image_size=28, batch_size=64, eval_batch_size=96, shuffle_buffer=1000,
      cache=True, cache_dir=None, normalize="none", eval_crop="resize", eval_resize_ratio=1.0))
  config.augment = ml_collections.ConfigDict(dict(config.augment.to_dict(), crop="random_resized", flip=True))
  for key, value in overrides.items():
    if key == "augment":
      value = ml_collections.ConfigDict(value)
    config[key] = value
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _hashes(images):
  return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]


def _raw_hashes(data_dir, split):
  """Hashes of the split's images as the pipeline emits them without augmentation (float32 RGB [0, 1])."""
  ds = tfds.load("fashion_mnist", split=split, data_dir=data_dir)
  images = [np.repeat(ex["image"], 3, -1).astype(np.float32) / 255.0 for ex in tfds.as_numpy(ds)]
  return _hashes(images)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- Fashion-MNIST ------------------------------------------------------------------------------

def test_fashion_mnist_info(fashion_mnist_dir):
  info = datasets.get_dataset_info(_config(data_dir=fashion_mnist_dir, train_split="train", eval_split="auto"))
  assert (info.name, info.num_classes, info.num_train, info.num_eval) == ("fashion_mnist", 10, 60000, 10000)
  assert info.class_names[0] == "T-shirt/top" and len(info.class_names) == 10
  assert info.image_shape == (28, 28, 1)


def test_train_batches_are_rgb_float_images_with_int_labels(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, image_size=32, normalize="auto")
  batch = next(pipeline.create_train_iter(config, seed=0))
  assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < 10 and len(set(batch["label"])) > 3
  # Grayscale in, RGB out (no colour op here): three equal channels.
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  # Normalised with Fashion-MNIST's statistics: roughly zero mean, unit std.
  assert abs(batch["image"].mean()) < 0.3 and 0.7 < batch["image"].std() < 1.3


def test_same_seed_same_batches_other_seed_other_batches(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, augment=dict(crop="random_resized", flip=True,
                                                            brightness=0.3, pca_lighting=0.1))
  first = _take(pipeline.create_train_iter(config, seed=7), 3)
  again = _take(pipeline.create_train_iter(config, seed=7), 3)
  _assert_batches_equal(first, again)
  other = _take(pipeline.create_train_iter(config, seed=8), 3)
  assert not np.array_equal(first[0]["label"], other[0]["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.parametrize("start_step", [5, 14, 17])
def test_resume_at_step_equals_the_uninterrupted_run(fashion_mnist_dir, start_step):
  # 1000 examples / 64 = 15 steps per epoch (40 dropped): 14 and 17 straddle the epoch boundary.
  config = _config(data_dir=fashion_mnist_dir, shuffle_buffer=300)
  uninterrupted = _take(pipeline.create_train_iter(config, seed=3), 20)
  resumed = _take(pipeline.create_train_iter(config, seed=3, start_step=start_step), 20 - start_step)
  _assert_batches_equal(uninterrupted[start_step:], resumed)


def test_an_epoch_visits_distinct_examples_and_the_next_epoch_reorders(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, augment=NO_AUGMENT)
  batches = _take(pipeline.create_train_iter(config, seed=0), 30)
  epoch0 = _hashes(np.concatenate([b["image"] for b in batches[:15]]))
  epoch1 = _hashes(np.concatenate([b["image"] for b in batches[15:]]))
  raw = set(_raw_hashes(fashion_mnist_dir, "train[:1000]"))
  assert len(set(epoch0)) == len(epoch0) == 960 and set(epoch0) <= raw
  assert len(set(epoch1)) == 960 and set(epoch1) <= raw
  assert epoch0 != epoch1


def test_eval_covers_every_example_once_with_exact_mask(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir)  # 1000 examples, batch 96: last batch has 40 real ones
  batches = list(pipeline.create_eval_iter(config))
  assert len(batches) == pipeline.num_eval_batches(config) == 11
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.dtype == bool and masks.sum() == 1000 and not masks[1000:].any()
  for b in batches:
    assert b["image"].shape == (96, 28, 28, 3) and b["label"].dtype == np.int32
  images = np.concatenate([b["image"] for b in batches])[masks]
  assert sorted(_hashes(images)) == sorted(_raw_hashes(fashion_mnist_dir, "test[:1000]"))
  assert np.all(np.concatenate([b["image"] for b in batches])[~masks] == 0)


def test_ten_crop_eval_has_a_crop_axis(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, eval_split="test[:10]", eval_batch_size=8,
                   eval_crop="ten_crop", eval_resize_ratio=32 / 24, image_size=24)
  batches = list(pipeline.create_eval_iter(config))
  assert [b["image"].shape for b in batches] == [(8, 10, 24, 24, 3)] * 2
  assert [b["mask"].sum() for b in batches] == [8, 2]
  np.testing.assert_allclose(batches[0]["image"][:, 5:], batches[0]["image"][:, :5, :, ::-1])


def test_two_processes_read_disjoint_parts(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, augment=NO_AUGMENT, batch_size=64)  # 32 per process
  parts = []
  for process in range(2):
    it = pipeline.create_train_iter(config, seed=0, process_index=process, process_count=2)
    batches = _take(it, 15)  # 500 examples / 32 = 15 steps: one epoch
    assert batches[0]["image"].shape == (32, 28, 28, 3)
    parts.append(set(_hashes(np.concatenate([b["image"] for b in batches]))))
  assert len(parts[0]) == len(parts[1]) == 480 and not parts[0] & parts[1]
  assert parts[0] | parts[1] <= set(_raw_hashes(fashion_mnist_dir, "train[:1000]"))


def test_two_processes_eval_equal_batch_counts_and_cover_the_split(fashion_mnist_dir):
  config = _config(data_dir=fashion_mnist_dir, eval_split="test[:1001]", eval_batch_size=64)
  seen = []
  counts = []
  for process in range(2):
    batches = list(pipeline.create_eval_iter(config, process_index=process, process_count=2))
    counts.append(len(batches))
    assert all(b["image"].shape[0] == 32 for b in batches)
    images = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
    seen.extend(_hashes(images))
  assert counts == [pipeline.num_eval_batches(config, process_count=2)] * 2 == [16, 16]  # 501 and 500 of 32
  assert len(seen) == 1001
  assert sorted(seen) == sorted(_raw_hashes(fashion_mnist_dir, "test[:1001]"))


def test_grayscale_statistics_are_rank_one_and_pca_lighting_keeps_grey(fashion_mnist_dir, tmp_path):
  config = _config(data_dir=fashion_mnist_dir, cache_dir=str(tmp_path),
                   augment=dict(crop="none", pca_lighting=0.5))
  source = datasets.get_source(config)
  stats = datasets.rgb_statistics(source, "train[:1000]", str(tmp_path), max_images=500)
  assert 0.25 < stats.mean[0] < 0.33 and np.allclose(stats.mean, stats.mean[0])
  assert stats.eigvals[1] < 1e-6 * stats.eigvals[0] and stats.eigvals[0] > 0.05
  np.testing.assert_allclose(np.array(stats.eigvecs)[:, 0], np.full(3, 3 ** -0.5), atol=1e-5)
  cached = [f for f in os.listdir(tmp_path) if f.startswith("rgb_stats_fashion_mnist")]
  assert len(cached) == 1 and json.load(open(tmp_path / cached[0]))["num_images"] == 500
  batch = next(pipeline.create_train_iter(config, seed=0))
  np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 1], atol=1e-6)
  assert not np.allclose(batch["image"][0].mean(), batch["image"][1].mean())


# --- tfds mock data (datasets we cannot download here) ------------------------------------------

@pytest.mark.parametrize("name,num_classes,eval_split", [("cifar10", 10, "test"),
                                                          ("imagenet2012", 1000, "validation")])
def test_mock_datasets(name, num_classes, eval_split, tmp_path):
  config = _config(dataset=name, data_dir=str(tmp_path), train_split="train", eval_split="auto",
                   image_size=32, batch_size=8, eval_batch_size=16, normalize="auto",
                   augment=dict(crop="random_resized", flip=True, brightness=0.4, contrast=0.4,
                                saturation=0.4, hue=0.1, pca_lighting=0.1))
  with tfds.testing.mock_data(num_examples=20):
    info = datasets.get_dataset_info(config)
    assert info.num_classes == num_classes and info.num_train == info.num_eval == 20
    assert datasets.resolve_splits(config, datasets.get_source(config))[1] == eval_split
    batches = _take(pipeline.create_train_iter(config, seed=0), 3)  # crosses the epoch of 2 steps
    assert batches[0]["image"].shape == (8, 32, 32, 3) and np.isfinite(batches[0]["image"]).all()
    assert 0 <= batches[0]["label"].min() and batches[0]["label"].max() < num_classes
    evals = list(pipeline.create_eval_iter(config))
    assert len(evals) == 2 and sum(b["mask"].sum() for b in evals) == 20


# --- Image folders ------------------------------------------------------------------------------

def test_image_folder_dataset(image_folder_dir, tmp_path):
  config = _config(dataset="folder:" + image_folder_dir, train_split="train", eval_split="auto",
                   image_size=24, batch_size=4, eval_batch_size=4, cache_dir=str(tmp_path),
                   augment=dict(crop="resize_random_crop", flip=True, pca_lighting=0.1, saturation=0.4))
  info = datasets.get_dataset_info(config)
  assert info.class_names == ("bird", "cat", "dog") and (info.num_train, info.num_eval) == (18, 9)
  config_with_slices = _config(dataset="folder:" + image_folder_dir, train_split="train[:50%]+test[:2]",
                               eval_split="test")
  assert datasets.get_dataset_info(config_with_slices).num_train == 11
  assert info.image_shape == (None, None, 3)
  batches = _take(pipeline.create_train_iter(config, seed=0), 5)
  assert batches[0]["image"].shape == (4, 24, 24, 3)
  assert set(np.concatenate([b["label"] for b in batches])) == {0, 1, 2}
  assert any(f.startswith("rgb_stats_folder") for f in os.listdir(tmp_path))  # PCA eigen from the data
  evals = list(pipeline.create_eval_iter(config))
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 9
  labels = np.concatenate([b["label"][b["mask"]] for b in evals])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_show_augment_writes_a_grid(image_folder_dir, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import show_augment  # pylint: disable=g-import-not-at-top
  config = _config(dataset="folder:" + image_folder_dir, train_split="train", eval_split="test",
                   image_size=32,
                   augment=dict(crop="random_resized", flip=True, hue=0.1))
  out = str(tmp_path / "grid.png")
  assert show_augment.show(config, out, num_images=3, num_views=4, seed=0, min_cell=64) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape == (3 * 64, 5 * 64, 3)
  cells = grid[64:128].reshape(64, 5, 64, 3).transpose(1, 0, 2, 3)  # the second row's five cells
  assert len({c.tobytes() for c in cells}) == 5  # original and four different views


def test_image_folder_order_matches_tfds_image_folder(image_folder_dir):
  source = datasets.get_source(_config(dataset="folder:" + image_folder_dir))
  ours = [os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p) for p, _ in source.splits["train"]]
  ds = tfds.ImageFolder(image_folder_dir).as_dataset(split="train", shuffle_files=False)
  theirs = [p.decode().split(os.sep)[-2] + "/" + os.path.basename(p.decode())
            for p in tfds.as_numpy(ds.map(lambda ex: ex["image/filename"]))]
  assert ours == theirs


# --- Bad input ----------------------------------------------------------------------------------

def test_unknown_dataset():
  with pytest.raises(UserError, match="no_such_dataset"):
    datasets.get_dataset_info(_config(dataset="no_such_dataset"))


def test_unprepared_dataset_without_manual_dir(tmp_path):
  with pytest.raises(UserError, match="manual_dir"):
    datasets.get_dataset_info(_config(dataset="mnist", data_dir=str(tmp_path)))


def test_manual_dir_that_does_not_exist(tmp_path):
  with pytest.raises(UserError, match="manual_dir"):
    datasets.get_dataset_info(_config(dataset="mnist", data_dir=str(tmp_path), manual_dir=str(tmp_path / "x")))


def test_manual_dir_without_the_source_files(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="images-idx3-ubyte.gz.*manual_dir"):
    datasets.get_dataset_info(_config(dataset="mnist", data_dir=str(tmp_path / "tfds"),
                                  manual_dir=str(tmp_path / "empty")))


def test_unknown_split(fashion_mnist_dir):
  with pytest.raises(UserError, match="validation"):
    datasets.get_dataset_info(_config(data_dir=fashion_mnist_dir, eval_split="validation"))
  with pytest.raises(UserError, match="test.:20000"):
    datasets.get_dataset_info(_config(data_dir=fashion_mnist_dir, eval_split="test[:20000]"))


def test_batch_not_divisible_by_processes(fashion_mnist_dir):
  with pytest.raises(UserError, match="batch_size"):
    pipeline.create_train_iter(_config(data_dir=fashion_mnist_dir, batch_size=63), seed=0, process_count=2)
  with pytest.raises(UserError, match="eval_batch_size"):
    pipeline.create_eval_iter(_config(data_dir=fashion_mnist_dir, eval_batch_size=5), process_count=2)


def test_unknown_augment_field(fashion_mnist_dir):
  with pytest.raises(UserError, match="flipp"):
    pipeline.create_train_iter(_config(data_dir=fashion_mnist_dir, augment=dict(flipp=True)), seed=0)


def test_empty_class_folder_is_named(image_folder_factory):
  root = image_folder_factory()
  os.makedirs(os.path.join(root, "train", "empty_class"))
  with pytest.raises(UserError, match="empty_class"):
    datasets.get_dataset_info(_config(dataset="folder:" + root))


def test_missing_image_folder(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    datasets.get_dataset_info(_config(dataset="folder:" + str(tmp_path / "nowhere")))


def test_file_that_is_not_an_image_is_named(image_folder_factory):
  # Files are not opened while listing (that took minutes for large folders): the first decode names it.
  root = image_folder_factory()
  bad = os.path.join(root, "train", "cat", "notes.jpg")
  with open(bad, "wb") as f:
    f.write(b"this is not a jpeg")
  config = _config(dataset="folder:" + root, train_split="train", eval_split="test", batch_size=4,
                   image_size=16)
  assert datasets.get_dataset_info(config).num_train == 19
  with pytest.raises(UserError, match="notes.jpg.*not a readable image"):
    next(pipeline.create_train_iter(config, seed=0))


def test_truncated_image_is_named_when_decoding(image_folder_factory):
  root = image_folder_factory()
  path = os.path.join(root, "test", "dog", "img_2.jpg")  # a JPEG (every 3rd file)
  with open(path, "rb") as f:
    head = f.read()[:300]  # the header survives: only decoding notices
  with open(path, "wb") as f:
    f.write(head)
  config = _config(dataset="folder:" + root, eval_split="test", eval_batch_size=4, image_size=16,
                   eval_crop="center")
  with pytest.raises(UserError, match="img_2.jpg"):
    list(pipeline.create_eval_iter(config))
