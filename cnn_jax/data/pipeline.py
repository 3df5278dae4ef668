"""tf.data pipelines with numpy out: train (infinite, deterministic, resumable) and eval (finite, masked).

Train, per process: read this process's slice of the train split (tfds.even_splits, remainder dropped)
-> number the examples -> [decode + cache in memory if small] -> per epoch e: shuffle with a seed drawn
from (seed, process, e), drop the epoch's last partial batch -> skip to `start_step` -> decode, crop,
flip, colour (seeded by (seed, process, e, example index)) -> batch -> prefetch.

Because every random choice is a function of (seed, process, epoch, example), a run resumed at step k
yields exactly the batches an uninterrupted run yields from step k on: whole epochs are skipped by
arithmetic, the rest with `skip` before any image is augmented.

Eval, per process: its slice (tfds.even_splits, nothing dropped) -> decode, centre crop (or 10 crops) ->
padded with masked zeros so every process yields `num_eval_batches` batches (multi-host eval needs
equal counts).
"""

import logging
import math
import os
from typing import Dict, Iterator, Optional

import numpy as np
from cnn_jax.data.tf_runtime import tf

from cnn_jax.data import augment
from cnn_jax.data import datasets
from cnn_jax.errors import UserError

Batch = Dict[str, np.ndarray]



# --- Config helpers ------------------------------------------------------------------------------

def _check_process(process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} must be in [0, process_count={process_count})")


def local_batch_size(config, field: str, process_count: int) -> int:
  """config.<field> // process_count; UserError unless it divides evenly and is positive."""
  global_batch = int(config[field] or 0)
  if global_batch <= 0 or global_batch % process_count:
    raise UserError(f"--config.{field}={global_batch} must be a positive multiple of the process count "
                    f"({process_count})")
  return global_batch // process_count


def image_size(config) -> int:
  """config.image_size as a positive int."""
  size = config.image_size
  if not size or int(size) <= 0:
    raise UserError(f"--config.image_size={size!r} must be a positive number of pixels (e.g. 224)")
  return int(size)


def _options(config) -> tf.data.Options:
  options = tf.data.Options()
  # Order-preserving parallel map: required for identical batches from one seed.
  options.deterministic = bool(config.deterministic)
  # A private pool sized to the cores keeps tf.data from competing with TF's global pools.
  options.threading.private_threadpool_size = int(config.data_threads or os.cpu_count() or 1)
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = True
  return options


def _use_cache(config, source: datasets.Source, split: str, process_index: int, process_count: int,
               drop_remainder: bool) -> bool:
  """config.cache: True caches decoded images when this slice is small (< config.cache_max_gb)."""
  if not config.cache:
    return False
  size = source.decoded_bytes(split, process_index, process_count, drop_remainder)
  limit = float(config.cache_max_gb) * 2**30
  if size is None or size > limit:
    logging.info("not caching %s/%s in memory (estimated %s bytes decoded)", source.name, split, size)
    return False
  return True


# --- Decoding ------------------------------------------------------------------------------------

