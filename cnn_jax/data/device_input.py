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
import functools
import os
from typing import Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cnn_jax import sharding as shd
from cnn_jax.data import arrays
from cnn_jax.data import augment_jax
from cnn_jax.data import inputs
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.augment_spec import AugmentSettings, check_eval_settings
from cnn_jax.data.info import FOLDER_PREFIX, resolve_splits
from cnn_jax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
  name = str(config.get("dataset"))
  if not name.startswith(FOLDER_PREFIX):
    return None
  root = os.path.expanduser(name[len(FOLDER_PREFIX):])
  if not os.path.isdir(root):
    raise UserError(f"image folder {root!r} does not exist; expected {root}/<split>/<class>/*.jpg")
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _roles(config) -> Dict[str, str]:
  folders = _folder_splits(config)
  if folders is not None and (config.get("eval_split") or "auto") == "auto" and not (
      {"test", "val", "validation"} & set(folders)):
    raise UserError(f"image folder {config.dataset[len(FOLDER_PREFIX):]} has no test/, val/ or validation/ "
                    f"folder to evaluate on (it has {', '.join(f + '/' for f in folders)}); name one with "
                    "--config.eval_split=<folder>, or hold out part of the train folder with "
                    "--config.eval_split=holdout:10%")
  train_split, eval_split = resolve_splits(config, folders)
  roles = {"train": train_split, "eval": eval_split}
  if config.get("eval_train_split"):
    roles["train_eval"] = config.eval_train_split
  return roles


def _local_count(spec: str, sizes: Dict[str, int], drop_remainder: bool, process_index: int = None) -> int:
  total = sum(len(idx) for _, idx in arrays.split_indices(spec, sizes))
  index = jax.process_index() if process_index is None else process_index
  start, end = arrays.process_slice(total, index, jax.process_count(), drop_remainder)
  return end - start


def plan(config, mesh) -> Plan:
  """The device-input plan of `config` (reads the array cache's metadata; the source only if uncached)."""
  del mesh
  roles = _roles(config)
  bases = sorted({name for spec in roles.values() for name, _, _ in arrays.parse_split(spec)})
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
    fixed = all(isinstance(d, int) for d in raw)
    resolution = arrays.resolution_for(config, fixed)
    shape = tuple(raw) if fixed else (resolution, resolution, source.channels)
    for base in missing:
      sizes[base] = source.num_examples(base)
  pixels = int(np.prod(shape))
  total = 0
  for role, spec in roles.items():
    # Every process holds as many rows as process 0 (the largest part): eval parts are padded to it.
    total += _local_count(spec, sizes, role == "train", process_index=0) * (pixels + 4)
  return Plan(resolution, tuple(int(d) for d in shape), dict(sizes), roles, total)


def _process_part(spec: str, split_arrays: Dict[str, arrays.SplitArrays],
                  drop_remainder: bool) -> Tuple[np.ndarray, np.ndarray, int]:
  """This process's part of split `spec`: (images [n, H, W, C], labels [n], n)."""
  sizes = {name: len(a.labels) for name, a in split_arrays.items()}
  pieces = arrays.split_indices(spec, sizes)
  total = sum(len(idx) for _, idx in pieces)
  start, end = arrays.process_slice(total, jax.process_index(), jax.process_count(), drop_remainder)
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


class _DeviceTrainStep(inputs.TrainStep):

  def __init__(self, compiled, resident, permutation_fn, steps_per_epoch, batch_spec, augment_key):
    self.compiled = compiled
    self.batch_spec = batch_spec
    self._resident = resident
    self._permutation_fn = permutation_fn
    self._steps_per_epoch = steps_per_epoch
    self._epoch, self._perm = None, None
    self._augment_key = augment_key

  def __call__(self, state, step):
    epoch = step // self._steps_per_epoch
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, self._permutation_fn(epoch)
    return self.compiled(state, self._resident.images, self._resident.labels, self._perm, self._augment_key)


