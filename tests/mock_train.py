"""Runs train.py inside `tfds.testing.mock_data` (for end-to-end tests of datasets we cannot download).

  python tests/mock_train.py NUM_EXAMPLES train.py-flags...
"""

import os
import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
  num_examples = int(sys.argv[1])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  sys.argv = [os.path.join(repo, "train.py")] + sys.argv[2:]
  with tfds.testing.mock_data(num_examples=num_examples):
    runpy.run_path(sys.argv[0], run_name="__main__")
