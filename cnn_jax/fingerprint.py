"""A run's fingerprint: the RECIPE, identical across runs being compared, and the ARCHITECTURE, per run.

Recipe (``RECIPE_FIELDS``): the input pipeline (dataset, splits, resolution, augmentation, normalisation,
eval crops, batch) and the training recipe (optimiser, schedule, length, seed, precision). It is what
``configs/common.py`` shares between families; ``report.py`` refuses to compare runs whose recipes differ
(apart from the seed and the fields a sweep studies). The hash covers the recipe only, so two runs with
equal hashes differ only in the network.

Architecture (``architecture``): the model and every one of its fields with the family's defaults filled
in (activation, dropout, width, geometry, family switches, weight init; ``cnn_jax.models.architecture``).
What a paper fixes for its network (LeNet: no dropout; AlexNet/VGG: 0.5 in the FC head; NiN: 0.5) lives
here, so it may differ between families and is recorded with each run, never compared as recipe.

Not fingerprinted: where files live, how often the loop logs or saves.
"""

import hashlib
import json
from typing import Any, Dict

# Config fields that define the pipeline and recipe (dotted paths; missing ones count as None).
RECIPE_FIELDS = (
    "dataset", "train_split", "eval_split", "image_size", "batch_size", "eval_batch_size",
    "shuffle_buffer", "deterministic", "augment", "normalize", "eval_crop", "eval_resize_ratio", "eval_flip",
    "optimizer", "schedule", "num_epochs", "num_train_steps", "seed", "dtype", "input",
)
FINGERPRINT_FIELDS = RECIPE_FIELDS  # the name older code and tests use
# Config fields that define the network: compared per family, allowed to differ between families.
ARCHITECTURE_FIELDS = ("model", "model_kwargs")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if node is None:
      return None
    node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
  if hasattr(node, "to_dict"):
    node = node.to_dict()
  return node


def _json(value):
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint_fields(config) -> Dict[str, Any]:
  """{field: JSON-normalised value} for every RECIPE_FIELDS entry."""
  return {k: _json(_get(config, k)) for k in RECIPE_FIELDS}


def architecture(config) -> Dict[str, Any]:
  """The network of `config`: cnn_jax.models.architecture(model, **model_kwargs), the family's defaults
  (e.g. its paper's dropout and the weight init) filled in; {'model': name, ...} for an unknown model."""
  from cnn_jax import models  # pylint: disable=g-import-not-at-top  (flax: only when a run records it)
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  kwargs = _get(config, "model_kwargs") or {}
  try:
    return _json(models.architecture(config.get("model"), **kwargs))
  except (UserError, TypeError):
    return _json({"model": config.get("model"), **kwargs})


def fingerprint(config) -> Dict[str, Any]:
  """{'hash': 16 hex chars over the recipe, 'fields': the recipe fields} of `config`."""
  fields = fingerprint_fields(config)
  blob = json.dumps(fields, sort_keys=True).encode()
  return {"hash": hashlib.sha256(blob).hexdigest()[:16], "fields": fields}


def run_fingerprint(config_hash: str, lineage: Dict[str, Any]) -> str:
  """The fingerprint a run reports: its config's, or, once the config changed mid-run, a different one
  (so report.py does not compare the run as if it had used the new values throughout)."""
  changes = lineage.get("config_changes") or []
  if not changes:
    return config_hash
  blob = json.dumps([config_hash, changes], sort_keys=True, default=str).encode()
  return "changed-" + hashlib.sha256(blob).hexdigest()[:16]
