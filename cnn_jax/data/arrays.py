r"""The array cache: each split of a small dataset decoded once to uint8 arrays on disk, read with numpy only.

  <root>/<dataset key>/<split>/images.npy   uint8 [N, H, W, C]  (memory-mapped on read)
                               labels.npy   int32 [N]
                               meta.json    class names, shapes, byte sizes and SHA-256 of both files,
                                            the source's signature, the cache resolution

It is the input of the device-resident mode (device_input.py): a run whose splits are cached never imports
TensorFlow or tensorflow_datasets, so it runs on accelerator images that carry only JAX. Writing a cache
needs the source (tfds or an image folder, read through TensorFlow once):

  python -m cnn_jax.data.prepare --dataset=fashion_mnist --manual_dir=/path/to/fashion_mnist --arrays

and a run with `config.input` 'device' (or 'auto' choosing it) writes the missing ones itself on first use.

Where (`cache_root`): `config.array_cache_dir`, else $CNN_JAX_ARRAY_CACHE_DIR, else beside the tfds data
(`<data_dir>/cnn_jax_arrays`; data_dir = config.data_dir, $TFDS_DATA_DIR or ~/tensorflow_datasets) for tfds
datasets and `~/.cache/cnn_jax/arrays` for image folders. Images of fixed size (Fashion-MNIST 28x28x1,
CIFAR 32x32x3) are stored as they are; images of varying size (folders, ImageNet-like tfds) are stored at
`resolution` x `resolution`: the centre square of each, resized (antialiased) to that side, so the cache key
names the resolution and random crops see the centre square.

Trust: every load checks both files' sizes against meta.json and their SHA-256 (about 0.1 s for
Fashion-MNIST's 47 MB), and, where the source is present, its signature (the tfds `dataset_info.json`, or
every file's path, size and mtime of a folder). A mismatch is never used: the split is rebuilt when the
source can be read, else refused with one line saying how to rebuild it.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from cnn_jax.data.info import DatasetInfo, FOLDER_PREFIX, base_name_of, parse_holdout
from cnn_jax.errors import UserError

FORMAT_VERSION = 1
_IMAGES, _LABELS, _META = "images.npy", "labels.npy", "meta.json"
_CHUNK = 1 << 24


class StaleCacheError(Exception):
  """A cached split that must not be used (damaged, or its source changed); str() says why."""


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One cached split: images uint8 [N, H, W, C] and labels int32 [N] (memory-mapped), class names."""
  images: np.ndarray
  labels: np.ndarray
  class_names: Tuple[str, ...]
  path: str

  @property
  def nbytes(self) -> int:
    return int(self.images.nbytes + self.labels.nbytes)


# --- Where ---------------------------------------------------------------------------------------

def tfds_data_dir(config) -> str:
  """The tfds data dir a run uses (without importing tfds): config.data_dir, $TFDS_DATA_DIR, or tfds's
  default ~/tensorflow_datasets."""
  return os.path.expanduser(config.data_dir or os.environ.get("TFDS_DATA_DIR")
                            or os.path.join("~", "tensorflow_datasets"))


def cache_root(config) -> str:
  """The folder holding this dataset's cached splits' parent (see the module docstring)."""
  explicit = config.array_cache_dir or os.environ.get("CNN_JAX_ARRAY_CACHE_DIR")
  if explicit:
    return os.path.expanduser(explicit)
  if str(config.dataset).startswith(FOLDER_PREFIX):
    return os.path.join(os.path.expanduser("~"), ".cache", "cnn_jax", "arrays")
  return os.path.join(tfds_data_dir(config), "cnn_jax_arrays")


def dataset_key(config, resolution: Optional[int]) -> str:
  """A folder name for the dataset (and, for resized caches, its resolution)."""
  name = str(config.dataset)
  if name.startswith(FOLDER_PREFIX):
    root = os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):]))
    key = f"folder-{os.path.basename(root.rstrip(os.sep)) or 'root'}-{_short_hash(root)}"
    holdout = parse_holdout(config.eval_split)
    if holdout:  # the train split is the folder less the hold-out: another cache
      key += f"-holdout{holdout:g}"
  else:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "__", name)
  return f"{key}-r{resolution}" if resolution else key


