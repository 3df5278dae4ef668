"""What the training loop needs to know about a dataset (TensorFlow-free: shared by both input modes)."""

import dataclasses
from typing import Optional, Tuple

from cnn_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the loop needs to know about a dataset.

  name: config.dataset; num_train / num_eval: examples in the train / eval split (all processes);
  class_names: label index -> name; image_shape: raw (H, W, C) with None for sizes that vary.
  """
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  class_names: Tuple[str, ...]
  image_shape: Tuple[Optional[int], Optional[int], Optional[int]]

  def __post_init__(self):
    if self.num_classes < 2:  # a one-class folder would "train" to top-1 1.0 at loss 0
      names = f" ({', '.join(self.class_names)})" if self.class_names else ""
      raise UserError(f"{self.name} has {self.num_classes} class{names}: a classifier needs at least 2 (for an "
                      "image folder: one sub-folder per class)")


FOLDER_PREFIX = "folder:"
HOLDOUT_PREFIX = "holdout:"
HOLDOUT_SPLIT = "holdout"  # the held-out part of the train folder, when eval_split = 'holdout:10%'

# Datasets whose evaluation split is not called 'test' (config.eval_split = 'auto').
EVAL_SPLITS = {"imagenet2012": "validation", "imagenette": "validation", "imagewang": "validation",
               "imagenet_resized": "validation", "imagenet_v2": "test"}


def base_name_of(dataset: str) -> str:
  """'imagenette/320px-v2' -> 'imagenette'; 'folder:/x' -> 'folder'."""
  if dataset.startswith(FOLDER_PREFIX):
    return "folder"
  return dataset.split("/")[0].split(":")[0]


def resolve_splits(config, folder_splits=None) -> Tuple[str, str]:
  """(train_split, eval_split) of a config; eval 'auto' -> 'test', 'validation' for ImageNet-like tfds
  datasets, or for image folders (`folder_splits`: their split folder names) test/val/validation."""
  train_split = config.train_split or "train"
  if train_split == "auto":
    train_split = "train"
  eval_split = config.eval_split or "auto"
  if folder_splits is not None and parse_holdout(eval_split):
    return train_split, HOLDOUT_SPLIT
  if eval_split == "auto":
    if folder_splits is not None:
      eval_split = next((s for s in ("test", "val", "validation") if s in folder_splits), "test")
    else:
      eval_split = EVAL_SPLITS.get(base_name_of(str(config.dataset)), "test")
  return train_split, eval_split


def parse_holdout(eval_split: Optional[str]) -> Optional[float]:
  """'holdout:10%' -> 0.1, 'holdout:0.2' -> 0.2, anything else -> None; UserError for a bad fraction."""
  if not eval_split or not str(eval_split).startswith(HOLDOUT_PREFIX):
    return None
  text = str(eval_split)[len(HOLDOUT_PREFIX):].strip()
  try:
    fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction < 1:
    raise UserError(f"--config.eval_split={eval_split!r}: the hold-out must be a fraction of the train folder "
                    "in (0, 1) such as holdout:10% or holdout:0.1")
  return fraction
