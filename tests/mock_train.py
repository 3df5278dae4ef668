"""Runs train.py inside `tfds.testing.mock_data` (for end-to-end tests of datasets we cannot download).

  python tests/mock_train.py NUM_EXAMPLES train.py-flags...
"""

import os
import runpy
import sys

import tensorflow_datasets as tfds
from tensorflow_datasets.testing import test_utils as tfds_test_utils


class _RealFs:
  """Stands in for tfds's MockFs, which redirects *every* thread's file access to a temp dir while a
  mocked `as_dataset` runs; Orbax's background checkpoint threads then lose their files. The mock only
  needs the data dir to exist, so create it for real."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_file(self, path, content=""):
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "a") as f:
      f.write(content)


tfds_test_utils.MockFs = _RealFs

if __name__ == "__main__":
  num_examples = int(sys.argv[1])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  sys.argv = [os.path.join(repo, "train.py")] + sys.argv[2:]
  with tfds.testing.mock_data(num_examples=num_examples):
    runpy.run_path(sys.argv[0], run_name="__main__")
