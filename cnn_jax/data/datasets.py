"""Where examples come from: tfds datasets by name (prepared offline from a manual dir) or image folders.

A *source* hands the pipeline undecoded examples `{'image': encoded bytes, 'label': int64}` of one
process's slice of a split, in a fixed order; decoding and augmentation happen in `pipeline.py`.

  config.dataset = 'fashion_mnist' | 'cifar10' | 'imagenette' | 'imagenet2012' | any tfds name
                 | 'folder:/path/to/root'  with root/<split>/<class>/*.{jpg,jpeg,png,bmp,gif,webp,tif}

Image folders follow `tfds.ImageFolder`'s layout and per-split deterministic order, but are listed here so
that each process reads only its slice, and so that mistakes are named: splits with different class
folders are refused, an empty class folder or a damaged image is named in the error. Unlike
tfds.ImageFolder: class names sort naturally ('2' before '10'; the order is recorded in run_info.json),
hidden and system entries (.git, __MACOSX, .ipynb_checkpoints, ._* files) are ignored, other files and
nested folders are counted and reported, BMP/GIF/WebP/TIFF are read too, and `eval_split='holdout:10%'`
holds out a stratified part of the train folder when there is no test folder.
"""

import contextlib
import dataclasses
import functools
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
from cnn_jax.data.tf_runtime import tf
import tensorflow_datasets as tfds

from cnn_jax import console
from cnn_jax.data import info as info_lib
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.info import (FOLDER_PREFIX, HOLDOUT_PREFIX, HOLDOUT_SPLIT, DatasetInfo,  # pylint: disable=unused-import
                               parse_holdout)
from cnn_jax.data.stats import IMAGENET_MEAN_STD, RgbStatistics  # pylint: disable=unused-import
from cnn_jax.errors import UserError


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
      raise UserError(f"preparing {builder.name} in {where} failed ({_first_line(e)}); {how}") from e
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

# tf.io.decode_image reads these directly ...
_TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# ... and these are decoded by PIL and handed to the pipeline as PNG bytes (TensorFlow has no decoder).
_PIL_EXTENSIONS = (".webp", ".tif", ".tiff")
IMAGE_EXTENSIONS = _TF_EXTENSIONS + _PIL_EXTENSIONS
# Folders and files that tools, not people, put there (a `git clone`, a macOS zip, Jupyter, Windows).
_SYSTEM_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN",
                           "System Volume Information", "lost+found"})
_EVAL_FOLDERS = ("test", "val", "validation")


def is_hidden(name: str) -> bool:
  """True for dotfiles/dot-folders (.git, .ipynb_checkpoints, ._x.jpg, .DS_Store) and system folders."""
  return name.startswith(".") or name in _SYSTEM_NAMES


def natural_key(name: str) -> Tuple:
  """Sort key that orders digit runs by value: '2' < '10', 'class9' < 'class10'; other text as sorted()."""
  return tuple((0, int(part), part) if part.isdigit() else (1, 0, part)
               for part in re.split(r"(\d+)", name) if part)


def _list_dirs(path: str) -> List[str]:
  return sorted(f for f in tf.io.gfile.listdir(path)
                if not is_hidden(f.rstrip("/")) and tf.io.gfile.isdir(os.path.join(path, f)))


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