def _short_hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def resolution_for(config, fixed_shape: bool) -> Optional[int]:
  """None for datasets of fixed image size (stored as is), else the cache side in pixels:
  config.array_cache_res, or (0 = auto) round(image_size * 256 / 224), AlexNet's shorter-side ratio."""
  if fixed_shape:
    return None
  res = int(config.array_cache_res or 0)
  if res < 0:
    raise UserError(f"--config.array_cache_res={res} must be >= 0 (0 = image_size * 256/224)")
  return res or int(round(int(config.image_size) * 256 / 224))


def split_dir(config, split: str, resolution: Optional[int]) -> str:
  return os.path.join(cache_root(config), dataset_key(config, resolution), split)


# --- Source signatures (TensorFlow-free) ----------------------------------------------------------

def folder_signature(root: str) -> str:
  """SHA-256 over (relative path, size, mtime) of every non-hidden file under `root`."""
  entries = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      entries.append(f"{os.path.relpath(path, root)}|{st.st_size}|{st.st_mtime_ns}")
  return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _current_signature(recorded: Dict) -> Optional[str]:
  """The source's signature now, if it is present (None: absent, e.g. a cache carried to another machine)."""
  kind, where = recorded.get("kind"), recorded.get("path")
  if kind == "tfds":
    info = os.path.join(where, "dataset_info.json")
    return _file_sha256(info) if os.path.exists(info) else None
  if kind == "folder":
    return folder_signature(where) if os.path.isdir(where) else None
  return None


# --- Reading --------------------------------------------------------------------------------------

def read_meta(path: str) -> Dict:
  try:
    with open(os.path.join(path, _META)) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise StaleCacheError(f"its {_META} is missing or unreadable ({type(e).__name__})") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise StaleCacheError(f"it has format version {meta.get('format_version')}, not {FORMAT_VERSION}")
  return meta


