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
small table of known datasets (`KNOWN_DATASETS`). `build` below compiles with the trainer's own pieces
(cnn_jax.specs, cnn_jax.steps.recipe_steps / jit_train_step / jit_eval_step, the device input's DeviceBatcher):
an input with its data left out (`AbstractInput`) stands in for the run's.

The caller traces (lowers) the programs under `cnn_jax.ops.impl(program.lowering)`, the target backend's lowering
(what 'auto' picks on that backend): on this CPU, JAX's default backend is the CPU, and 'auto' would otherwise
trace the CPU-tuned kernels into a GPU or TPU program.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnn_jax import models
from cnn_jax import sharding as shd
from cnn_jax import specs
from cnn_jax import steps as steps_lib
from cnn_jax.data import arrays
from cnn_jax.data import device_input
from cnn_jax.data import input_api
from cnn_jax.data import splits as split_specs
from cnn_jax.data import stats as stats_lib
from cnn_jax.data.augment_spec import IMAGENET_EIGVALS, IMAGENET_EIGVECS, AugmentSettings
from cnn_jax.data.info import FOLDER_PREFIX, base_name_of, resolve_splits
from cnn_jax.data.inputs import MODES
from cnn_jax.errors import UserError


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
  lowering: str = "xla"  # the cnn_jax.ops lowering of the target's backend ('gpu', 'tpu'), traced in compile


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
  bases = sorted({name for spec in roles.values() for name, _, _ in split_specs.parse_split(spec)})
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
  total = sum(len(idx) for _, idx in split_specs.split_indices(spec, sizes))
  start, end = split_specs.process_slice(total, 0, n_proc, drop_remainder)
  return end - start, end - start


# --- The builder of today's train.py -----------------------------------------------------------------

def _roles(config) -> Dict[str, str]:
  train_split, eval_split = resolve_splits(config)
  roles = {"train": train_split, "eval": eval_split}
  if config.eval_train_split:
    roles["train_eval"] = config.eval_train_split
  return roles


def _input_mode(config, shape: DatasetShape, roles, n_proc: int, device_memory_bytes: Optional[int]) -> str:
  """config.input resolved as inputs.create resolves it: 'auto' = device when the resident splits fit
  input_memory_share of one device's memory."""
  mode = config.input
  if mode not in MODES:
    raise UserError(f"--config.input={mode!r} is not one of {list(MODES)}")
  if mode != "auto":
    return mode
  need = resident_bytes_per_device(shape, roles, n_proc)
  share = float(config.input_memory_share)
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


class AbstractInput(input_api.Input):
  """An input of `mode` with its data left out: the specs and batch functions a run's input gives the jit
  (host: input_api's host batch specs, make_batch the identity; device: the run's own DeviceBatcher over
  resident arrays of the dataset's shape), for compiling without data."""

  def __init__(self, config, mesh, mode: str, shape: DatasetShape, roles, batcher=None, rows=None):
    self.mode, self._config, self._mesh, self._shape = mode, config, mesh, shape
    self._batcher, self._rows = batcher, rows or {}
    self._eval_split = roles["eval"]

  def train_spec(self):
    if self.mode == "host":
      return input_api.host_train_spec(self._config, self._mesh)
    return self._batcher.train_spec(self._rows["train"], self._shape.image_shape)

  def eval_spec(self, split=None):
    if self.mode == "host":
      return input_api.host_eval_spec(self._config, self._mesh)
    return self._batcher.eval_spec(self._rows[split or "eval"], self._shape.image_shape)

  def make_batch(self, args, step):
    return args if self.mode == "host" else self._batcher.make_batch(args, step)

  def make_eval_batch(self, args):
    return args if self.mode == "host" else self._batcher.make_eval_batch(args)

  def train_args(self, step):
    raise NotImplementedError("an abstract input holds no data")

  def eval_args(self, split=None):
    raise NotImplementedError("an abstract input holds no data")

  def describe(self):
    return self.mode


def _device_batcher(config, mesh, model_spec, shape: DatasetShape, steps_per_epoch: int):
  """The run's DeviceBatcher (device_input.py) for this dataset, with normalisation constants that need no
  data (their values do not change the program) and ImageNet's PCA-lighting eigen decomposition."""
  base = base_name_of(str(config.dataset))
  eigen = (np.asarray(IMAGENET_EIGVALS, np.float32), np.asarray(IMAGENET_EIGVECS, np.float32))
  return device_input.DeviceBatcher(
      mesh, batch_size=int(config.batch_size), eval_batch_size=int(config.eval_batch_size),
      image_size=int(config.image_size), steps_per_epoch=steps_per_epoch,
      settings=AugmentSettings.from_config(config.augment), eval_crop=config.eval_crop,
      eval_resize_ratio=float(config.eval_resize_ratio), mean_std=_mean_std(config, base), eigen=eigen,
      dtype=model_spec.compute_dtype)


def build(config, mesh: Mesh, *, device_memory_bytes: Optional[int] = None) -> Dict[str, Program]:
  """The train and eval programs cnn_jax.train compiles for `config` on `mesh` (the module docstring's hook).

  The trainer's own pieces: the specs (cnn_jax.specs), the model, optimiser, schedule and recipe steps
  (cnn_jax.steps), the state by jax.eval_shape of create_train_state, the input of config.input (the device
  input's DeviceBatcher, or the host input's batch specs), and steps.jit_train_step / jit_eval_step.
  """
  config = config.copy_and_resolve_references()
  model_spec, opt, loop = specs.read(config)
  devices = list(mesh.devices.flat)
  n_dev, n_proc = len(devices), len({d.process_index for d in devices})
  for field, value in (("batch_size", loop.batch_size), ("eval_batch_size", loop.eval_batch_size)):
    if value % n_dev or value % n_proc:
      raise UserError(f"--config.{field}={value} must be a positive multiple of the {n_dev} devices"
                      + (f" and {n_proc} processes" if n_proc > 1 else ""))
  models.check_input_size(model_spec.name, model_spec.image_size, **model_spec.kwargs)
  roles = _roles(config)
  shape = dataset_shape(config, roles)
  mode = _input_mode(config, shape, roles, n_proc, device_memory_bytes)
  rows = {role: _process_rows(spec, shape.sizes, role == "train", n_proc)[0] for role, spec in roles.items()}
  steps_per_epoch = input_api.steps_per_epoch(rows["train"], loop.batch_size, n_proc)
  if steps_per_epoch == 0:
    raise UserError(f"a process's part of the train split has {rows['train']} examples, fewer than one batch "
                    f"of {loop.batch_size // n_proc}; lower the batch")
  total_steps = loop.total_steps(steps_per_epoch)
  model = models.get_model(model_spec.name, shape.num_classes, dtype=model_spec.compute_dtype, **model_spec.kwargs)
  schedule = steps_lib.learning_rate_schedule(opt, steps_per_epoch, total_steps)
  tx = steps_lib.make_optimizer(opt, schedule)
  size = model_spec.image_size
  state_shape = jax.eval_shape(functools.partial(
      steps_lib.create_train_state, model, tx, image_shape=(size, size, 3), ema=opt.ema_decay > 0),
      jax.ShapeDtypeStruct((2,), jnp.uint32))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.replicated(mesh)),
                       state_shape)
  step_fn, eval_fn = steps_lib.recipe_steps(opt, loop, schedule)
  batcher = _device_batcher(config, mesh, model_spec, shape, steps_per_epoch) if mode == "device" else None
  inp = AbstractInput(config, mesh, mode, shape, roles, batcher, rows)
  train = steps_lib.jit_train_step(step_fn, inp, mesh)
  evaluate = steps_lib.jit_eval_step(eval_fn, inp, mesh)
  train_args, eval_args = (state, inp.train_spec()), (state, inp.eval_spec())
  # The network's own steps (FLOPs counted on the host, as train.py counts them): the batch make_batch makes.
  train_net = _unsharded(jax.eval_shape(inp.make_batch, inp.train_spec(), state_shape.step))
  eval_net = _unsharded(jax.eval_shape(inp.make_eval_batch, inp.eval_spec()))
  max_batch = rows["train"] * n_proc  # one batch per epoch at most (each process draws from its own part)
  max_eval_batch = _process_rows(roles["eval"], shape.sizes, False, n_proc)[1] * n_proc
  h, w, c = shape.image_shape
  what = (f"{config.dataset} {h}x{w}x{c} ({shape.source}), {n_dev} device{'s' if n_dev > 1 else ''}"
          + (f" in {n_proc} processes" if n_proc > 1 else ""))
  if mode == "host":
    describe, resident = f"host input (tf.data batches put on the mesh), {what}", {"train": 0, "eval": 0}
  else:
    describe = (f"device input (uint8 splits resident on every device, augmentation inside the step), {what}, "
                f"{resident_bytes_per_device(shape, roles, n_proc) / 2**20:,.0f} MiB resident per device")
    resident = {k: resident_bytes_per_device(shape, roles, n_proc, skip=(k,)) for k in ("train", "eval")}
  lowering = lowering_of(devices[0])
  return {
      "train": Program(train, train_args, loop.batch_size, max_batch, (jax.jit(step_fn), (state_shape, train_net)),
                       resident["train"], describe, lowering),
      "eval": Program(evaluate, eval_args, loop.eval_batch_size, max_eval_batch,
                      (jax.jit(eval_fn), (state_shape, eval_net)), resident["eval"], describe, lowering),
  }


def lowering_of(device) -> str:
  """The cnn_jax.ops lowering train.py would trace on `device`'s backend ('gpu', 'tpu', else plain 'xla')."""
  platform = str(getattr(device, "platform", "")).lower()
  return {"cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform, "xla")


def _mean_std(config, base: str):
  """The normalisation constants (their values do not change the program's shapes; 'dataset' statistics,
  which need the data, are stood in for by ImageNet's)."""
  spec = config.normalize
  return stats_lib.mean_std(spec, base, lambda: stats_lib.RgbStatistics(
      mean=stats_lib.IMAGENET_MEAN_STD[0], std=stats_lib.IMAGENET_MEAN_STD[1],
      eigvals=tuple(IMAGENET_EIGVALS), eigvecs=tuple(map(tuple, IMAGENET_EIGVECS)), num_images=0))


def _unsharded(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