def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, channels]."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def decode_window(encoded: tf.Tensor, channels: int, window_fn) -> tf.Tensor:
  """Decodes only the window `window_fn(shape)` of the image: uint8 [h, w, channels].

  For JPEGs only the window's blocks are decompressed (tf.image.decode_and_crop_jpeg); other formats
  are decoded whole and cropped. window_fn maps an [H, W, C] shape to (offset_y, offset_x, h, w).
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=channels)

  def other():
    image = decode(encoded, channels)
    return augment.crop(image, window_fn(tf.shape(image)))

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, channels])
  return image


def _to_model_input(image: tf.Tensor, mean_std) -> tf.Tensor:
  """float32 in [0, 255], 1 or 3 channels -> float32 RGB in [0, 1], normalised if mean_std is given."""
  image = augment.to_rgb(image / 255.0)
  return image if mean_std is None else augment.normalize(image, *mean_std)


def train_preprocess_fn(settings: augment.AugmentSettings, size: int, channels: int, decoded: bool,
                        eigen=(augment.IMAGENET_EIGVALS, augment.IMAGENET_EIGVECS),
                        mean_std=None, color: bool = True):
  """Returns fn(image, seed [2]) -> float32 [size, size, 3], the training augmentation of one image.

  image: encoded bytes (decoded=False) or uint8 [H, W, channels]. color=False stops after the crop
  (for pictures of what the crop does).
  """
  def fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    crop_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if settings.crop == "pad_random_crop":
      image = image if decoded else decode(image, channels)
      image = augment.resize(augment.pad_random_crop(image, crop_seed, settings.pad), size)
    else:
      window_fn = lambda shape: augment.train_crop_window(settings, shape, crop_seed)
      if decoded:
        image = augment.crop_and_resize(image, window_fn(tf.shape(image)), size)
      else:
        image = augment.resize(decode_window(image, channels, window_fn), size)
    image = augment.to_rgb(image / 255.0)
    if color:
      image = augment.train_color_ops(image, color_seed, settings, *eigen)
    return image if mean_std is None else augment.normalize(image, *mean_std)

  return fn


def eval_preprocess_fn(eval_crop: str, resize_ratio: float, size: int, channels: int, mean_std=None):
  """Returns fn(encoded bytes) -> float32 [size, size, 3], or [10, size, size, 3] for 'ten_crop'.

  'center': centre square of side min(H, W) / resize_ratio resized to size (= resize the shorter side to
  resize_ratio * size, centre crop); 'resize': the whole image squeezed to size x size; 'ten_crop':
  augment.ten_crop (the eval step averages logits over the crop axis).
  """
  if eval_crop not in augment.EVAL_CROPS:
    raise UserError(f"--config.eval_crop={eval_crop!r} is not one of {list(augment.EVAL_CROPS)}")
  if resize_ratio < 1:
    raise UserError(f"--config.eval_resize_ratio={resize_ratio} must be >= 1 (e.g. 256/224)")

  def fn(encoded: tf.Tensor) -> tf.Tensor:
    if eval_crop == "ten_crop":
      image = augment.ten_crop(decode(encoded, channels), size, resize_ratio)
    elif eval_crop == "center":
      window_fn = lambda shape: augment.center_crop_window(shape, resize_ratio)
      image = augment.resize(decode_window(encoded, channels, window_fn), size)
    else:
      image = augment.resize(decode(encoded, channels), size)
    return _to_model_input(image, mean_std)

  return fn


def numpy_batches(ds: tf.data.Dataset, source: datasets.Source, split: str) -> Iterator[Batch]:
  """Iterates `ds` as numpy dicts; a damaged image becomes a UserError naming it where possible."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
      raise UserError(source.describe_decode_error(split, e)) from e
    yield batch


# --- Train ---------------------------------------------------------------------------------------

