"""Where examples come from: tfds datasets by name (prepared offline from a manual dir) or image folders.

A *source* hands the pipeline undecoded examples `{'image': encoded bytes, 'label': int64}` of one
process's slice of a split, in a fixed order; decoding and augmentation happen in `pipeline.py`.

  config.dataset = 'fashion_mnist' | 'cifar10' | 'imagenette' | 'imagenet2012' | any tfds name
                 | 'folder:/path/to/root'  with root/<split>/<class>/*.{jpg,jpeg,png}

Image folders follow `tfds.ImageFolder`'s rules (sorted class names over all splits, the same
extensions, the same per-split deterministic order), but are listed here so that each process reads only
its slice, and so that an empty class folder or a file that is not an image is named in the error.
"""

import contextlib
import dataclasses
import functools
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
from cnn_jax.data.tf_runtime import tf
import tensorflow_datasets as tfds

from cnn_jax.data import info as info_lib
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.info import FOLDER_PREFIX, DatasetInfo  # pylint: disable=unused-import
from cnn_jax.data.stats import IMAGENET_MEAN_STD, RgbStatistics  # pylint: disable=unused-import
from cnn_jax.errors import UserError

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # as tfds.ImageFolder


class Source:
  """One dataset: its info and per-process slices of its splits as undecoded examples."""

  name: str
  channels: int  # channels to decode to: 1 for grayscale datasets (tiled to RGB later), else 3

  def info(self, train_split: str, eval_split: str) -> DatasetInfo:
    raise NotImplementedError

  def num_examples(self, split: str, process_index: int = 0, process_count: int = 1,
                   drop_remainder: bool = False) -> int:
    """Examples in this process's slice of `split` (tfds.even_splits semantics)."""
    raise NotImplementedError

  def read(self, split: str, process_index: int = 0, process_count: int = 1,
           drop_remainder: bool = False, try_autocache: bool = True) -> tf.data.Dataset:
    """This process's slice of `split`: {'image': tf.string encoded image, 'label': tf.int64}, fixed order."""
    raise NotImplementedError

  def describe_decode_error(self, split: str, error: Exception) -> str:
    """One line for a UserError when decoding an image of `split` failed."""
    raise NotImplementedError

  def decoded_bytes(self, split: str, process_index: int = 0, process_count: int = 1,
                    drop_remainder: bool = False) -> Optional[int]:
    """Estimated bytes of this slice once decoded to uint8 (None = unknown)."""
    raise NotImplementedError


# --- tfds datasets -------------------------------------------------------------------------------

def _tfds_is_mocked() -> bool:
  # Under tfds.testing.mock_data, download_and_prepare is patched to a no-op and as_dataset produces
  # random examples: no prepared files are needed, so a missing data_dir is not an error.
  fn = getattr(tfds.core.DatasetBuilder.download_and_prepare, "__name__", "")
  return fn == "mock_download_and_prepare"


def _first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:300]


class _DownloadBlocked(Exception):
  """tfds wanted to download a file while config.download is False."""


@contextlib.contextmanager
def _no_downloads(name: str, manual_dir: str):
  """Makes any tfds download fail at once, naming the file missing from manual_dir.

  Without it tfds quietly falls back to the network for a file it does not find in manual_dir, and an
  offline machine waits minutes on retries before failing.
  """
  def refuse(self, resource):
    del self
    url = getattr(resource, "url", resource)
    raise _DownloadBlocked(
        f"preparing {name} needs {os.path.basename(str(url))} (from {url}), which is not in "
        f"--config.manual_dir={manual_dir}; put it there, or pass --config.download=True")

  with mock.patch.object(tfds.download.DownloadManager, "_download", refuse):
    yield


