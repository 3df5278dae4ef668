"""Device input: the whole uint8 split resident on the devices, batches gathered and augmented in the step.

For data that fits (Fashion-MNIST: 47 MB; CIFAR-10: 150 MB). The split comes from the array cache
(arrays.py, numpy only: no TensorFlow at run time). Each device holds its process's part of the split as
uint8 (one global array [devices, N_local, H, W, C] sharded on `data`: device d's row is the part of the
process it belongs to). Each step, inside ONE jit with the train step:

  indices  = permutation(seed, process, epoch)[step_in_epoch]   (drawn on the host once per epoch, [B])
  gather   each device takes its B / devices examples from its own copy (shard_map: no communication)
  augment  the crop/flip/colour ops of `config.augment` per example (augment_jax.py, vmapped), keyed by
           fold_in(fold_in(key(seed), step), position in the global batch), then normalised, in the
           compute dtype
  step     the pure train step of cnn_jax.steps

Every random choice is a function of (seed, step, position) and the epoch permutation of (seed, process,
epoch), so a run resumed at step k draws exactly the batches an uninterrupted run draws; each process
draws only from its own part (tfds.even_splits' rule, remainder dropped), like the host pipeline. Eval
gathers its padded, masked batches the same way and preprocesses them on the device (centre crop, resize or
ten crops), covering every example exactly once.
"""

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax.experimental import multihost_utils

from cnn_jax import ops
from cnn_jax import sharding as shd
from cnn_jax import specs
from cnn_jax.data import arrays
from cnn_jax.data import augment_jax
from cnn_jax.data import input_api
from cnn_jax.data import splits as split_specs
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.augment_spec import AugmentSettings, check_eval_settings
from cnn_jax.data.info import FOLDER_PREFIX, resolve_splits
from cnn_jax.errors import UserError



@dataclasses.dataclass(frozen=True)
class Plan:
  """What device input would keep resident, decided from the cache's metadata (or the source's) alone.

  resolution: None (stored at the raw size) or the cache side; image_shape: (H, W, C) as cached;
  sizes: {base split: examples}; splits: {role: split spec} for 'train', 'eval' and 'train_eval';
  bytes_per_device: uint8 images + int32 labels of this process's part of every resident split.
  """
  resolution: Optional[int]
  image_shape: Tuple[int, int, int]
  sizes: Dict[str, int]
  splits: Dict[str, str]
  bytes_per_device: int

  def describe(self) -> str:
    h, w, c = self.image_shape
    return f"the resident splits ({', '.join(sorted(set(self.splits.values())))}, {h}x{w}x{c} uint8)"


def _folder_splits(config) -> Optional[List[str]]:
  name = str(config.dataset)
  if not name.startswith(FOLDER_PREFIX):
    return None
  root = os.path.expanduser(name[len(FOLDER_PREFIX):])
  if not os.path.isdir(root):
    raise UserError(f"image folder {root!r} does not exist; expected {root}/<split>/<class>/*.jpg")
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _roles(config) -> Dict[str, str]:
  folders = _folder_splits(config)
  if folders is not None and (config.eval_split or "auto") == "auto" and not (
      {"test", "val", "validation"} & set(folders)):
    has = f"it has {', '.join(f + '/' for f in folders)}" if folders else "it is empty"
    raise UserError(f"image folder {config.dataset[len(FOLDER_PREFIX):]} has no test/, val/ or validation/ "
                    f"folder to evaluate on ({has}); name one with "
                    "--config.eval_split=<folder>, or hold out part of the train folder with "
                    "--config.eval_split=holdout:10%")
  train_split, eval_split = resolve_splits(config, folders)
  roles = {"train": train_split, "eval": eval_split}
  if config.eval_train_split:
    roles["train_eval"] = config.eval_train_split
  return roles


def _local_count(spec: str, sizes: Dict[str, int], drop_remainder: bool, process_index: int = None) -> int:
  total = sum(len(idx) for _, idx in split_specs.split_indices(spec, sizes))
  index = jax.process_index() if process_index is None else process_index
  start, end = split_specs.process_slice(total, index, jax.process_count(), drop_remainder)
  return end - start


