r"""Prepares a tfds dataset offline from local source files (tfds `manual_dir`).

  python -m cnn_jax.data.prepare --dataset=fashion_mnist --manual_dir=/path/to/fashion_mnist \
      --data_dir=~/tensorflow_datasets

The files in manual_dir are exactly those the tfds builder would download (for Fashion-MNIST: the four
original .gz files); tfds reads them from there instead of the network. manual_dir is only read.
"""

import os
import sys

from absl import app
from absl import flags

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "tfds dataset name.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the dataset's source files.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir to prepare into (default: tfds's).")


def prepare(dataset: str, manual_dir: str, data_dir=None) -> str:
  """Runs the builder's download_and_prepare reading `manual_dir`; returns the prepared data_dir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
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


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # tfds's INFO lines and bars only with --verbosity
  print(f"preparing {_DATASET.value} from {_MANUAL_DIR.value} (about half a minute for Fashion-MNIST)",
        flush=True)
  try:
    path = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value)
  except (FileNotFoundError, Exception) as e:  # pylint: disable=broad-except
    print(f"error: preparing {_DATASET.value} failed: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  print(f"prepared {_DATASET.value} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