def create_train_iter(config, *, seed: int, start_step: int = 0, process_index: int = 0,
                      process_count: int = 1) -> Iterator[Batch]:
  """Infinite iterator of this process's training batches.

  Yields {'image': float32 [B_local, S, S, 3] (normalised), 'label': int32 [B_local]} with
  B_local = config.batch_size // process_count and S = config.image_size. The same (config, seed,
  process) always gives the same batches; `start_step=k` starts at the k-th batch of that sequence.
  Each epoch visits this process's examples once in a new order; the epoch's last partial batch is dropped.
  """
  _check_process(process_index, process_count)
  if start_step < 0:
    raise UserError(f"start_step={start_step} must be >= 0")
  batch_size = local_batch_size(config, "batch_size", process_count)
  size = image_size(config)
  settings = augment.AugmentSettings.from_config(config.augment)
  source = datasets.get_source(config)
  split, _ = datasets.resolve_splits(config, source)

  num_examples = source.num_examples(split, process_index, process_count, drop_remainder=True)
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise UserError(f"this process's part of {source.name}/{split} has {num_examples} examples, fewer than "
                    f"one batch of {batch_size}; lower --config.batch_size")
  cached = _use_cache(config, source, split, process_index, process_count, drop_remainder=True)
  eigen = (datasets.lighting_eigen(source, split, config.cache_dir) if settings.pca_lighting
           else (augment.IMAGENET_EIGVALS, augment.IMAGENET_EIGVECS))
  preprocess = train_preprocess_fn(settings, size, source.channels, decoded=cached, eigen=eigen,
                                   mean_std=datasets.mean_std(config, source, split))

  examples = source.read(split, process_index, process_count, drop_remainder=True,
                         try_autocache=not cached)
  # The example's position in this process's slice: with the epoch it seeds the augmentation.
  examples = examples.enumerate().map(lambda i, ex: dict(ex, index=i))
  if cached:
    examples = examples.map(lambda ex: dict(ex, image=decode(ex["image"], source.channels)),
                            num_parallel_calls=tf.data.AUTOTUNE).cache()

  run_key = tf.constant([seed, process_index], tf.int64)
  shuffle_buffer = max(1, min(int(config.shuffle_buffer), num_examples))
  examples_per_epoch = steps_per_epoch * batch_size

  def epoch_examples(epoch):
    epoch_key = tf.random.experimental.stateless_fold_in(run_key, epoch)
    shuffle_seed = tf.random.stateless_uniform([], epoch_key, minval=None, maxval=None, dtype=tf.int64)
    ds = examples.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    # filter (not take) reads the epoch to its end, which completes the in-memory cache.
    ds = ds.enumerate().filter(lambda position, ex: position < examples_per_epoch)
    return ds.map(lambda position, ex: dict(ex, epoch=epoch))

  def augment_example(ex):
    example_key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(run_key, ex["epoch"]), ex["index"])
    return {"image": preprocess(ex["image"], example_key), "label": tf.cast(ex["label"], tf.int32)}

  start_epoch, step_in_epoch = divmod(int(start_step), steps_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_examples)
  ds = ds.skip(step_in_epoch * batch_size)
  ds = ds.map(augment_example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return numpy_batches(ds.with_options(_options(config)), source, split)


# --- Eval ----------------------------------------------------------------------------------------

def num_eval_batches(config, process_count: int = 1, split: Optional[str] = None) -> int:
  """Batches every process yields from create_eval_iter (the same on all processes)."""
  batch_size = local_batch_size(config, "eval_batch_size", process_count)
  source = datasets.get_source(config)
  split = split or datasets.resolve_splits(config, source)[1]
  return _num_eval_batches(source, split, batch_size, process_count)


def _num_eval_batches(source, split, batch_size, process_count) -> int:
  # tfds.even_splits gives the first processes one example more: process 0 has the most.
  return math.ceil(source.num_examples(split, 0, process_count) / batch_size)


def create_eval_iter(config, *, process_index: int = 0, process_count: int = 1,
                     split: Optional[str] = None) -> Iterator[Batch]:
  """Finite iterator over this process's part of the eval split, padded to equal length on all processes.

  `split` evaluates another split (tfds slicing allowed, e.g. 'train[:10000]') with the same eval
  preprocessing: the un-augmented training accuracy of the overfitting ablations.

  Yields {'image': float32 [B_local, S, S, 3] (or [B_local, 10, S, S, 3] with eval_crop='ten_crop':
  average the logits over axis 1), 'label': int32 [B_local], 'mask': bool [B_local]} with
  B_local = config.eval_batch_size // process_count; padding examples are zeros with mask False. Over all
  processes every example of the split appears exactly once with mask True.
  """
  _check_process(process_index, process_count)
  batch_size = local_batch_size(config, "eval_batch_size", process_count)
  size = image_size(config)
  source = datasets.get_source(config)
  train_split, eval_split = datasets.resolve_splits(config, source)
  split = split or eval_split
  eval_crop = config.eval_crop
  preprocess = eval_preprocess_fn(eval_crop, float(config.eval_resize_ratio), size,
                                  source.channels, datasets.mean_std(config, source, train_split))

  num_examples = source.num_examples(split, process_index, process_count)
  num_batches = _num_eval_batches(source, split, batch_size, process_count)
  ds = source.read(split, process_index, process_count).take(num_examples)
  ds = ds.map(lambda ex: {"image": preprocess(ex["image"]), "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)}, num_parallel_calls=tf.data.AUTOTUNE)
  image_shape = [10, size, size, 3] if eval_crop == "ten_crop" else [size, size, 3]
  padding = {"image": tf.zeros(image_shape, tf.float32), "label": tf.constant(0, tf.int32),
             "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_batches * batch_size - num_examples))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return numpy_batches(ds.with_options(_options(config)), source, split)
