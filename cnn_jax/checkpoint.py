"""Orbax checkpoints of the train state plus a small JSON of run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` holds params, optimiser state, BatchNorm
statistics, step and the base RNG key; `meta` holds the model/dataset identity, the pipeline position (the
step: the input pipeline is a pure function of (seed, step), see cnn_jax.data) and the config.
The last `keep` checkpoints are kept, plus the best by eval top-1.
"""

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from cnn_jax.errors import UserError

# Fields that must match for a checkpoint to be resumed by a config.
IDENTITY_FIELDS = ("model", "num_classes", "model_kwargs", "image_size")


def make_manager(workdir: str, keep: int = 3, async_save: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps and the best by eval `top1`."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=lambda m: m["top1"], reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "meta"))


def state_to_tree(state) -> Dict[str, Any]:
  """The saved part of a TrainState as a plain dict (apply_fn and tx are code, not data)."""
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
  if state.batch_stats is not None:
    tree["batch_stats"] = state.batch_stats
  return tree


def tree_to_state(state, tree: Dict[str, Any]):
  """Puts a restored dict back into `state` (the template it was restored against)."""
  return state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                       rng=tree["rng"], batch_stats=tree.get("batch_stats"))


def save(manager: ocp.CheckpointManager, state, meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]] = None, force: bool = True) -> None:
  """Saves `state` at its step (asynchronously when the manager is async)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                                             meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=force)


def check_compatible(meta: Dict[str, Any], expected: Dict[str, Any], workdir: str) -> None:
  """Raises UserError if a checkpoint's identity differs from this run's config."""
  diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {expected.get(k)!r}"
           for k in IDENTITY_FIELDS if k in expected and _canon(meta.get(k)) != _canon(expected.get(k))]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds checkpoints of a different run ({'; '.join(diffs)}); "
        "use a new --workdir to start fresh (the existing checkpoints were left untouched)")


def _canon(x):
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def restore_latest(manager: ocp.CheckpointManager, state, expected: Dict[str, Any],
                   workdir: str) -> Tuple[Any, Optional[Dict[str, Any]]]:
  """Restores the newest complete checkpoint into `state`; returns (state, meta) or (state, None).

  A checkpoint that fails to read (truncated or missing files) is skipped with a warning and the previous
  one is tried; nothing is deleted. The identity in `meta` must match `expected` (see IDENTITY_FIELDS).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(state))
  for step in steps:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                      step, workdir, type(e).__name__, str(e).splitlines()[0][:200])
      continue
    check_compatible(meta, expected, workdir)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint %d in %s is damaged (%s: %s); trying the previous one",
                      step, workdir, type(e).__name__, str(e).splitlines()[0][:200])
      continue
    return tree_to_state(state, restored["state"]), meta
  return state, None


def init_from(state, path: str):
  """Starts from another run's weights (fine-tuning).

  `path` is a workdir (its latest checkpoint is used) or a `checkpoints/<step>` directory. Parameters and
  BatchNorm statistics whose path and shape match are copied; the rest (e.g. a classifier head for a
  different class count) keep their fresh initialisation. The optimiser state and step start anew.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.basename(path).isdigit():
    directory, step = os.path.dirname(path), int(os.path.basename(path))
  else:
    directory, step = path, None
  if not os.path.isdir(directory):
    raise UserError(f"--config.init_from={path!r}: no such checkpoint directory")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise UserError(f"--config.init_from={path!r} holds no complete checkpoint")
  source = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

  copied, kept = [], []

  def merge(tree, src, prefix):
    if src is None:
      return tree
    flat_src = {"/".join(map(str, k)): v for k, v in _flatten(src).items()}
    out = {}
    for k, v in _flatten(tree).items():
      key = "/".join(map(str, k))
      if key in flat_src and tuple(flat_src[key].shape) == tuple(v.shape):
        out[k] = jax.device_put(jax.numpy.asarray(flat_src[key], v.dtype), v.sharding)
        copied.append(prefix + key)
      else:
        out[k] = v
        kept.append(prefix + key)
    return _unflatten(out)

  params = merge(state.params, source.get("params"), "params/")
  batch_stats = state.batch_stats
  if batch_stats is not None:
    batch_stats = merge(batch_stats, source.get("batch_stats"), "batch_stats/")
  if not copied:
    raise UserError(f"--config.init_from={path!r}: no parameter matches this model; is it the same family?")
  logging.info("init_from %s step %d: copied %d arrays, kept fresh init for %s", directory, step,
               len(copied), kept)
  print(f"Initialised from {directory} step {step}: {len(copied)} arrays copied"
        f"{', fresh: ' + ', '.join(kept) if kept else ''}", flush=True)
  return state.replace(params=params, batch_stats=batch_stats)


def _flatten(tree):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree)


def _unflatten(flat):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat)
