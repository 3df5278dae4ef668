r"""Prepares a tfds dataset offline from local source files (tfds `manual_dir`), and its array cache.

  python -m cnn_jax.data.prepare --dataset=fashion_mnist --manual_dir=/path/to/fashion_mnist \
      --data_dir=~/tensorflow_datasets
  python -m cnn_jax.data.prepare --dataset=fashion_mnist --arrays          # + the uint8 array cache
  python -m cnn_jax.data.prepare --dataset=folder:/data/pets --arrays --array_cache_res=146

The files in manual_dir are exactly those the tfds builder would download (for Fashion-MNIST: the four
original .gz files); tfds reads them from there instead of the network. manual_dir is only read.
--arrays also writes every split as uint8 .npy arrays (cnn_jax/data/arrays.py), which the device-resident
input reads with numpy alone: copy that folder (--array_cache_dir) to a machine without TensorFlow and
train there with --config.input=device --config.array_cache_dir=<it>.
"""

import os
import sys

from absl import app
from absl import flags

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "tfds dataset name.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the dataset's source files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir to prepare into (default: tfds's).")
_ARRAYS = flags.DEFINE_boolean("arrays", False, "Also write the array cache of every split (device input).")
_ARRAY_CACHE_DIR = flags.DEFINE_string("array_cache_dir", None,
                                       "Where the array cache goes (default: beside the tfds data).")
_ARRAY_CACHE_RES = flags.DEFINE_integer("array_cache_res", 256,
                                        "Side of cached images for datasets of varying image size.")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to cache (default: all of the dataset's).")


def prepare(dataset: str, manual_dir: str, data_dir=None) -> str:
  """Runs the builder's download_and_prepare reading `manual_dir`; returns the prepared data_dir."""
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  if not manual_dir or not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"--manual_dir={manual_dir!r} is not a folder; point it at the source files")
  builder = tfds.builder(dataset, data_dir=data_dir)
  # Reading only: the files are taken from manual_dir, tfds writes the prepared records under data_dir.
  with datasets.quiet_preparation(builder):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.path.abspath(manual_dir),
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder.data_dir


def write_arrays(dataset: str, data_dir=None, manual_dir=None, array_cache_dir=None, resolution: int = 256,
                 splits=None):
  """Writes (or checks) the array cache of `splits` (default: all) of `dataset`; returns {split: path}."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import arrays  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, manual_dir=manual_dir, download=False,
      array_cache_dir=array_cache_dir, array_cache_res=resolution, image_size=224))
  source = datasets.get_source(config)
  if splits is None:
    splits = sorted(source.splits) if isinstance(source, datasets.FolderSource) else \
        sorted(source.builder.info.splits)
  raw = source.info(splits[0], splits[0]).image_shape
  res = arrays.resolution_for(config, all(isinstance(d, int) for d in raw))
  return {split: arrays.get_split(config, split, res).path for split in splits}


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # tfds's INFO lines and bars only with --verbosity
  if _MANUAL_DIR.value:
    print(f"preparing {_DATASET.value} from {_MANUAL_DIR.value} (about half a minute for Fashion-MNIST)",
          flush=True)
  try:
    if not _DATASET.value.startswith("folder:") and (_MANUAL_DIR.value or not _ARRAYS.value):
      path = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value)
      print(f"prepared {_DATASET.value} in {path}")
    if _ARRAYS.value:
      written = write_arrays(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value, _ARRAY_CACHE_DIR.value,
                             _ARRAY_CACHE_RES.value, _SPLITS.value)
      for split, path in written.items():
        print(f"array cache {_DATASET.value}/{split}: {path}")
  except (FileNotFoundError, UserError, Exception) as e:  # pylint: disable=broad-except
    print(f"error: preparing {_DATASET.value} failed: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