def plan(config, mesh) -> Plan:
  """The device-input plan of `config` (reads the array cache's metadata; the source only if uncached)."""
  del mesh
  roles = _roles(config)
  bases = sorted({name for spec in roles.values() for name, _, _ in split_specs.parse_split(spec)})
  cached = arrays.cached_shape(config)
  if cached is not None:
    resolution, shape = cached
    sizes = arrays.cached_sizes(config, resolution)
  else:
    resolution, shape, sizes = None, None, {}
  missing = [b for b in bases if b not in sizes]
  if missing:  # the source tells what the cache will hold (TensorFlow, once)
    from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
    source = datasets.get_source(config)
    raw = source.info(roles["train"], roles["eval"]).image_shape
    if not config.array_cache_res and isinstance(source, datasets.FolderSource) and source.uniform_size():
      raw = source.uniform_size() + (source.channels,)  # images of one size are cached at that size
    fixed = all(isinstance(d, int) for d in raw)
    resolution = arrays.resolution_for(config, fixed)
    shape = tuple(raw) if fixed else (resolution, resolution, source.channels)
    for base in missing:
      sizes[base] = source.num_examples(base)
  for role, spec in roles.items():
    if not sum(len(idx) for _, idx in split_specs.split_indices(spec, sizes)):
      raise UserError(f"the {role.replace('_', ' ')} split {spec!r} of {config.dataset} holds no examples; name a "
                      f"non-empty one with --config.{ {'train': 'train_split', 'eval': 'eval_split'}.get(role, 'eval_train_split')}")
  pixels = int(np.prod(shape))
  total = 0
  for role, spec in roles.items():
    # Every process holds as many rows as process 0 (the largest part): eval parts are padded to it.
    total += _local_count(spec, sizes, role == "train", process_index=0) * (pixels + 4)
  return Plan(resolution, tuple(int(d) for d in shape), dict(sizes), roles, total)


def process_part(spec: str, split_arrays: Dict[str, arrays.SplitArrays], drop_remainder: bool,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, int]:
  """A process's part of split `spec` (this process's by default): (images [n, H, W, C], labels [n], n)."""
  sizes = {name: len(a.labels) for name, a in split_arrays.items()}
  pieces = split_specs.split_indices(spec, sizes)
  total = sum(len(idx) for _, idx in pieces)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  start, end = split_specs.process_slice(total, index, count, drop_remainder)
  images, labels, offset = [], [], 0
  for name, idx in pieces:
    lo, hi = max(start - offset, 0), min(end - offset, len(idx))
    if lo < hi:
      sel = idx[lo:hi]  # contiguous: a slice of the memory map, read once
      images.append(np.asarray(split_arrays[name].images[sel[0]:sel[-1] + 1]))
      labels.append(np.asarray(split_arrays[name].labels[sel[0]:sel[-1] + 1]))
    offset += len(idx)
  return np.concatenate(images), np.concatenate(labels).astype(np.int32), end - start


def _per_device(local: np.ndarray, mesh, rows: int) -> jax.Array:
  """A global array [devices, rows, ...] sharded on `data`: every local device holds `local` (padded
  with zeros to `rows`)."""
  if len(local) < rows:
    local = np.concatenate([local, np.zeros((rows - len(local),) + local.shape[1:], local.dtype)])
  sharding = NamedSharding(mesh, P(shd.DATA_AXIS))
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  shards = [jax.device_put(local[None], d) for d in devices]
  return jax.make_array_from_single_device_arrays((mesh.devices.size,) + local.shape, sharding, shards)


@dataclasses.dataclass
class _Resident:
  images: jax.Array   # uint8 [devices, rows, H, W, C]
  labels: jax.Array   # int32 [devices, rows]
  count: int          # this process's real examples (the rest of `rows` is padding)
  rows: int


