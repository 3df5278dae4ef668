"""Image folders as a source: root/<split>/<class>/*.{jpg,jpeg,png,bmp,gif,webp,tif}.

The layout and per-split deterministic order of `tfds.ImageFolder`, but listed here so that each process reads
only its slice, and so that mistakes are named: splits with different class folders are refused, an empty class
folder or a damaged image is named in the error. Unlike tfds.ImageFolder: class names sort naturally ('2'
before '10'; the order is recorded in run_info.json), hidden and system entries (.git, __MACOSX,
.ipynb_checkpoints, ._* files) are ignored, other files and nested folders are counted and reported,
BMP/GIF/WebP/TIFF are read too, and `eval_split='holdout:10%'` holds out a stratified part of the train folder
when there is no test folder.
"""

import dataclasses
import functools
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from cnn_jax.data.tf_runtime import tf
import tensorflow_datasets as tfds

from cnn_jax import console
from cnn_jax.data.info import FOLDER_PREFIX, HOLDOUT_SPLIT, DatasetInfo
from cnn_jax.data.source import Source, first_line
from cnn_jax.errors import UserError


# tf.io.decode_image reads these directly ...
_TF_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# ... and these are decoded by PIL and handed to the pipeline as PNG bytes (TensorFlow has no decoder).
_PIL_EXTENSIONS = (".webp", ".tif", ".tiff")
IMAGE_EXTENSIONS = _TF_EXTENSIONS + _PIL_EXTENSIONS
# Folders and files that tools, not people, put there (a `git clone`, a macOS zip, Jupyter, Windows).
_SYSTEM_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN",
                           "System Volume Information", "lost+found"})
EVAL_FOLDERS = ("test", "val", "validation")


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
                        f"{sorted(s for s in self.splits if s != HOLDOUT_SPLIT)}. {SPLIT_HINT}")
    split_dict = tfds.core.SplitDict([
        tfds.core.SplitInfo(name=name, shard_lengths=[len(examples)], num_bytes=0)
        for name, examples in self.splits.items()])
    sub = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]
    examples = []
    try:
      instructions = sub.to_absolute(split_dict)
    except (ValueError, AssertionError) as e:
      raise UserError(f"split {split!r} of {self.root}: {first_line(e)}") from e
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
    return f"decoding an image of {self.root}/{split} failed ({first_line(error)})"


SPLIT_HINT = ("Name the folders with --config.train_split=<folder> and --config.eval_split=<folder>, or hold "
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
  n = len(listing.class_names)
  console.say(f"image folder {root}: {n} class{'es' if n != 1 else ''} in label order "
              f"({_describe_names(listing.class_names, 6)}); images: {sizes}")
  if listing.skipped:
    what = ", ".join(f"{n:,} {kind}" for kind, n in sorted(listing.skipped.items()))
    console.warn(f"image folder {root}: skipped {what} (e.g. {', '.join(listing.skipped_examples)}); images "
                 f"are {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files directly in <split>/<class>/")