def load_split(path: str, check_source: bool = True) -> SplitArrays:
  """Opens a cached split (memory-mapped) after checking it; StaleCacheError says why it cannot be used."""
  meta = read_meta(path)
  arrays = {}
  for name, expected_dtype in ((_IMAGES, np.uint8), (_LABELS, np.int32)):
    file_path = os.path.join(path, name)
    want = meta["files"][name]
    if not os.path.exists(file_path):
      raise StaleCacheError(f"{name} is missing")
    size = os.path.getsize(file_path)
    if size != want["bytes"]:
      raise StaleCacheError(f"{name} has {size} bytes, {want['bytes']} were written (truncated or replaced)")
    if _file_sha256(file_path) != want["sha256"]:
      raise StaleCacheError(f"{name} does not match its recorded SHA-256 (damaged)")
    try:
      array = np.load(file_path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise StaleCacheError(f"{name} is not a readable .npy file ({e})") from e
    if array.dtype != expected_dtype or list(array.shape) != list(want["shape"]):
      raise StaleCacheError(f"{name} holds {array.dtype} {list(array.shape)}, meta.json says "
                            f"{np.dtype(expected_dtype)} {want['shape']}")
    arrays[name] = array
  if len(arrays[_IMAGES]) != len(arrays[_LABELS]):
    raise StaleCacheError("images and labels differ in length")
  if check_source:
    now = _current_signature(meta["source"])
    if now is not None and now != meta["source"]["signature"]:
      raise StaleCacheError(f"its source {meta['source']['path']} changed since it was written")
  return SplitArrays(arrays[_IMAGES], arrays[_LABELS], tuple(meta["class_names"]), path)


# --- Writing (reads the source through TensorFlow) ------------------------------------------------

def build_split(config, split: str, resolution: Optional[int], dest: str) -> SplitArrays:
  """Decodes base split `split` of config.dataset into `dest` (atomically: a temp folder, then rename)."""
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top  (TensorFlow from here on)
  from cnn_jax.data import augment  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top

  source = datasets.get_source(config)
  count = source.num_examples(split)
  if count == 0:
    raise UserError(f"split {split!r} of {source.name} is empty")
  channels = source.channels

  def decode(example):
    image = pipeline.decode(example["image"], channels)
    if resolution:
      image = augment.crop(image, augment.center_crop_window(tf.shape(image)))
      image = tf.cast(tf.round(tf.clip_by_value(augment.resize(image, resolution, antialias=True), 0, 255)),
                      tf.uint8)
    return image, tf.cast(example["label"], tf.int32)

  ds = source.read(split).map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
  # A damaged image becomes one line naming it, as in the host pipeline.
  batches = pipeline.numpy_batches(ds, source, split)
  tmp = f"{dest}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  images, labels, filled = None, np.zeros(count, np.int32), 0
  try:
    for image_batch, label_batch in batches:
      if images is None:
        images = np.lib.format.open_memmap(os.path.join(tmp, _IMAGES), mode="w+", dtype=np.uint8,
                                           shape=(count,) + image_batch.shape[1:])
      elif image_batch.shape[1:] != images.shape[1:]:
        raise UserError(f"{source.name}/{split} has images of several sizes ({images.shape[1:]} and "
                        f"{image_batch.shape[1:]}); set --config.array_cache_res to store them resized")
      images[filled:filled + len(image_batch)] = image_batch
      labels[filled:filled + len(label_batch)] = label_batch
      filled += len(image_batch)
    if filled != count:
      raise UserError(f"{source.name}/{split} yielded {filled} examples, its metadata says {count}")
    images.flush()
    del images
    np.save(os.path.join(tmp, _LABELS), labels)
    _write_meta(tmp, config, source, split, count, resolution)
    _replace_dir(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return load_split(dest, check_source=False)


def _write_meta(folder: str, config, source, split: str, count: int, resolution: Optional[int]) -> None:
  """meta.json of a split written to `folder`: class names, the files' sizes and SHA-256, the source's
  signature, the resolution."""
  from cnn_jax.data import folders  # pylint: disable=g-import-not-at-top
  info = source.info(split, split)
  if isinstance(source, folders.FolderSource):
    signature = {"kind": "folder", "path": os.path.abspath(source.root)}
  else:
    signature = {"kind": "tfds", "path": str(source.builder.data_dir)}
  signature["signature"] = _current_signature(signature)
  files = {}
  for name in (_IMAGES, _LABELS):
    array = np.load(os.path.join(folder, name), mmap_mode="r")
    files[name] = {"bytes": os.path.getsize(os.path.join(folder, name)),
                   "sha256": _file_sha256(os.path.join(folder, name)), "shape": list(array.shape)}
    del array
  meta = {"format_version": FORMAT_VERSION, "dataset": source.name, "split": split,
          "num_examples": count, "class_names": list(info.class_names), "resolution": resolution,
          # Resized by the automatic rule, which resizes a folder only when its images differ in size.
          "sizes_vary": bool(resolution and not config.array_cache_res),
          "files": files, "source": signature, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  with open(os.path.join(folder, _META), "w") as f:
    json.dump(meta, f, indent=1)


def _replace_dir(tmp: str, dest: str) -> None:
  """Moves the finished `tmp` to `dest`; an older `dest` is moved aside first and then deleted. When
  several processes build the same split at once, each rename is atomic and the last one wins."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  old = None
  if os.path.exists(dest):
    old = f"{dest}.old-{os.getpid()}"
    os.replace(dest, old)
  os.replace(tmp, dest)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _tensorflow_available() -> bool:
  if "tensorflow" in sys.modules and sys.modules["tensorflow"] is None:
    return False
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def rebuild_command(config) -> str:
  """The command that writes this dataset's array cache."""
  parts = [f"python -m cnn_jax.data.prepare --arrays --dataset={config.dataset}"]
  if config.data_dir:
    parts.append(f"--data_dir={config.data_dir}")
  if config.array_cache_dir:
    parts.append(f"--array_cache_dir={config.array_cache_dir}")
  return " ".join(parts)


def get_split(config, split: str, resolution: Optional[int], allow_build: bool = True,
              announce=print) -> SplitArrays:
  """The cached base split `split`, written first if missing or stale (when the source can be read)."""
  path = split_dir(config, split, resolution)
  problem = None
  if os.path.exists(os.path.join(path, _META)):
    try:
      return load_split(path)
    except StaleCacheError as e:
      problem = str(e)
  if not allow_build or not _tensorflow_available():
    what = f"is unusable: {problem}" if problem else "does not exist"
    raise UserError(f"the array cache of {config.dataset}/{split} at {path} {what}; write it where "
                    f"the dataset and TensorFlow are available: {rebuild_command(config)}")
  if problem:
    logging.warning("array cache %s: %s; rebuilding it", path, problem)
    announce(f"array cache {path} {problem}: rebuilding it")
  else:
    announce(f"Writing the array cache of {config.dataset}/{split} to {path} (once)...")
  start = time.time()
  arrays = build_split(config, split, resolution, path)
  announce(f"  {len(arrays.labels):,} images {tuple(arrays.images.shape[1:])} uint8, "
           f"{arrays.nbytes / 2**20:.0f} MiB, in {time.time() - start:.0f} s")
  return arrays


def cached_shape(config) -> Optional[Tuple[Optional[int], Tuple[int, ...]]]:
  """(resolution, image shape) of an existing cache of config.dataset, read from any cached split's meta
  (None if nothing is cached)."""
  root = cache_root(config)
  candidates = [dataset_key(config, None)]
  if os.path.isdir(root):
    prefix = dataset_key(config, None) + "-r"
    candidates += sorted(d for d in os.listdir(root) if d.startswith(prefix))
  wanted = resolution_for(config, fixed_shape=False)
  auto_folder = not config.array_cache_res and str(config.dataset).startswith(FOLDER_PREFIX)
  for key in candidates:
    folder = os.path.join(root, key)
    if not os.path.isdir(folder):
      continue
    for split in sorted(os.listdir(folder)):
      try:
        meta = read_meta(os.path.join(folder, split))
      except StaleCacheError:
        continue
      if meta["resolution"] is not None and auto_folder and not meta.get("sizes_vary"):
        continue  # resized by an older rule although its images may all have one size: build it again
      if meta["resolution"] in (None, wanted):
        return meta["resolution"], tuple(meta["files"][_IMAGES]["shape"][1:])
  return None


def cached_sizes(config, resolution: Optional[int]) -> Dict[str, int]:
  """{split: num_examples} of the splits cached for config.dataset at `resolution` (meta only)."""
  folder = os.path.join(cache_root(config), dataset_key(config, resolution))
  sizes = {}
  if os.path.isdir(folder):
    for split in os.listdir(folder):
      try:
        sizes[split] = int(read_meta(os.path.join(folder, split))["num_examples"])
      except StaleCacheError:
        continue
  return sizes


def dataset_info(name: str, train: Sequence[SplitArrays], num_train: int, num_eval: int) -> DatasetInfo:
  """DatasetInfo of cached splits."""
  shape = tuple(int(d) for d in train[0].images.shape[1:])
  class_names = train[0].class_names
  return DatasetInfo(name=name, num_classes=len(class_names), num_train=num_train, num_eval=num_eval,
                     class_names=class_names, image_shape=shape)


def base_name(config) -> str:
  """'fashion_mnist', 'imagenette', or 'folder' (the key of per-dataset constants)."""
  return base_name_of(str(config.dataset))
