"""The programs a run compiles, built abstractly for any mesh: the program builder of cnn_jax.compile_check.

The builder hook (what compile_check takes, and what a trainer that owns its jits can supply instead):

  build(config, mesh, *, device_memory_bytes=None) -> {"train": Program, "eval": Program}

  config               the run's ml_collections config (configs/*.py with overrides); the global batches are
                       its batch_size (train) and eval_batch_size (eval): the batch search passes copies
                       with one of them changed
  mesh                 a jax.sharding.Mesh over the devices to compile for (compile-only devices of a target)
  device_memory_bytes  memory of one device, for decisions the run makes from it (config.input='auto')

  Program.fn    a jax.jit-wrapped function with in/out shardings on `mesh` (and donation) as the run jits it
  Program.args  its abstract arguments: pytrees of jax.ShapeDtypeStruct carrying NamedShardings on `mesh`
  Program.batch the global batch; max_batch the largest worth trying (train: the train split, one batch per
                epoch; eval: the eval split, beyond which a batch is only padding; None: no limit)
  Program.network  optional (jitted fn, unsharded abstract args): the network's own step, counted for FLOPs on
                the host CPU the way train.py counts them (cuDNN calls count no FLOPs in XLA:GPU's analysis)
  Program.resident_bytes  bytes per device that stay allocated while the program runs without being its
                arguments (device input: the other resident splits)
  Program.describe  one line for the report ("device input: ...")

Nothing is run and no data is read: shapes come from the array cache's metadata when it exists, else from a
small table of known datasets (`KNOWN_DATASETS`). `build` below mirrors what cnn_jax/train.py compiles today
(train.py -> inputs.create -> DeviceInput/HostInput .train_step / .evaluate); it is the one piece to replace
when the trainer exposes its own builder.

The caller traces (lowers) the programs under `cnn_jax.ops.impl("xla")`: on this CPU, JAX's default backend is
the CPU, and 'auto' would otherwise trace the CPU-tuned kernels into a GPU or TPU program.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnn_jax import sharding as shd
from cnn_jax import steps as steps_lib
from cnn_jax.data import arrays
from cnn_jax.data import augment_jax
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.augment_spec import (IMAGENET_EIGVALS, IMAGENET_EIGVECS, AugmentSettings,
                                       check_eval_settings)
from cnn_jax.data.info import FOLDER_PREFIX, base_name_of, resolve_splits
from cnn_jax.data.inputs import DEFAULT_MEMORY_SHARE, MODES
from cnn_jax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Program:
  """One jitted program with abstract arguments (see the module docstring)."""
  fn: Any
  args: Tuple[Any, ...]
  batch: int
  max_batch: Optional[int] = None
  network: Optional[Tuple[Callable, Tuple[Any, ...]]] = None
  resident_bytes: int = 0
  describe: str = ""


Builder = Callable[..., Dict[str, Program]]


# --- Dataset shapes without the data ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetShape:
  """What the programs need to know of a dataset: the stored image shape (H, W, C) (varying sizes: the array
  cache's resolution), examples per split, classes, and where that came from ('array cache' | 'table')."""
  image_shape: Tuple[int, int, int]
  sizes: Dict[str, int]
  num_classes: int
  source: str


# name: (raw (H, W, C) or None where images vary in size, {split: examples}, classes). tfds's numbers.
KNOWN_DATASETS = {
    "fashion_mnist": ((28, 28, 1), {"train": 60_000, "test": 10_000}, 10),
    "mnist": ((28, 28, 1), {"train": 60_000, "test": 10_000}, 10),
    "kmnist": ((28, 28, 1), {"train": 60_000, "test": 10_000}, 10),
    "cifar10": ((32, 32, 3), {"train": 50_000, "test": 10_000}, 10),
    "cifar100": ((32, 32, 3), {"train": 50_000, "test": 10_000}, 100),
    "svhn_cropped": ((32, 32, 3), {"train": 73_257, "test": 26_032, "extra": 531_131}, 10),
    "stl10": ((96, 96, 3), {"train": 5_000, "test": 8_000, "unlabelled": 100_000}, 10),
    "imagenette": (None, {"train": 9_469, "validation": 3_925}, 10),
    "imagewang": (None, {"train": 14_669, "validation": 3_929}, 20),
    "imagenet2012": (None, {"train": 1_281_167, "validation": 50_000}, 1000),
}


def _from_cache(config, bases) -> Optional[DatasetShape]:
  cached = arrays.cached_shape(config)
  if cached is None:
    return None
  resolution, shape = cached
  sizes = arrays.cached_sizes(config, resolution)
  if any(b not in sizes for b in bases):
    return None
  folder = os.path.join(arrays.cache_root(config), arrays.dataset_key(config, resolution))
  meta = arrays.read_meta(os.path.join(folder, bases[0]))
  return DatasetShape(tuple(int(d) for d in shape), sizes, len(meta["class_names"]), "array cache")


def dataset_shape(config, roles: Dict[str, str]) -> DatasetShape:
  """The shapes of config.dataset's splits named in `roles`: from the array cache's metadata, else the table."""
  bases = sorted({name for spec in roles.values() for name, _, _ in arrays.parse_split(spec)})
  found = _from_cache(config, bases)
  if found is not None:
    return found
  name = str(config.dataset)
  base = base_name_of(name)
  if name.startswith(FOLDER_PREFIX) or base not in KNOWN_DATASETS:
    raise UserError(f"--config.dataset={name!r}: its shapes are not known without its array cache; write the "
                    f"cache once ({arrays.rebuild_command(config)}) or use one of {sorted(KNOWN_DATASETS)}")
  raw, sizes, classes = KNOWN_DATASETS[base]
  missing = [b for b in bases if b not in sizes]
  if missing:
    raise UserError(f"{base} has no split {missing[0]!r} (it has {', '.join(sizes)})")
  if raw is None:
    side = arrays.resolution_for(config, fixed_shape=False)
    raw = (side, side, 3)
  return DatasetShape(tuple(raw), dict(sizes), classes, "table")


def _process_rows(spec: str, sizes: Dict[str, int], drop_remainder: bool, n_proc: int) -> Tuple[int, int]:
  """(rows every device holds, process 0's real examples) of split `spec` over `n_proc` processes."""
  total = sum(len(idx) for _, idx in arrays.split_indices(spec, sizes))
  start, end = arrays.process_slice(total, 0, n_proc, drop_remainder)
  return end - start, end - start


# --- The builder of today's train.py -----------------------------------------------------------------

def _roles(config) -> Dict[str, str]:
  train_split, eval_split = resolve_splits(config)
  roles = {"train": train_split, "eval": eval_split}
  if config.get("eval_train_split"):
    roles["train_eval"] = config.eval_train_split
  return roles


def _input_mode(config, shape: DatasetShape, roles, n_proc: int, device_memory_bytes: Optional[int]) -> str:
  """config.input resolved as inputs.create resolves it: 'auto' = device when the resident splits fit
  input_memory_share of one device's memory."""
  mode = config.get("input", "auto") or "auto"
  if mode not in MODES:
    raise UserError(f"--config.input={mode!r} is not one of {list(MODES)}")
  if str(config.get("eval_split") or "").startswith("holdout:"):
    if mode == "device":
      raise UserError("--config.eval_split=holdout:... is drawn by the host pipeline; use --config.input=host")
    return "host"
  if mode != "auto":
    return mode
  need = resident_bytes_per_device(shape, roles, n_proc)
  share = float(config.get("input_memory_share", DEFAULT_MEMORY_SHARE))
  return "device" if device_memory_bytes is None or need <= share * device_memory_bytes else "host"


def resident_bytes_per_device(shape: DatasetShape, roles: Dict[str, str], n_proc: int,
                              skip=()) -> int:
  """uint8 images + int32 labels of process 0's part of every resident split (device input), per device."""
  pixels = int(np.prod(shape.image_shape))
  total = 0
  for role, spec in roles.items():
    if role in skip:
      continue
    rows, _ = _process_rows(spec, shape.sizes, role == "train", n_proc)
    total += rows * (pixels + 4)
  return total


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def build(config, mesh: Mesh, *, device_memory_bytes: Optional[int] = None) -> Dict[str, Program]:
  """The train and eval programs train.py compiles for `config` on `mesh` (the module docstring's hook).

  Mirrors cnn_jax/train.py: the model of train.build_model, the optimiser and schedule of cnn_jax.steps, the
  state of create_train_state (by jax.eval_shape), and the input of config.input: device input (the uint8
  splits resident on every device, gathered and augmented inside the jitted step: device_input.DeviceInput
  .train_step / ._eval_jit) or host input (float32 batches put on the mesh: host_input.HostInput).
  """
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  from cnn_jax.train import build_model  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  devices = list(mesh.devices.flat)
  n_dev = len(devices)
  n_proc = len({d.process_index for d in devices})
  batch = int(config.batch_size)
  eval_batch = int(config.eval_batch_size)
  for field, value in (("batch_size", batch), ("eval_batch_size", eval_batch)):
    if value <= 0 or value % n_dev or value % n_proc:
      raise UserError(f"--config.{field}={value} must be a positive multiple of the {n_dev} devices"
                      + (f" and {n_proc} processes" if n_proc > 1 else ""))
  models.check_input_size(config.model, config.image_size, **config.model_kwargs.to_dict())
  size = int(config.image_size)
  dtype = _DTYPES.get(config.get("dtype", "float32"))
  if dtype is None:
    raise UserError(f"--config.dtype={config.dtype!r} is not one of {sorted(_DTYPES)}")

  roles = _roles(config)
  shape = dataset_shape(config, roles)
  mode = _input_mode(config, shape, roles, n_proc, device_memory_bytes)
  train_rows, train_count = _process_rows(roles["train"], shape.sizes, True, n_proc)
  steps_per_epoch = train_count // (batch // n_proc)
  if steps_per_epoch == 0:
    raise UserError(f"a process's part of the train split has {train_count} examples, fewer than one batch "
                    f"of {batch // n_proc}; lower the batch")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else max(1, int(config.num_epochs * steps_per_epoch)))

  model = build_model(config, shape.num_classes)
  schedule = steps_lib.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = steps_lib.make_optimizer(config, schedule)
  state_shape = jax.eval_shape(
      functools.partial(steps_lib.create_train_state, model, tx, image_shape=(size, size, 3)),
      jax.ShapeDtypeStruct((2,), jnp.uint32))
  replicated = shd.replicated(mesh)
  data = NamedSharding(mesh, P(shd.DATA_AXIS))
  state = jax.tree.map(lambda x: _spec(x.shape, x.dtype, replicated), state_shape)
  step_fn = functools.partial(steps_lib.train_step, label_smoothing=config.optimizer.label_smoothing,
                              schedule=schedule, log_layer_grad_norms=bool(config.get("log_grad_norms", False)))
  eval_fn = steps_lib.eval_step
  eval_crop = config.get("eval_crop", "center")
  eval_ratio = float(config.get("eval_resize_ratio", 1.0))
  check_eval_settings(eval_crop, eval_ratio)
  crops = (10,) if eval_crop == "ten_crop" else ()
  max_batch = train_count * n_proc  # one batch per epoch at most (each process draws from its own part)
  _, eval_count = _process_rows(roles["eval"], shape.sizes, False, n_proc)
  max_eval_batch = eval_count * n_proc  # the whole eval split in one batch
  h, w, c = shape.image_shape
  what = (f"{config.dataset} {h}x{w}x{c} ({shape.source}), "
          f"{n_dev} device{'s' if n_dev > 1 else ''}" + (f" in {n_proc} processes" if n_proc > 1 else ""))

  if mode == "host":
    batch_images = lambda b, dt, extra=(): _spec((b,) + extra + (size, size, 3), dt, data)
    train_batch = {"image": batch_images(batch, jnp.float32), "label": _spec((batch,), jnp.int32, data)}
    eval_batch_spec = {"image": batch_images(eval_batch, jnp.float32, crops),
                       "label": _spec((eval_batch,), jnp.int32, data), "mask": _spec((eval_batch,), jnp.bool_, data)}
    train = jax.jit(step_fn, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                    donate_argnums=(0,))
    evaluate = jax.jit(eval_fn, in_shardings=(replicated, data), out_shardings=replicated)
    describe = f"host input (tf.data batches put on the mesh), {what}"
    return {
        "train": Program(train, (state, train_batch), batch, max_batch,
                         (jax.jit(step_fn), (state_shape, _unsharded(train_batch))), 0, describe),
        "eval": Program(evaluate, (state, eval_batch_spec), eval_batch, max_eval_batch,
                        (jax.jit(eval_fn), (state_shape, _unsharded(eval_batch_spec))), 0, describe),
    }

  # Device input: device_input.DeviceInput with the data left out.
  base = base_name_of(str(config.dataset))
  settings = AugmentSettings.from_config(config.get("augment"))
  mean_std = _mean_std(config, base)
  # PCA lighting's eigen decomposition: ImageNet's for ImageNet-like data (as the run), else a stand-in of the
  # same shapes for the train split's own (which needs the data).
  eigen = (np.asarray(IMAGENET_EIGVALS, np.float32), np.asarray(IMAGENET_EIGVECS, np.float32))
  per_device = batch // n_dev

  def train_local(images, labels, idx, key):  # DeviceInput._gather
    batch_images, batch_labels = images[0][idx], labels[0][idx]
    position = jax.lax.axis_index(shd.DATA_AXIS) * per_device + jnp.arange(per_device)
    keys = jax.vmap(lambda p: jax.random.fold_in(key, p))(position)
    return augment_jax.train_batch(batch_images, keys, settings, size, eigen, mean_std, dtype), batch_labels

  spec = P(shd.DATA_AXIS)
  gather = jax.shard_map(train_local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=(spec, spec))

  def device_step(state, images, labels, perm, augment_key):  # DeviceInput._batch_fn + .train_step
    step = state.step
    batch_images, batch_labels = gather(images, labels, perm[step % steps_per_epoch],
                                        jax.random.fold_in(augment_key, step))
    return step_fn(state, {"image": batch_images, "label": batch_labels})

  def eval_local(images, labels, idx):  # DeviceInput._eval_jit
    return augment_jax.eval_batch(images[0][idx], eval_crop, eval_ratio, size, mean_std, dtype), labels[0][idx]

  eval_gather = jax.shard_map(eval_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec))

  def device_eval(state, images, labels, idx, mask):
    batch_images, batch_labels = eval_gather(images, labels, idx)
    return eval_fn(state, {"image": batch_images, "label": batch_labels, "mask": mask})

  perm_sharding = NamedSharding(mesh, P(None, shd.DATA_AXIS))
  eval_rows, _ = _process_rows(roles["eval"], shape.sizes, False, n_proc)
  resident = lambda rows: (_spec((n_dev, rows) + shape.image_shape, jnp.uint8, data),
                           _spec((n_dev, rows), jnp.int32, data))
  train_args = (state, *resident(train_rows), _spec((steps_per_epoch, batch), jnp.int32, perm_sharding),
                _spec((2,), jnp.uint32, replicated))
  eval_args = (state, *resident(eval_rows), _spec((eval_batch,), jnp.int32, data),
               _spec((eval_batch,), jnp.bool_, data))
  train = jax.jit(device_step, in_shardings=(replicated, data, data, perm_sharding, replicated),
                  out_shardings=(replicated, replicated), donate_argnums=(0,))
  evaluate = jax.jit(device_eval, in_shardings=(replicated, data, data, data, data), out_shardings=replicated)
  train_net = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), dtype),
               "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  eval_net = {"image": jax.ShapeDtypeStruct((eval_batch,) + crops + (size, size, 3), dtype),
              "label": jax.ShapeDtypeStruct((eval_batch,), jnp.int32),
              "mask": jax.ShapeDtypeStruct((eval_batch,), jnp.bool_)}
  describe = (f"device input (uint8 splits resident on every device, augmentation inside the step), {what}, "
              f"{resident_bytes_per_device(shape, roles, n_proc) / 2**20:,.0f} MiB resident per device")
  return {
      "train": Program(train, train_args, batch, max_batch, (jax.jit(step_fn), (state_shape, train_net)),
                       resident_bytes_per_device(shape, roles, n_proc, skip=("train",)), describe),
      "eval": Program(evaluate, eval_args, eval_batch, max_eval_batch, (jax.jit(eval_fn), (state_shape, eval_net)),
                      resident_bytes_per_device(shape, roles, n_proc, skip=("eval",)), describe),
  }


def _mean_std(config, base: str):
  """The normalisation constants (their values do not change the program's shapes; 'dataset' statistics,
  which need the data, are stood in for by ImageNet's)."""
  spec = config.get("normalize", "auto")
  return stats_lib.mean_std(spec, base, lambda: stats_lib.RgbStatistics(
      mean=stats_lib.IMAGENET_MEAN_STD[0], std=stats_lib.IMAGENET_MEAN_STD[1],
      eigvals=tuple(IMAGENET_EIGVALS), eigvecs=tuple(map(tuple, IMAGENET_EIGVECS)), num_images=0))


def _unsharded(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
