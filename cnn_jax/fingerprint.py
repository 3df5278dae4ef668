"""A fingerprint of everything that must be identical across runs being compared.

The input pipeline (dataset, splits, resolution, augmentation, eval crops, batch) and the training recipe
(optimiser, schedule, length, seed, precision) — but not the model, nor where files live or how often the
loop logs. Two runs with equal fingerprints differ only in the network.
"""

import hashlib
import json
from typing import Any, Dict

# Config fields that define the pipeline and recipe (dotted paths; missing ones count as None).
FINGERPRINT_FIELDS = (
    "dataset", "train_split", "eval_split", "image_size", "batch_size", "eval_batch_size",
    "shuffle_buffer", "augment", "normalize", "eval_crop", "eval_resize_ratio",
    "optimizer", "schedule", "num_epochs", "num_train_steps", "seed", "dtype", "input",
)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if node is None:
      return None
    node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
  if hasattr(node, "to_dict"):
    node = node.to_dict()
  return node


def fingerprint_fields(config) -> Dict[str, Any]:
  """{field: JSON-normalised value} for every FINGERPRINT_FIELDS entry."""
  return {k: json.loads(json.dumps(_get(config, k), sort_keys=True, default=str))
          for k in FINGERPRINT_FIELDS}


def fingerprint(config) -> Dict[str, Any]:
  """{'hash': 16 hex chars, 'fields': {...}} of the pipeline + recipe of `config`."""
  fields = fingerprint_fields(config)
  blob = json.dumps(fields, sort_keys=True).encode()
  return {"hash": hashlib.sha256(blob).hexdigest()[:16], "fields": fields}
