"""Where examples come from: tfds datasets by name (prepared offline from a manual dir) or image folders.

A *source* (cnn_jax/data/source.py) hands the pipeline undecoded examples `{'image': encoded bytes, 'label':
int64}` of one process's slice of a split, in a fixed order; decoding and augmentation happen in `pipeline.py`.

  config.dataset = 'fashion_mnist' | 'cifar10' | 'imagenette' | 'imagenet2012' | any tfds name
                 | 'folder:/path/to/root'  with root/<split>/<class>/*.{jpg,jpeg,png,bmp,gif,webp,tif}

This module has the tfds sources (offline preparation, a fast failure without a network) and picks the source
of a config; image folders are `cnn_jax/data/folders.py`.
"""

import contextlib
import dataclasses
import os
from typing import Optional, Tuple
from unittest import mock

import numpy as np
from cnn_jax.data.tf_runtime import tf
import tensorflow_datasets as tfds

from cnn_jax import console
from cnn_jax.data import info as info_lib
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.info import (FOLDER_PREFIX, HOLDOUT_PREFIX, HOLDOUT_SPLIT, DatasetInfo,  # pylint: disable=unused-import
                               parse_holdout)
from cnn_jax.data.folders import EVAL_FOLDERS, SPLIT_HINT, FolderSource  # pylint: disable=unused-import
from cnn_jax.data.source import Source, first_line
from cnn_jax.data.stats import RgbStatistics
from cnn_jax.errors import UserError


# --- tfds datasets -------------------------------------------------------------------------------

def _tfds_is_mocked() -> bool:
  # Under tfds.testing.mock_data, download_and_prepare is patched to a no-op and as_dataset produces
  # random examples: no prepared files are needed, so a missing data_dir is not an error.
  fn = getattr(tfds.core.DatasetBuilder.download_and_prepare, "__name__", "")
  return fn == "mock_download_and_prepare"


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
        f"--config.manual_dir={manual_dir}; put it there, or leave out --config.manual_dir to download it")

  with mock.patch.object(tfds.download.DownloadManager, "_download", refuse):
    yield


class _Unreachable(Exception):
  """A download's host cannot be reached (no network): raised before tfds's minutes of retries."""


# Seconds to wait for a download host to accept a connection before calling the machine offline.
_REACH_TIMEOUT_S = 10.0


