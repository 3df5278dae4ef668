"""Where a run's batches come from. Two input modes implement one contract (`input_api.py`), chosen by
`inputs.create(config, mesh)`:

  host    tf.data on the host CPU, for data of any size:
            datasets.py   tfds datasets by name (prepared offline from a manual dir) and image folders
            augment.py    the augmentation as TensorFlow ops
            pipeline.py   the tf.data train / eval pipelines (numpy batches out):
                            create_train_iter(config, seed=0, start_step=0, process_index=0, process_count=1)
                            create_eval_iter(config, process_index=0, process_count=1, split=None)
            host_input.py the mode: batches put on the mesh
  device  the whole uint8 split resident on the accelerators, for data that fits (no TensorFlow at run time):
            arrays.py        the array cache: each split decoded once to .npy files, read with numpy only
            augment_jax.py   the same augmentation as JAX ops
            device_input.py  the mode: gather + augment inside the same jit as the train step
  shared  augment_spec.py (what the augmentation is: settings, checks, constants), stats.py (normalisation
          and PCA-lighting statistics), info.py (DatasetInfo, split names), prepare.py (offline preparation)

Importing `cnn_jax.data`, `inputs`, `input_api` or the device side loads no TensorFlow; the host side does.

Config fields read (declared in configs/common.py): dataset, data_dir, manual_dir, download, train_split,
eval_split, eval_train_split, image_size, batch_size, eval_batch_size, shuffle_buffer, cache, cache_max_gb,
cache_dir, augment (see augment_spec.AugmentSettings), normalize, eval_crop, eval_resize_ratio, deterministic,
data_threads, seed, dtype; the input mode: input, input_memory_share, array_cache_dir, array_cache_res.
"""

from cnn_jax.data.info import DatasetInfo

__all__ = ["DatasetInfo"]