class DeviceBatcher:
  """The device input's pure part: how a step's batch is made from resident arrays, inside the jit.

  Holds no data, so the same functions serve a run (DeviceInput) and a compile-only check of its programs
  (abstract arrays of the same shapes). Resident arrays are [devices, rows, H, W, C] uint8 and [devices, rows]
  int32, sharded on `data`: device d's row block is the part of the process it belongs to.
  """

  def __init__(self, mesh, *, batch_size: int, eval_batch_size: int, image_size: int, steps_per_epoch: int,
               settings: AugmentSettings, eval_crop: str, eval_resize_ratio: float, mean_std, eigen, dtype):
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    for field, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
      if value <= 0 or value % n_dev or value % n_proc:
        raise UserError(f"--config.{field}={value} must be a positive multiple of the {n_dev} devices")
    check_eval_settings(eval_crop, eval_resize_ratio)
    self.mesh = mesh
    self.batch_size, self.eval_batch_size, self.image_size = batch_size, eval_batch_size, image_size
    self.steps_per_epoch = steps_per_epoch
    self.settings, self.eval_crop, self.eval_resize_ratio = settings, eval_crop, eval_resize_ratio
    self.mean_std, self.eigen, self.dtype = mean_std, eigen, dtype

  def _data(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(shd.DATA_AXIS))

  def resident_spec(self, rows: int, image_shape) -> Tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract (images, labels) of a resident split of `rows` examples per device."""
    n_dev = self.mesh.devices.size
    return (jax.ShapeDtypeStruct((n_dev, rows) + tuple(image_shape), jnp.uint8, sharding=self._data()),
            jax.ShapeDtypeStruct((n_dev, rows), jnp.int32, sharding=self._data()))

  def train_spec(self, rows: int, image_shape):
    """Abstract train args (images, labels, permutation [steps_per_epoch, B], key)."""
    perm = jax.ShapeDtypeStruct((self.steps_per_epoch, self.batch_size), jnp.int32,
                                sharding=NamedSharding(self.mesh, P(None, shd.DATA_AXIS)))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shd.replicated(self.mesh))
    return self.resident_spec(rows, image_shape) + (perm, key)

  def eval_spec(self, rows: int, image_shape):
    """Abstract eval args (images, labels, indices [B], mask [B])."""
    b = self.eval_batch_size
    return self.resident_spec(rows, image_shape) + (
        jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self._data()),
        jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=self._data()))

  def make_batch(self, args, step):
    """The augmented global batch of train step `step`: gather + augment, per device (shard_map, no
    communication), keyed by fold_in(fold_in(key, step), position in the global batch)."""
    images, labels, perm, key = args
    settings, size, eigen, mean_std, dtype = (self.settings, self.image_size, self.eigen, self.mean_std,
                                              self.dtype)
    per_device = self.batch_size // self.mesh.devices.size

    def local(images, labels, idx, key):
      batch_images, batch_labels = images[0][idx], labels[0][idx]
      position = jax.lax.axis_index(shd.DATA_AXIS) * per_device + jnp.arange(per_device)
      keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(position)
      return augment_jax.train_batch(batch_images, keys, settings, size, eigen, mean_std, dtype), batch_labels

    data = P(shd.DATA_AXIS)
    gather = jax.shard_map(local, mesh=self.mesh, in_specs=(data, data, data, P()), out_specs=(data, data))
    batch_images, batch_labels = gather(images, labels, perm[step % self.steps_per_epoch],
                                        jax.random.fold_in(key, step))
    return {"image": batch_images, "label": batch_labels}

  def make_eval_batch(self, args):
    """The preprocessed eval batch (centre crop, resize or ten crops) of the gathered indices."""
    images, labels, idx, mask = args
    crop, ratio, size, mean_std, dtype = (self.eval_crop, self.eval_resize_ratio, self.image_size,
                                          self.mean_std, self.dtype)

    def local(images, labels, idx):
      return augment_jax.eval_batch(images[0][idx], crop, ratio, size, mean_std, dtype), labels[0][idx]

    data = P(shd.DATA_AXIS)
    gather = jax.shard_map(local, mesh=self.mesh, in_specs=(data, data, data), out_specs=(data, data))
    batch_images, batch_labels = gather(images, labels, idx)
    return {"image": batch_images, "label": batch_labels, "mask": mask}


def augment_key(seed: int, mesh) -> jax.Array:
  """The run's augmentation key, fold_in(key(seed), "aug"), replicated: an argument of the jitted step rather
  than a constant in it, so runs that differ only in their seed run one compiled program (a seed sweep
  compiles once, or loads it from a persistent compilation cache)."""
  key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), 0x617567)  # "aug"
  return jax.make_array_from_process_local_data(shd.replicated(mesh), np.asarray(key))


def _load_resident(config, mesh, the_plan: Plan, announce) -> Tuple[Dict[str, _Resident], Dict[str, arrays.SplitArrays]]:
  """Every split of the plan, this process's part, on the local devices; and the cached split arrays."""
  bases = sorted({name for spec in the_plan.splits.values() for name, _, _ in split_specs.parse_split(spec)})
  announce(f"loading {config.dataset} ({', '.join(sorted(set(the_plan.splits.values())))}) onto the devices, "
           f"{input_api.describe_bytes(the_plan.bytes_per_device)} each")
  if jax.process_count() > 1:
    # Process 0 writes whatever is missing before the others read (one writer per shared cache folder).
    if jax.process_index() == 0:
      for b in bases:
        arrays.get_split(config, b, the_plan.resolution, announce=announce)
    multihost_utils.sync_global_devices("cnn_jax:array_cache")
  split_arrays = {b: arrays.get_split(config, b, the_plan.resolution, announce=announce) for b in bases}
  sizes = {b: len(a.labels) for b, a in split_arrays.items()}
  resident = {}
  for role, spec in the_plan.splits.items():
    images, labels, count = process_part(spec, split_arrays, drop_remainder=(role == "train"))
    rows = _local_count(spec, sizes, role == "train", process_index=0)
    resident[spec] = _Resident(_per_device(images, mesh, rows), _per_device(labels, mesh, rows), count, rows)
  return resident, split_arrays


