"""A source of examples: one dataset's info and per-process slices of its splits, undecoded.

`cnn_jax.data.datasets` has the tfds sources and picks one from a config; `cnn_jax.data.folders` has image
folders. Decoding and augmentation happen in `pipeline.py`.
"""

from typing import Optional

from cnn_jax.data.tf_runtime import tf
from cnn_jax.data.info import DatasetInfo


class Source:
  """One dataset: its info and per-process slices of its splits as undecoded examples."""

  name: str
  channels: int  # channels to decode to: 1 for grayscale datasets (tiled to RGB later), else 3

  def info(self, train_split: str, eval_split: str) -> DatasetInfo:
    raise NotImplementedError

  def num_examples(self, split: str, process_index: int = 0, process_count: int = 1,
                   drop_remainder: bool = False) -> int:
    """Examples in this process's slice of `split` (tfds.even_splits semantics)."""
    raise NotImplementedError

  def read(self, split: str, process_index: int = 0, process_count: int = 1,
           drop_remainder: bool = False, try_autocache: bool = True) -> tf.data.Dataset:
    """This process's slice of `split`: {'image': tf.string encoded image, 'label': tf.int64}, fixed order."""
    raise NotImplementedError

  def describe_decode_error(self, split: str, error: Exception) -> str:
    """One line for a UserError when decoding an image of `split` failed."""
    raise NotImplementedError

  def decoded_bytes(self, split: str, process_index: int = 0, process_count: int = 1,
                    drop_remainder: bool = False) -> Optional[int]:
    """Estimated bytes of this slice once decoded to uint8 (None = unknown)."""
    raise NotImplementedError


def first_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:300]