class TfdsSource(Source):
  """A tfds dataset; prepared on first use from `manual_dir` (or downloaded if `download`)."""

  def __init__(self, name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
               download: bool = False):
    self.name = name
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise UserError(f"unknown dataset {name!r}: use a tfds name (fashion_mnist, cifar10, imagenette, "
                      f"imagenet2012, ...) or 'folder:/path/to/root'") from e
    if not builder.is_prepared() and not _tfds_is_mocked():
      self._prepare(builder, data_dir, manual_dir, download)
    self.builder = builder
    keys = builder.info.supervised_keys
    if not keys or not isinstance(builder.info.features[keys[0]], tfds.features.Image):
      raise UserError(f"dataset {name!r} is not an image classification dataset (no (image, label) keys)")
    self.image_key, self.label_key = keys[0], keys[1]
    shape = builder.info.features[self.image_key].shape
    self.channels = 1 if shape[-1] == 1 else 3

  @staticmethod
  def _prepare(builder, data_dir, manual_dir, download):
    where = data_dir or "the default tfds data dir"
    if manual_dir:
      if not os.path.isdir(manual_dir):
        raise UserError(f"--config.manual_dir={manual_dir!r} is not a folder; point it at the source "
                        f"files of {builder.name}")
      config = tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
    elif download:
      config = None
    else:
      raise UserError(f"{builder.name} is not prepared in {where}: pass --config.manual_dir=<folder with its "
                      f"source files> (prepared offline), --config.data_dir=<prepared tfds dir>, or "
                      f"--config.download=True")
    try:
      with contextlib.ExitStack() as stack:
        if not download:
          config = dataclasses.replace(config, try_download_gcs=False)
          stack.enter_context(_no_downloads(builder.name, manual_dir))
        builder.download_and_prepare(download_config=config)
    except _DownloadBlocked as e:
      raise UserError(str(e)) from e
    except Exception as e:  # pylint: disable=broad-except
      how = "check --config.manual_dir" if manual_dir else "pass --config.manual_dir=<source files>"
      raise UserError(f"preparing {builder.name} in {where} failed ({_first_line(e)}); {how}") from e

  def _subsplit(self, split, process_index, process_count, drop_remainder):
    if process_count == 1:
      return split
    return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]

  def _check_split(self, split):
    if _tfds_is_mocked():
      return  # mock_data accepts any split name
    for base in (part.split("[")[0].strip() for part in split.split("+")):
      if base not in self.builder.info.splits:
        raise UserError(f"{self.name} has no split {base!r}; its splits: {sorted(self.builder.info.splits)}")

  def num_examples(self, split, process_index=0, process_count=1, drop_remainder=False):
    self._check_split(split)
    sub = self._subsplit(split, process_index, process_count, drop_remainder)
    try:
      count = self.builder.info.splits[sub].num_examples
    except (ValueError, AssertionError) as e:
      if not _tfds_is_mocked():
        raise UserError(f"split {split!r} of {self.name}: {_first_line(e)}") from e
      count = None
    except Exception:  # pylint: disable=broad-except
      count = None
    if not isinstance(count, (int, np.integer)):
      # Mocked metadata (tfds.testing.mock_data) does not know split sizes; the dataset does.
      count = int(self.read(split, process_index, process_count, drop_remainder).cardinality())
    return int(count)

  def read(self, split, process_index=0, process_count=1, drop_remainder=False, try_autocache=True):
    self._check_split(split)
    sub = self._subsplit(split, process_index, process_count, drop_remainder)
    ds = self.builder.as_dataset(
        split=sub, shuffle_files=False, decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=try_autocache))
    return ds.map(lambda ex: {"image": ex[self.image_key], "label": tf.cast(ex[self.label_key], tf.int64)})

  def info(self, train_split, eval_split):
    label = self.builder.info.features[self.label_key]
    return DatasetInfo(
        name=self.name, num_classes=int(label.num_classes), num_train=self.num_examples(train_split),
        num_eval=self.num_examples(eval_split), class_names=tuple(label.names),
        image_shape=tuple(self.builder.info.features[self.image_key].shape))

  def decoded_bytes(self, split, process_index=0, process_count=1, drop_remainder=False):
    count = self.num_examples(split, process_index, process_count, drop_remainder)
    shape = self.builder.info.features[self.image_key].shape
    if all(isinstance(d, int) for d in shape):
      return count * int(np.prod(shape))
    try:  # variable sizes: about 10x the encoded (JPEG) bytes
      split_info = self.builder.info.splits[split.split("[")[0]]
      return int(10 * int(split_info.num_bytes) * count / max(int(split_info.num_examples), 1))
    except Exception:  # pylint: disable=broad-except
      return None

  def describe_decode_error(self, split, error):
    return (f"decoding an image of {self.name} ({split}) failed ({_first_line(error)}); the prepared files "
            f"in {self.builder.data_dir} may be damaged: delete them and prepare again")


# --- Image folders -------------------------------------------------------------------------------