def _to_png(encoded) -> bytes:
  """PIL-decodable bytes (WebP, TIFF) -> PNG bytes; b'' when PIL cannot read them (the decode then fails
  in TensorFlow and the error names the file)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(encoded.numpy())) as image:
      out = io.BytesIO()
      image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(out, format="PNG")
      return out.getvalue()
  except Exception:  # pylint: disable=broad-except
    return b""


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """What an image folder holds.

  splits: {split: [(path, label index)]} in tfds.ImageFolder's per-split order; class_names: label index ->
  name (natural order over all splits); skipped: {what: count} of entries that are not used (files with
  other extensions, nested folders, files outside class folders), hidden/system entries not counted.
  """
  splits: Dict[str, List[Tuple[str, int]]]
  class_names: List[str]
  skipped: Dict[str, int]
  skipped_examples: Tuple[str, ...]


class FolderSource(Source):
  """root/<split>/<class>/<image>; labels are the class names over all splits in natural order.

  holdout: a fraction of the `train_folder` split held out per class (stratified, deterministic) as the
  eval split 'holdout'; the train split then holds the rest.
  """

  def __init__(self, root: str, holdout: Optional[float] = None, train_folder: str = "train"):
    root = os.path.expanduser(root)
    self.name = FOLDER_PREFIX + root
    self.root = root
    self.channels = 3
    if not tf.io.gfile.isdir(root):
      raise UserError(f"image folder {root!r} does not exist; expected {root}/<split>/<class>/*.jpg")
    listing = _list_image_folder(root, _folder_fingerprint(root))
    self.class_names = listing.class_names
    self.skipped = listing.skipped
    self.splits = dict(listing.splits)
    if holdout:
      if train_folder not in self.splits:
        raise UserError(f"--config.eval_split=holdout:... holds out part of the train folder, but {root} has "
                        f"no {train_folder!r} folder; it has {sorted(self.splits)}")
      self.splits[train_folder], self.splits[HOLDOUT_SPLIT] = _hold_out(
          self.splits[train_folder], holdout, self.class_names, f"{root}/{train_folder}")

  def _slice(self, split, process_index, process_count, drop_remainder):
    """This process's examples of `split`; tfds split syntax ('train[:80%]') works here too."""
    for name in (part.split("[")[0].strip() for part in split.split("+")):
      if name not in self.splits:
        raise UserError(f"image folder {self.root} has no split folder {name!r}; it has "
                        f"{sorted(s for s in self.splits if s != HOLDOUT_SPLIT)}. {_SPLIT_HINT}")
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
    if not any(p.lower().endswith(_PIL_EXTENSIONS) for p in paths):
      return ds.map(lambda path, label: {"image": tf.io.read_file(path), "label": label})
    pil_pattern = r"(?i).*\.(" + "|".join(e[1:] for e in _PIL_EXTENSIONS) + ")"

    def load(path, label):
      encoded = tf.io.read_file(path)
      encoded = tf.cond(tf.strings.regex_full_match(path, pil_pattern),
                        lambda: tf.py_function(_to_png, [encoded], tf.string), lambda: encoded)
      encoded.set_shape([])
      return {"image": encoded, "label": label}

    return ds.map(load)

  def info(self, train_split, eval_split):
    return DatasetInfo(
        name=self.name, num_classes=len(self.class_names), num_train=self.num_examples(train_split),
        num_eval=self.num_examples(eval_split), class_names=tuple(self.class_names),
        image_shape=(None, None, 3))

  def uniform_size(self) -> Optional[Tuple[int, int]]:
    """(height, width) if every image of every split has that size, else None: such a folder is cached and
    trained at its own size, never resampled. Reads each file's header only, once per folder state."""
    return _uniform_size(tuple(p for examples in self.splits.values() for p, _ in examples),
                         _folder_fingerprint(self.root))

  def decoded_bytes(self, split, process_index=0, process_count=1, drop_remainder=False):
    # About 10x the encoded (JPEG) bytes.
    examples = self._slice(split, process_index, process_count, drop_remainder)
    return 10 * sum(os.path.getsize(p) for p, _ in examples)

  def describe_decode_error(self, split, error):
    bad = _find_undecodable([p for p, _ in self._slice(split, 0, 1, False)])
    if bad:
      return f"{bad} is not a readable image (damaged, truncated or not an image); replace or remove it"
    return f"decoding an image of {self.root}/{split} failed ({_first_line(error)})"


_SPLIT_HINT = ("Name the folders with --config.train_split=<folder> and --config.eval_split=<folder>, or hold "
               "out part of the train folder for evaluation with --config.eval_split=holdout:10% (stratified "
               "per class)")


def _hold_out(examples: List[Tuple[str, int]], fraction: float, class_names: Sequence[str],
              where: str) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
  """(kept, held out): `fraction` of each class's examples (at least one, rounded) held out.

  Which files are held out depends only on the file names, the class and the fraction (a seeded shuffle of
  the sorted names), so it is the same on every run and every process.
  """
  by_class: Dict[int, List[Tuple[str, int]]] = {}
  for example in examples:
    by_class.setdefault(example[1], []).append(example)
  kept, held = [], []
  for label, members in sorted(by_class.items()):
    members = sorted(members)
    n_held = max(1, int(round(fraction * len(members))))
    if n_held >= len(members):
      raise UserError(f"class {class_names[label]!r} of {where} has {len(members)} image(s): too few to hold "
                      f"out {fraction:.0%} and still train on it; add images, or use a test folder")
    random.Random(f"holdout|{class_names[label]}|{fraction}").shuffle(members)
    held.extend(members[:n_held])
    kept.extend(members[n_held:])
  # The same kind of fixed per-split order the folders get (tfds.ImageFolder's seeded shuffle).
  random.Random("train|holdout").shuffle(kept)
  random.Random(HOLDOUT_SPLIT).shuffle(held)
  return kept, held


@functools.lru_cache(maxsize=8)
def _uniform_size(paths: Tuple[str, ...], fingerprint: Tuple) -> Optional[Tuple[int, int]]:
  """The one (height, width) of all `paths` (image headers), or None if they differ or one is unreadable."""
  del fingerprint  # part of the cache key: the folder's state
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = None
  for path in paths:
    try:
      with Image.open(path) as image:
        width, height = image.size
    except Exception:  # pylint: disable=broad-except  (named later, when the pipeline decodes it)
      return None
    if size not in (None, (height, width)):
      return None
    size = (height, width)
  return size


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


