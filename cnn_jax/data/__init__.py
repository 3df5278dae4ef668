"""Where a run's batches come from. Two input modes implement one interface (`inputs.py`):

  host    tf.data on the host CPU, for data of any size:
            datasets.py   tfds datasets by name (prepared offline from a manual dir) and image folders
            augment.py    the augmentation as TensorFlow ops
            pipeline.py   the tf.data train / eval pipelines (numpy batches out)
            host_input.py the mode: batches put on the mesh, fed to the jitted step
  device  the whole uint8 split resident on the accelerators, for data that fits (no TensorFlow at run time):
            arrays.py        the array cache: each split decoded once to .npy files, read with numpy only
            augment_jax.py   the same augmentation as JAX ops
            device_input.py  the mode: gather + augment inside the same jit as the train step
  shared  augment_spec.py (what the augmentation is: settings, checks, constants), stats.py (normalisation
          and PCA-lighting statistics), info.py (DatasetInfo, split names), prepare.py (offline preparation)

Importing `cnn_jax.data` loads no TensorFlow; the host pipeline's entry points load it on first use:

  info = get_dataset_info(config)          # DatasetInfo(name, num_classes, num_train, num_eval, ...)
  train = create_train_iter(config, seed=0, start_step=0, process_index=0, process_count=1)
  batch = next(train)                       # {'image': float32 [B, S, S, 3], 'label': int32 [B]}
  for batch in create_eval_iter(config):    # + 'mask': bool [B]; padding has mask False
    ...

Config fields read: dataset, data_dir, manual_dir, download, train_split, eval_split, image_size,
batch_size, eval_batch_size, shuffle_buffer, cache, cache_max_gb, cache_dir, augment (see
augment_spec.AugmentSettings), normalize, eval_crop, eval_resize_ratio, deterministic, data_threads; the
input mode: input, input_memory_share, array_cache_dir, array_cache_res.
"""

from cnn_jax.data.info import DatasetInfo

_PIPELINE = ("create_train_iter", "create_eval_iter", "num_eval_batches")


def __getattr__(name):
  # Lazy, so that `import cnn_jax.data` does not load TensorFlow (a device-input run never does).
  if name in _PIPELINE:
    from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  if name == "get_dataset_info":
    from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
    return datasets.get_dataset_info
  raise AttributeError(f"module 'cnn_jax.data' has no attribute {name!r}")


__all__ = ["DatasetInfo", "get_dataset_info", "create_train_iter", "create_eval_iter", "num_eval_batches"]