class DeviceInput(inputs.Input):
  """The device-resident split as an `inputs.Input` (see the module docstring)."""
  mode = "device"

  def __init__(self, config, mesh, the_plan: Plan, announce: Callable[[str], None] = print,
               compiler_options=None):
    self._config = config
    self._mesh = mesh
    self._plan = the_plan
    self._compiler_options = compiler_options
    self._eval_fns = {}
    self._batch_jit = None
    n_proc, n_dev = jax.process_count(), mesh.devices.size
    self._batch = int(config.batch_size)
    self._eval_batch = int(config.eval_batch_size)
    for field, value in (("batch_size", self._batch), ("eval_batch_size", self._eval_batch)):
      if value <= 0 or value % n_dev or value % n_proc:
        raise UserError(f"--config.{field}={value} must be a positive multiple of the {n_dev} devices")
    self._size = int(config.image_size)
    self._settings = AugmentSettings.from_config(config.get("augment"))
    self._eval_crop = config.get("eval_crop", "center")
    self._eval_ratio = float(config.get("eval_resize_ratio", 1.0))
    check_eval_settings(self._eval_crop, self._eval_ratio)
    self._dtype = _DTYPES.get(config.get("dtype", "float32"), jnp.float32)

    bases = sorted({name for spec in the_plan.splits.values() for name, _, _ in arrays.parse_split(spec)})
    announce(f"loading {config.dataset} ({', '.join(sorted(set(the_plan.splits.values())))}) onto the devices, "
             f"{inputs.describe_bytes(the_plan.bytes_per_device)} each")
    if n_proc > 1:
      # Process 0 writes whatever is missing before the others read (one writer per shared cache folder).
      if jax.process_index() == 0:
        for b in bases:
          arrays.get_split(config, b, the_plan.resolution, announce=announce)
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("cnn_jax:array_cache")
    split_arrays = {b: arrays.get_split(config, b, the_plan.resolution, announce=announce) for b in bases}
    self._resident = {}
    for role, spec in the_plan.splits.items():
      images, labels, count = _process_part(spec, split_arrays, drop_remainder=(role == "train"))
      rows = _local_count(spec, {b: len(a.labels) for b, a in split_arrays.items()}, role == "train",
                          process_index=0)
      self._resident[spec] = _Resident(_per_device(images, mesh, rows), _per_device(labels, mesh, rows),
                                       count, rows)
    train = self._resident[the_plan.splits["train"]]
    num_train = sum(len(idx) for _, idx in arrays.split_indices(the_plan.splits["train"], the_plan.sizes))
    num_eval = sum(len(idx) for _, idx in arrays.split_indices(the_plan.splits["eval"], the_plan.sizes))
    self.info = arrays.dataset_info(config.dataset, [split_arrays[bases[0]]], num_train, num_eval)
    self.steps_per_epoch = train.count // (self._batch // n_proc)
    if self.steps_per_epoch == 0:
      raise UserError(f"this process's part of the train split has {train.count} examples, fewer than one "
                      f"batch of {self._batch // n_proc}; lower --config.batch_size")

    base = arrays.base_name(config)
    source_name = str(config.dataset)
    if source_name.startswith(FOLDER_PREFIX):
      source_name = FOLDER_PREFIX + os.path.expanduser(source_name[len(FOLDER_PREFIX):])
    train_split = the_plan.splits["train"]

    def statistics():
      # The first MAX_IMAGES images of the whole train split, the pixels the host pipeline samples.
      pieces = arrays.split_indices(train_split, {b: len(a.labels) for b, a in split_arrays.items()})

      def pixels():
        seen = 0
        for name, idx in pieces:
          for i in idx[:max(stats_lib.MAX_IMAGES - seen, 0)]:
            image = np.asarray(split_arrays[name].images[i])
            yield stats_lib.sample_pixels(np.repeat(image, 3, -1) if image.shape[-1] == 1 else image)
            seen += 1

      return stats_lib.cached(source_name, base, train_split, config.get("cache_dir"),
                              lambda: stats_lib.accumulate(pixels(), f"split {train_split!r} of {source_name}"))

    self._mean_std = stats_lib.mean_std(config.get("normalize", "auto"), base, statistics)
    self.mean_std = self._mean_std
    self.channels = int(the_plan.image_shape[-1])
    self._eigen = (stats_lib.lighting_eigen(base, statistics) if self._settings.pca_lighting
                   else (None, None))

  def describe(self):
    train = self._resident[self._plan.splits["train"]]
    held = sum(r.images.nbytes + r.labels.nbytes for r in self._resident.values()) // self._mesh.devices.size
    h, w, c = self._plan.image_shape
    return (f"device-resident {self.info.name} ({train.count:,} train images {h}x{w}x{c} uint8 per process, "
            f"{inputs.describe_bytes(held)} on each device; augmentation inside the step)")

  # --- Train --------------------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> jax.Array:
    """This epoch's batches of example indices: int32 [steps_per_epoch, B] sharded on `data` along B
    (each process's columns are a permutation of its own part, seeded by (seed, process, epoch))."""
    local_batch = self._batch // jax.process_count()
    train = self._resident[self._plan.splits["train"]]
    rng = np.random.default_rng([int(self._config.seed), jax.process_index(), int(epoch)])
    perm = rng.permutation(train.count)[:self.steps_per_epoch * local_batch].astype(np.int32)
    sharding = NamedSharding(self._mesh, P(None, shd.DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, perm.reshape(self.steps_per_epoch, local_batch))

  def _gather(self, augment: Callable) -> Callable:
    """shard_map: each device gathers its share of the indices from its own copy and applies `augment`."""
    per_device = self._batch // self._mesh.devices.size

    def local(images, labels, idx, key):
      batch_images, batch_labels = images[0][idx], labels[0][idx]
      position = jax.lax.axis_index(shd.DATA_AXIS) * per_device + jnp.arange(per_device)
      keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(position)
      return augment(batch_images, keys), batch_labels

    data = P(shd.DATA_AXIS)
    return jax.shard_map(local, mesh=self._mesh, in_specs=(data, data, data, P()), out_specs=(data, data))

  @functools.cached_property
  def _augment_key(self) -> jax.Array:
    """The run's augmentation key, fold_in(key(seed), "aug"), replicated: an argument of the jitted step rather
    than a constant in it, so runs that differ only in their seed run one compiled program (a seed sweep
    compiles once, or loads it from a persistent compilation cache)."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(self._config.seed)), 0x617567)  # "aug"
    return jax.make_array_from_process_local_data(shd.replicated(self._mesh), np.asarray(key))

  def _batch_fn(self) -> Callable:
    """fn(images, labels, perm, step, augment_key) -> (image [B, S, S, 3] in the compute dtype, label [B]):
    the augmented global batch of train step `step` (traceable; `step` may be a traced int32)."""
    settings, size, eigen, mean_std, dtype = (self._settings, self._size, self._eigen, self._mean_std,
                                              self._dtype)
    gather = self._gather(
        lambda images, keys: augment_jax.train_batch(images, keys, settings, size, eigen, mean_std, dtype))
    steps_per_epoch = self.steps_per_epoch

    def batch(images, labels, perm, step, augment_key):
      return gather(images, labels, perm[step % steps_per_epoch], jax.random.fold_in(augment_key, step))

    return batch

  def _shardings(self):
    data = NamedSharding(self._mesh, P(shd.DATA_AXIS))
    return data, NamedSharding(self._mesh, P(None, shd.DATA_AXIS))

  def batch(self, step: int) -> Dict[str, jax.Array]:
    """The augmented global batch train step `step` sees, {'image', 'label'} (for tests and pictures)."""
    train = self._resident[self._plan.splits["train"]]
    if self._batch_jit is None:
      data, perm_sharding = self._shardings()
      self._batch_jit = jax.jit(self._batch_fn(), in_shardings=(data, data, perm_sharding, None, None),
                                out_shardings=(data, data), compiler_options=self._compiler_options)
    images, labels = self._batch_jit(train.images, train.labels, self._permutation(step // self.steps_per_epoch),
                                     jnp.int32(step), self._augment_key)
    return {"image": images, "label": labels}

  def train_step(self, step_fn, state, start_step):
    del start_step  # the batches are a function of the step number itself
    make_batch = self._batch_fn()

    def device_step(state, images, labels, perm, augment_key):
      batch_images, batch_labels = make_batch(images, labels, perm, state.step, augment_key)
      return step_fn(state, {"image": batch_images, "label": batch_labels})

    data, perm_sharding = self._shardings()
    replicated = shd.replicated(self._mesh)
    jitted = jax.jit(device_step, in_shardings=(replicated, data, data, perm_sharding, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=(0,),
                     compiler_options=self._compiler_options)
    train = self._resident[self._plan.splits["train"]]
    compiled = jitted.lower(state, train.images, train.labels, self._permutation(0), self._augment_key).compile()
    batch_spec = {"image": jax.ShapeDtypeStruct((self._batch, self._size, self._size, 3), self._dtype),
                  "label": jax.ShapeDtypeStruct((self._batch,), jnp.int32)}
    return _DeviceTrainStep(compiled, train, self._permutation, self.steps_per_epoch, batch_spec, self._augment_key)

  # --- Eval ---------------------------------------------------------------------------------------

  def _eval_jit(self, eval_fn):
    if eval_fn in self._eval_fns:
      return self._eval_fns[eval_fn]
    crop, ratio, size, mean_std, dtype = (self._eval_crop, self._eval_ratio, self._size, self._mean_std,
                                          self._dtype)

    def local(images, labels, idx):
      batch_images = augment_jax.eval_batch(images[0][idx], crop, ratio, size, mean_std, dtype)
      return batch_images, labels[0][idx]

    data = P(shd.DATA_AXIS)
    gather = jax.shard_map(local, mesh=self._mesh, in_specs=(data, data, data), out_specs=(data, data))

    def device_eval(state, images, labels, idx, mask):
      batch_images, batch_labels = gather(images, labels, idx)
      return eval_fn(state, {"image": batch_images, "label": batch_labels, "mask": mask})

    replicated = shd.replicated(self._mesh)
    sharded = NamedSharding(self._mesh, P(shd.DATA_AXIS))
    self._eval_fns[eval_fn] = jax.jit(
        device_eval, in_shardings=(replicated, sharded, sharded, sharded, sharded), out_shardings=replicated,
        compiler_options=self._compiler_options)
    return self._eval_fns[eval_fn]

  def evaluate(self, eval_fn, state, split=None):
    spec = split or self._plan.splits["eval"]
    if spec not in self._resident:
      raise UserError(f"split {spec!r} is not resident on the devices; name it in --config.eval_split or "
                      "--config.eval_train_split")
    resident = self._resident[spec]
    jitted = self._eval_jit(eval_fn)
    local_batch = self._eval_batch // jax.process_count()
    sharding = NamedSharding(self._mesh, P(shd.DATA_AXIS))
    totals = None
    num_batches = -(-resident.rows // local_batch)  # the same on every process (rows = process 0's part)
    for b in range(num_batches):
      idx = np.arange(b * local_batch, (b + 1) * local_batch)
      mask = idx < resident.count
      idx = np.where(mask, idx, 0).astype(np.int32)
      sums = jitted(state, resident.images, resident.labels,
                    jax.make_array_from_process_local_data(sharding, idx),
                    jax.make_array_from_process_local_data(sharding, mask))
      totals = sums if totals is None else jax.tree.map(lambda a, c: a + c, totals, sums)
    return inputs.finish_eval(totals)