def _describe_names(names: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_same_classes(root: str, classes_by_split: Dict[str, List[str]]) -> None:
  """UserError naming the class folders that some splits have and others lack (e.g. test/Cat, train/cat)."""
  all_classes = set().union(*classes_by_split.values())
  odd = {split: sorted(all_classes - set(classes), key=natural_key)
         for split, classes in classes_by_split.items() if set(classes) != all_classes}
  if not odd:
    return
  parts = []
  for split, missing in odd.items():
    others = [s for s in classes_by_split if s != split and set(missing) & set(classes_by_split[s])]
    parts.append(f"{split}/ lacks {_describe_names(missing)} (in {', '.join(o + '/' for o in others)})")
  lowered = {}
  for name in all_classes:
    lowered.setdefault(name.lower(), []).append(name)
  case_pairs = [sorted(v) for v in lowered.values() if len(v) > 1]
  hint = (f" Class names are case-sensitive: {'; '.join(' vs '.join(p) for p in case_pairs[:3])}."
          if case_pairs else "")
  raise UserError(f"the split folders of {root} hold different classes: {'; '.join(parts)}.{hint} Every split "
                  "needs the same class folders (the labels are the class names): rename or remove the odd ones")


@functools.lru_cache(maxsize=8)
def _list_image_folder(root: str, fingerprint: Tuple) -> FolderListing:
  """Lists root/<split>/<class>/<image> once per folder state (`fingerprint` keys the cache).

  Files are not opened here (a folder of 100k images lists in a second): a damaged file is named when the
  pipeline fails to decode it. Hidden and system entries are ignored; anything else that is not used is
  counted in `skipped` and reported once.
  """
  del fingerprint
  split_names = _list_dirs(root)
  if not split_names:
    raise UserError(f"image folder {root} has no split folders; expected {root}/train/<class>/*.jpg")
  by_split, classes_by_split = {}, {}
  skipped: Dict[str, int] = {}
  skipped_examples: List[str] = []

  def skip(what, path):
    skipped[what] = skipped.get(what, 0) + 1
    if len(skipped_examples) < 3:
      skipped_examples.append(path)

  for split in split_names:
    split_dir = os.path.join(root, split)
    class_dirs = _list_dirs(split_dir)
    if not class_dirs:
      raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg")
    for entry in tf.io.gfile.listdir(split_dir):
      entry = entry.rstrip("/")
      if not is_hidden(entry) and entry not in class_dirs:
        skip("files outside class folders", os.path.join(split_dir, entry))
    classes_by_split[split] = class_dirs
    by_split[split] = []
    for label in class_dirs:
      label_dir = os.path.join(split_dir, label)
      files = []
      for entry in sorted(tf.io.gfile.listdir(label_dir)):
        name = entry.rstrip("/")
        path = os.path.join(label_dir, name)
        if is_hidden(name):
          continue
        if entry.endswith("/") or tf.io.gfile.isdir(path):
          skip("nested folders (their images are not used)", path)
        elif name.lower().endswith(IMAGE_EXTENSIONS):
          files.append(path)
        else:
          skip(f"{os.path.splitext(name)[1].lower() or 'extension-less'} files", path)
      if not files:
        raise UserError(f"class folder {label_dir} holds no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
                        "add images or remove it")
      by_split[split].extend((path, label) for path in files)
  _check_same_classes(root, classes_by_split)
  class_names = sorted(set().union(*classes_by_split.values()), key=natural_key)
  index = {name: i for i, name in enumerate(class_names)}
  splits = {}
  for split, examples in by_split.items():
    random.Random(split).shuffle(examples)  # tfds.ImageFolder's deterministic per-split order
    splits[split] = [(path, index[label]) for path, label in examples]
  listing = FolderListing(splits, class_names, skipped, tuple(skipped_examples))
  _report_listing(root, listing)
  return listing


def _report_listing(root: str, listing: FolderListing) -> None:
  """One status line per listing (classes in label order, images per split) and one warning for skips."""
  sizes = ", ".join(f"{split} {len(examples):,}" for split, examples in listing.splits.items())
  console.say(f"image folder {root}: {len(listing.class_names)} classes in label order "
              f"({_describe_names(listing.class_names, 6)}); images: {sizes}")
  if listing.skipped:
    what = ", ".join(f"{n:,} {kind}" for kind, n in sorted(listing.skipped.items()))
    console.warn(f"image folder {root}: skipped {what} (e.g. {', '.join(listing.skipped_examples)}); images "
                 f"are {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files directly in <split>/<class>/")


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
    eval_split = next((s for s in _EVAL_FOLDERS if s in source.splits), None)
    if eval_split is None:
      raise UserError(f"image folder {source.root} has no {'/, '.join(_EVAL_FOLDERS)}/ folder to evaluate on "
                      f"({'it has ' + ', '.join(s + '/' for s in sorted(source.splits)) if source.splits else 'it is empty'}). "
                      f"{_SPLIT_HINT}")
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