def _list_dirs(path: str) -> List[str]:
  return sorted(f for f in tf.io.gfile.listdir(path) if tf.io.gfile.isdir(os.path.join(path, f)))


def _check_image_header(path: str):
  """Raises UserError unless PIL recognises `path` as an image (reads the header only)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.verify()
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{path} is not a readable image ({_first_line(e)}); replace or remove it") from e


def _find_undecodable(paths: Sequence[str]) -> Optional[str]:
  """The first file PIL cannot fully decode (a truncated file passes the header check), else None."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for path in paths:
    try:
      with Image.open(path) as image:
        image.load()
    except Exception:  # pylint: disable=broad-except
      return path
  return None


class FolderSource(Source):
  """root/<split>/<class>/*.{jpg,jpeg,png}; labels are the sorted class names over all splits."""

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    self.name = FOLDER_PREFIX + root
    self.root = root
    self.channels = 3
    if not tf.io.gfile.isdir(root):
      raise UserError(f"image folder {root!r} does not exist; expected {root}/<split>/<class>/*.jpg")
    self.splits, self.class_names = _list_image_folder(root, _folder_fingerprint(root))

  def _slice(self, split, process_index, process_count, drop_remainder):
    """This process's examples of `split`; tfds split syntax ('train[:80%]') works here too."""
    for name in (part.split("[")[0].strip() for part in split.split("+")):
      if name not in self.splits:
        raise UserError(f"image folder {self.root} has no split folder {name!r}; it has "
                        f"{sorted(self.splits)}")
    split_dict = tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[len(examples)], num_bytes=0)
        for name, examples in self.splits.items()])
    sub = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]
    examples = []
    try:
      instructions = sub.to_absolute(split_dict)
    except (ValueError, AssertionError) as e:
      raise UserError(f"split {split!r} of {self.root}: {_first_line(e)}") from e
    for instruction in instructions:
      examples.extend(self.splits[instruction.splitname][instruction.from_:instruction.to])
    return examples

  def num_examples(self, split, process_index=0, process_count=1, drop_remainder=False):
    return len(self._slice(split, process_index, process_count, drop_remainder))

  def read(self, split, process_index=0, process_count=1, drop_remainder=False, try_autocache=True):
    del try_autocache
    examples = self._slice(split, process_index, process_count, drop_remainder)
    paths = [p for p, _ in examples]
    labels = np.array([label for _, label in examples], np.int64)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
    return ds.map(lambda path, label: {"image": tf.io.read_file(path), "label": label})

  def info(self, train_split, eval_split):
    return DatasetInfo(
        name=self.name, num_classes=len(self.class_names), num_train=self.num_examples(train_split),
        num_eval=self.num_examples(eval_split), class_names=tuple(self.class_names),
        image_shape=(None, None, 3))

  def decoded_bytes(self, split, process_index=0, process_count=1, drop_remainder=False):
    # About 10x the encoded (JPEG) bytes.
    examples = self._slice(split, process_index, process_count, drop_remainder)
    return 10 * sum(os.path.getsize(p) for p, _ in examples)

  def describe_decode_error(self, split, error):
    bad = _find_undecodable([p for p, _ in self._slice(split, 0, 1, False)])
    if bad:
      return f"{bad} cannot be decoded (truncated or damaged image); replace or remove it"
    return f"decoding an image of {self.root}/{split} failed ({_first_line(error)})"


def _folder_fingerprint(root: str) -> Tuple:
  """(path, mtime) of the root, split and class folders: changes when files are added or removed."""
  entries = [(root, os.stat(root).st_mtime_ns)]
  for split in _list_dirs(root):
    split_dir = os.path.join(root, split)
    entries.append((split_dir, os.stat(split_dir).st_mtime_ns))
    for label in _list_dirs(split_dir):
      label_dir = os.path.join(split_dir, label)
      entries.append((label_dir, os.stat(label_dir).st_mtime_ns))
  return tuple(entries)


