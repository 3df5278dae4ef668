"""The input pipeline: tfds datasets or image folders -> augmented numpy batches (never imports jax/flax).

  info = get_dataset_info(config)          # DatasetInfo(name, num_classes, num_train, num_eval, ...)
  train = create_train_iter(config, seed=0, start_step=0, process_index=0, process_count=1)
  batch = next(train)                       # {'image': float32 [B, S, S, 3], 'label': int32 [B]}
  for batch in create_eval_iter(config):    # + 'mask': bool [B]; padding has mask False
    ...

Config fields read: dataset, data_dir, manual_dir, download, train_split, eval_split, image_size,
batch_size, eval_batch_size, shuffle_buffer, cache, cache_max_gb, cache_dir, augment (see
augment.AugmentSettings), normalize, eval_crop, eval_resize_ratio, deterministic, data_threads.
"""

import tensorflow as tf

# TF must not claim the accelerators JAX trains on; this has to run before TF touches any device.
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised by someone else: nothing we can change
  pass

# pylint: disable=wrong-import-position
from cnn_jax.data.datasets import DatasetInfo, get_dataset_info
from cnn_jax.data.pipeline import create_eval_iter, create_train_iter, num_eval_batches

__all__ = ["DatasetInfo", "get_dataset_info", "create_train_iter", "create_eval_iter", "num_eval_batches"]