def _check_reachable(url: str) -> None:
  """Raises _Unreachable unless a TCP connection to `url`'s host opens within _REACH_TIMEOUT_S.

  Honours an https_proxy/http_proxy setting (then the proxy must be reachable).
  """
  import socket  # pylint: disable=g-import-not-at-top
  import urllib.parse  # pylint: disable=g-import-not-at-top
  import urllib.request  # pylint: disable=g-import-not-at-top
  parsed = urllib.parse.urlparse(url)
  proxy = urllib.request.getproxies().get(parsed.scheme or "https")
  target = urllib.parse.urlparse(proxy) if proxy else parsed
  host = target.hostname
  if not host:
    return
  port = target.port or (443 if target.scheme == "https" else 80)
  try:
    socket.create_connection((host, port), timeout=_REACH_TIMEOUT_S).close()
  except OSError as e:
    raise _Unreachable(f"{host} cannot be reached ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def _fail_fast_offline(name: str):
  """Makes a tfds download on an offline machine fail at once with one line naming --config.manual_dir.

  Without it tfds retries each file for minutes, logging a warning per retry, and then fails with a
  urllib3 message.
  """
  original = tfds.download.DownloadManager._download  # pylint: disable=protected-access

  def download(self, resource):
    url = str(getattr(resource, "url", resource))
    try:
      _check_reachable(url)
    except _Unreachable as e:
      raise _DownloadBlocked(
          f"cannot download {name}: {e}; this machine looks offline. Put the files tfds downloads for it "
          f"(such as {os.path.basename(urllib_path(url))} from {url}) in a folder and pass "
          "--config.manual_dir=<folder> (prepared offline), or --config.data_dir=<a tfds dir where it is "
          "prepared>") from e
    return original(self, resource)

  with mock.patch.object(tfds.download.DownloadManager, "_download", download):
    yield


def urllib_path(url: str) -> str:
  """The path part of a URL ('https://h/a/b.gz' -> '/a/b.gz')."""
  import urllib.parse  # pylint: disable=g-import-not-at-top
  return urllib.parse.urlparse(url).path or url


@contextlib.contextmanager
def quiet_preparation(builder):
  """Unless --verbosity: no tfds progress bars and no "Downloading and preparing dataset Unknown size ..."
  while `builder` prepares (offline from a manual dir tfds knows no sizes); the caller says what happens."""
  if console.verbose():
    yield
    return
  tfds.disable_progress_bar()
  with mock.patch.object(builder, "_log_download_bytes", lambda: None), \
      mock.patch.object(builder, "_log_download_done", lambda: None):
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
    console.say(f"preparing {builder.name} in {builder.data_dir} (once; "
                f"{'from ' + manual_dir if manual_dir else 'downloading'})")
    try:
      with contextlib.ExitStack() as stack:
        if not download or manual_dir:
          config = dataclasses.replace(config, try_download_gcs=False)
          stack.enter_context(_no_downloads(builder.name, manual_dir))
        else:
          stack.enter_context(_fail_fast_offline(builder.name))
        stack.enter_context(quiet_preparation(builder))
        builder.download_and_prepare(download_config=config)
    except _DownloadBlocked as e:
      raise UserError(str(e)) from e
    except Exception as e:  # pylint: disable=broad-except
      how = "check --config.manual_dir" if manual_dir else "pass --config.manual_dir=<source files>"
      raise UserError(f"preparing {builder.name} in {where} failed ({first_line(e)}); {how}") from e
    console.say(f"prepared {builder.name}")

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
        raise UserError(f"split {split!r} of {self.name}: {first_line(e)}") from e
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
    return (f"decoding an image of {self.name} ({split}) failed ({first_line(error)}); the prepared files "
            f"in {self.builder.data_dir} may be damaged: delete them and prepare again")


# --- From a config -------------------------------------------------------------------------------

def get_source(config) -> Source:
  """The Source of `config.dataset` (tfds name or 'folder:/root'); UserError if unknown or unprepared."""
  name = str(config.dataset or "")
  if not name:
    raise UserError("--config.dataset is empty; set a tfds name (e.g. fashion_mnist) or 'folder:/path'")
  holdout = parse_holdout(config.eval_split)
  if name.startswith(FOLDER_PREFIX):
    train_folder = (config.train_split or "train").split("[")[0].strip()
    return FolderSource(name[len(FOLDER_PREFIX):], holdout=holdout,
                        train_folder="train" if train_folder == "auto" else train_folder)
  if holdout:
    raise UserError(f"--config.eval_split={config.eval_split} (a stratified hold-out) is for image "
                    "folders; for a tfds dataset slice its splits instead, e.g. --config.train_split='train[:90%]' "
                    "--config.eval_split='train[90%:]'")
  # '' counts as unset: command-line overrides cannot set a ConfigDict field back to None.
  return TfdsSource(name, data_dir=config.data_dir or None,
                    manual_dir=config.manual_dir or None, download=bool(config.download))


def resolve_splits(config, source: Source) -> Tuple[str, str]:
  """(train_split, eval_split); 'auto' eval -> 'test', or 'validation' for ImageNet-like datasets."""
  train_split = config.train_split or "train"
  if train_split == "auto":
    train_split = "train"
  eval_split = config.eval_split or "auto"
  if isinstance(source, FolderSource) and eval_split.startswith(HOLDOUT_PREFIX):
    return train_split, HOLDOUT_SPLIT
  if eval_split == "auto" and isinstance(source, FolderSource):
    eval_split = next((s for s in EVAL_FOLDERS if s in source.splits), None)
    if eval_split is None:
      raise UserError(f"image folder {source.root} has no {'/, '.join(EVAL_FOLDERS)}/ folder to evaluate on "
                      f"({'it has ' + ', '.join(s + '/' for s in sorted(source.splits)) if source.splits else 'it is empty'}). "
                      f"{SPLIT_HINT}")
    return train_split, eval_split
  return info_lib.resolve_splits(config, None)


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
  return stats_lib.mean_std(config.normalize, base_name(source),
                            lambda: rgb_statistics(source, split, config.cache_dir))