@functools.lru_cache(maxsize=8)
def _list_image_folder(root: str, fingerprint: Tuple) -> Tuple[Dict[str, list], List[str]]:
  """{split: [(path, label index)]} in tfds.ImageFolder's order, and the sorted class names.

  `fingerprint` only keys the cache. Checks every file's header once per listing.
  """
  del fingerprint
  split_names = _list_dirs(root)
  if not split_names:
    raise UserError(f"image folder {root} has no split folders; expected {root}/train/<class>/*.jpg")
  by_split, labels = {}, set()
  for split in split_names:
    split_dir = os.path.join(root, split)
    class_dirs = _list_dirs(split_dir)
    if not class_dirs:
      raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg")
    by_split[split] = []
    for label in class_dirs:
      label_dir = os.path.join(split_dir, label)
      files = sorted(os.path.join(label_dir, f) for f in tf.io.gfile.listdir(label_dir)
                     if f.lower().endswith(_IMAGE_EXTENSIONS))
      if not files:
        raise UserError(f"class folder {label_dir} holds no .jpg/.jpeg/.png images; add images or remove it")
      for path in files:
        _check_image_header(path)
      labels.add(label)
      by_split[split].extend((path, label) for path in files)
  class_names = sorted(labels)
  index = {name: i for i, name in enumerate(class_names)}
  splits = {}
  for split, examples in by_split.items():
    random.Random(split).shuffle(examples)  # tfds.ImageFolder's deterministic per-split order
    splits[split] = [(path, index[label]) for path, label in examples]
  return splits, class_names


# --- From a config -------------------------------------------------------------------------------

def get_source(config) -> Source:
  """The Source of `config.dataset` (tfds name or 'folder:/root'); UserError if unknown or unprepared."""
  name = config.get("dataset")
  if not name:
    raise UserError("--config.dataset is empty; set a tfds name (e.g. fashion_mnist) or 'folder:/path'")
  if name.startswith(FOLDER_PREFIX):
    return FolderSource(name[len(FOLDER_PREFIX):])
  # '' counts as unset: command-line overrides cannot set a ConfigDict field back to None.
  return TfdsSource(name, data_dir=config.get("data_dir") or None,
                    manual_dir=config.get("manual_dir") or None, download=bool(config.get("download", False)))


def resolve_splits(config, source: Source) -> Tuple[str, str]:
  """(train_split, eval_split); 'auto' eval -> 'test', or 'validation' for ImageNet-like datasets."""
  return info_lib.resolve_splits(config, source.splits if isinstance(source, FolderSource) else None)


def get_dataset_info(config) -> DatasetInfo:
  """Name, classes, split sizes and raw image shape of `config.dataset`; prepares it if needed."""
  source = get_source(config)
  return source.info(*resolve_splits(config, source))


def base_name(source: Source) -> str:
  """'imagenette/320px-v2' -> 'imagenette'; folders -> 'folder'."""
  return info_lib.base_name_of(source.name)


def rgb_statistics(source: Source, split: str, cache_dir: Optional[str] = None,
                   max_images: int = stats_lib.MAX_IMAGES,
                   pixels_per_image: int = stats_lib.PIXELS_PER_IMAGE) -> RgbStatistics:
  """Mean, std and RGB covariance eigen decomposition of (a sample of) `split`, in [0, 1] units.

  Uses the first `max_images` images in the split's fixed order and up to `pixels_per_image` pixels of
  each on a regular grid (stats.sample_pixels). Cached as JSON in `cache_dir` (if given) and in memory.
  Grayscale data give a rank-1 covariance: eigvals (l, 0, 0) with the first eigenvector along (1, 1, 1)/sqrt(3).
  """
  def compute():
    def decode_rgb(example):
      return tf.io.decode_image(example["image"], channels=3, expand_animations=False)

    ds = source.read(split).take(max_images).map(decode_rgb, num_parallel_calls=tf.data.AUTOTUNE)
    pixels = (stats_lib.sample_pixels(image, pixels_per_image) for image in ds.as_numpy_iterator())
    return stats_lib.accumulate(pixels, f"split {split!r} of {source.name}")

  return stats_lib.cached(source.name, base_name(source), split, cache_dir, compute, max_images)


def lighting_eigen(source: Source, split: str, cache_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
  """(eigvals [3], eigvecs [3, 3]) for PCA lighting: ImageNet's published values for ImageNet and its
  subsets, else computed from the training split (see rgb_statistics)."""
  return stats_lib.lighting_eigen(base_name(source), lambda: rgb_statistics(source, split, cache_dir))


def mean_std(config, source: Source, split: str) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
  """Normalisation constants of `config.normalize` (see stats.mean_std), or None for none."""
  return stats_lib.mean_std(config.get("normalize", "auto"), base_name(source),
                            lambda: rgb_statistics(source, split, config.get("cache_dir")))