def _statistics_fn(config, train_split: str, split_arrays: Dict[str, arrays.SplitArrays]) -> Callable:
  """fn() -> the RGB statistics of the train split (the first MAX_IMAGES images: the pixels the host
  pipeline samples), cached with the run."""
  base = arrays.base_name(config)
  source_name = str(config.dataset)
  if source_name.startswith(FOLDER_PREFIX):
    source_name = FOLDER_PREFIX + os.path.expanduser(source_name[len(FOLDER_PREFIX):])

  def pixels():
    pieces = split_specs.split_indices(train_split, {b: len(a.labels) for b, a in split_arrays.items()})
    seen = 0
    for name, idx in pieces:
      for i in idx[:max(stats_lib.MAX_IMAGES - seen, 0)]:
        image = np.asarray(split_arrays[name].images[i])
        yield stats_lib.sample_pixels(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image)
        seen += 1

  return lambda: stats_lib.cached(source_name, base, train_split, config.cache_dir,
                                  lambda: stats_lib.accumulate(pixels(), f"split {train_split!r} of {source_name}"))


class DeviceInput(input_api.Input):
  """The device-resident split as an `input_api.Input` (see the module docstring)."""
  mode = "device"

  def __init__(self, config, mesh, the_plan: Plan, announce: Callable[[str], None] = print):
    self._config = config
    self._mesh = mesh
    self._plan = the_plan
    self._resident, split_arrays = _load_resident(config, mesh, the_plan, announce)
    train = self._resident[the_plan.splits["train"]]
    count = lambda role: sum(len(idx) for _, idx in split_specs.split_indices(the_plan.splits[role], the_plan.sizes))
    first = split_arrays[sorted(split_arrays)[0]]
    self.info = arrays.dataset_info(config.dataset, [first], count("train"), count("eval"))
    self.steps_per_epoch = input_api.steps_per_epoch(train.count, config.batch_size)
    if self.steps_per_epoch == 0:
      raise UserError(f"this process's part of the train split has {train.count} examples, fewer than one "
                      f"batch of {config.batch_size // jax.process_count()}; lower --config.batch_size")
    settings = AugmentSettings.from_config(config.augment)
    statistics = _statistics_fn(config, the_plan.splits["train"], split_arrays)
    base = arrays.base_name(config)
    self.mean_std = stats_lib.mean_std(config.normalize, base, statistics)
    self.channels = int(the_plan.image_shape[-1])
    eigen = stats_lib.lighting_eigen(base, statistics) if settings.pca_lighting else (None, None)
    self.batcher = DeviceBatcher(
        mesh, batch_size=int(config.batch_size), eval_batch_size=int(config.eval_batch_size),
        image_size=int(config.image_size), steps_per_epoch=self.steps_per_epoch, settings=settings,
        eval_crop=config.eval_crop, eval_resize_ratio=float(config.eval_resize_ratio), mean_std=self.mean_std,
        eigen=eigen, dtype=specs.DTYPES[config.dtype])
    self._augment_key = augment_key(config.seed, mesh)
    self._epoch, self._perm = None, None
    self._batch_jit = None

  def describe(self):
    train = self._resident[self._plan.splits["train"]]
    held = sum(r.images.nbytes + r.labels.nbytes for r in self._resident.values()) // self._mesh.devices.size
    h, w, c = self._plan.image_shape
    return (f"device-resident {self.info.name} ({train.count:,} train images {h}x{w}x{c} uint8 per process, "
            f"{input_api.describe_bytes(held)} on each device; augmentation inside the step)")

  # --- Train --------------------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> jax.Array:
    """This epoch's batches of example indices: int32 [steps_per_epoch, B] sharded on `data` along B
    (each process's columns are a permutation of its own part, seeded by (seed, process, epoch))."""
    local_batch = self._config.batch_size // jax.process_count()
    train = self._resident[self._plan.splits["train"]]
    rng = np.random.default_rng([int(self._config.seed), jax.process_index(), int(epoch)])
    perm = rng.permutation(train.count)[:self.steps_per_epoch * local_batch].astype(np.int32)
    sharding = NamedSharding(self._mesh, P(None, shd.DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, perm.reshape(self.steps_per_epoch, local_batch))

  def train_spec(self):
    train = self._resident[self._plan.splits["train"]]
    return self.batcher.train_spec(train.rows, self._plan.image_shape)

  def train_args(self, step: int):
    epoch = step // self.steps_per_epoch
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, self._permutation(epoch)
    train = self._resident[self._plan.splits["train"]]
    return (train.images, train.labels, self._perm, self._augment_key)

  def make_batch(self, args, step):
    return self.batcher.make_batch(args, step)

  def batch(self, step: int) -> Dict[str, jax.Array]:
    """The augmented global batch train step `step` sees, {'image', 'label'} (for tests and pictures)."""
    if self._batch_jit is None:
      self._batch_jit = jax.jit(self.make_batch, in_shardings=(input_api.shardings(self.train_spec()), None),
                                compiler_options=ops.compiler_options())
    train = self._resident[self._plan.splits["train"]]
    args = (train.images, train.labels, self._permutation(step // self.steps_per_epoch), self._augment_key)
    return self._batch_jit(args, jnp.int32(step))

  # --- Eval ---------------------------------------------------------------------------------------

  def _resident_split(self, split: Optional[str]) -> _Resident:
    spec = split or self._plan.splits["eval"]
    if spec not in self._resident:
      raise UserError(f"split {spec!r} is not resident on the devices; name it in --config.eval_split or "
                      "--config.eval_train_split")
    return self._resident[spec]

  def eval_spec(self, split=None):
    return self.batcher.eval_spec(self._resident_split(split).rows, self._plan.image_shape)

  def eval_args(self, split=None):
    resident = self._resident_split(split)
    local_batch = self._config.eval_batch_size // jax.process_count()
    sharding = NamedSharding(self._mesh, P(shd.DATA_AXIS))
    num_batches = -(-resident.rows // local_batch)  # the same on every process (rows = process 0's part)
    for b in range(num_batches):
      idx = np.arange(b * local_batch, (b + 1) * local_batch)
      mask = idx < resident.count
      idx = np.where(mask, idx, 0).astype(np.int32)
      yield (resident.images, resident.labels, jax.make_array_from_process_local_data(sharding, idx),
             jax.make_array_from_process_local_data(sharding, mask))

  def make_eval_batch(self, args):
    return self.batcher.make_eval_batch(args)
