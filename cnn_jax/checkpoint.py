"""Orbax checkpoints of the train state plus a small JSON of run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` holds params, optimiser state, BatchNorm
statistics, step and the base RNG key (tensorstore/OCDBT arrays); `meta` is JSON: the model/dataset identity,
the pipeline position (the next step: the input pipeline is a pure function of (seed, step), see
cnn_jax.data), the best eval so far, and the config. Nothing is ever unpickled.

Kept: the last `keep` checkpoints plus the best by eval top-1 (Orbax preservation policies).
Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a process
killed mid-save leaves only a temporary directory, which the next start removes. A committed checkpoint that
fails to read later (truncated or deleted files) is skipped with a warning and moved to
`<workdir>/checkpoints_damaged/` (never deleted); the previous one is used.

Multi-process: every process calls the same functions in the same order; Orbax coordinates the writes
(each process writes its shards, process 0 the metadata) through the jax.distributed barriers. The
workdir must be one shared filesystem path seen by all processes.
"""

import errno
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn_jax.errors import UserError

# Fields that must match for a checkpoint to be resumed by a config.
IDENTITY_FIELDS = ("model", "num_classes", "model_kwargs", "image_size")
DAMAGED_DIR = "checkpoints_damaged"

# errno values that mean "this storage cannot take the checkpoint": a UserError, not a traceback.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
_STORAGE_MESSAGES = {"No space left on device": "no space left on the device",
                     "Disk quota exceeded": "disk quota exceeded",
                     "Read-only file system": "read-only file system"}


class _DropOrbaxNotice(logging.Filter):
  """Drops Orbax's per-save warning that a checkpoint has no metrics: only eval steps have them."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps and the best by eval `top1`.

  async_save: the arrays are copied to host memory before `save` returns and written to disk in a
  background thread while training continues; the next `save` (or `wait`) waits for it and re-raises
  its error. For an AlexNet-sized state (467 MB with momentum) `save` blocks 0.07 s instead of 1.4 s on
  the development machine. A failure seen once with async saves every step ("Checkpoint directory does
  not exist: .../2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp") did not reproduce in hundreds of
  async saves (every step, 1 and 8 devices, kill -9 mid-save); two runs writing one workdir do produce
  such Orbax errors, which the workdir lock in cnn_jax.train now refuses.
  """
  if keep < 1:
    raise UserError(f"--config.keep_checkpoints={keep} must be >= 1")
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxNotice())
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=lambda m: m["top1"], reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      # Without best_fn Orbax keeps the metrics in memory only (its `_track_best`), so after a restart
      # BestN would see no metrics and drop the best checkpoint; with it they are written per step.
      best_fn=lambda m: m["top1"], best_mode="max",
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # leftovers of a save interrupted by kill -9
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


# --- Saving --------------------------------------------------------------------------------------

def _storage_problem(error: BaseException) -> Optional[str]:
  """A short reason if `error` (or its cause chain) says the storage refused the write, else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
      return _STORAGE_ERRNOS[error.errno]
    for text, reason in _STORAGE_MESSAGES.items():
      if text in str(error):  # tensorstore reports C++ I/O errors as ValueError with the strerror text
        return reason
    error = error.__cause__ or error.__context__
  return None


def _raise_if_storage_error(error: BaseException, directory: str, step: Optional[int]) -> None:
  reason = _storage_problem(error)
  if reason is not None:
    at = f" of step {step}" if step is not None else ""
    raise UserError(f"could not write the checkpoint{at} to {directory}: {reason}; free space or pass "
                    "another --workdir (earlier complete checkpoints are kept)") from error


def save(manager: ocp.CheckpointManager, state, meta: Dict[str, Any],
         metrics: Optional[Dict[str, float]] = None) -> bool:
  """Saves `state` at its step (asynchronously when the manager is async); False if it already exists.

  A step that already exists is left alone (it holds the same state: the run is deterministic), so a
  resumed run never fails by reaching a step it saved before. A full or read-only disk is a UserError.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    logging.warning("checkpoint %d already exists in %s; not saving it again", step, manager.directory)
    return False
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-except
    # An async save's error surfaces here, at the next save; its step is not this one.
    _raise_if_storage_error(e, str(manager.directory), None)
    raise
  return True


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until a background save has finished; its storage error becomes a UserError."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_storage_error(e, str(manager.directory), None)
    raise


# --- Restoring -----------------------------------------------------------------------------------

def _canon(x):
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def check_compatible(meta: Dict[str, Any], expected: Dict[str, Any], workdir: str) -> None:
  """Raises UserError if a checkpoint's identity differs from this run's config; warns on soft fields."""
  diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {expected.get(k)!r}"
           for k in IDENTITY_FIELDS if k in expected and _canon(meta.get(k)) != _canon(expected.get(k))]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds checkpoints of a different run ({'; '.join(diffs)}); "
        "use a new --workdir to start fresh, or --config.init_from to start from its weights "
        "(the existing checkpoints were left untouched)")
  soft = []
  if meta.get("dataset") != expected.get("dataset") and "dataset" in meta:
    soft.append(f"dataset {meta.get('dataset')!r} -> {expected.get('dataset')!r}")
  old_fields, new_fields = meta.get("fingerprint_fields") or {}, expected.get("fingerprint_fields") or {}
  soft += [f"{k} {old_fields.get(k)!r} -> {new_fields.get(k)!r}" for k in sorted(new_fields)
           if k in old_fields and _canon(old_fields[k]) != _canon(new_fields[k])]
  if soft:  # e.g. a longer run (num_train_steps): allowed, but said
    logging.warning("resuming %s with a changed %s", workdir, "; ".join(soft))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one tiny allgather; free with one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _move_aside(manager: ocp.CheckpointManager, steps, workdir: str) -> None:
  """Renames damaged step directories into <workdir>/checkpoints_damaged/ (process 0) and reloads."""
  if not steps:
    return
  if jax.process_index() == 0:
    dest_root = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
    os.makedirs(dest_root, exist_ok=True)
    for step in steps:
      src = os.path.join(str(manager.directory), str(step))
      dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
      if os.path.exists(src):
        os.replace(src, dest)
        print(f"warning: moved damaged checkpoint {src} to {dest}", file=sys.stderr, flush=True)
  _sync("cnn_jax:moved_damaged_checkpoints")
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, state, expected: Dict[str, Any],
                   workdir: str) -> Tuple[Any, Optional[Dict[str, Any]]]:
  """Restores the newest complete checkpoint into `state`; returns (state, meta) or (state, None).

  A checkpoint that fails to read (truncated or missing files) is skipped with a warning and the previous
  one is tried; once one restores, the damaged newer ones are moved to `<workdir>/checkpoints_damaged/`
  (so the run can save those steps again). The identity in `meta` must match `expected`
  (IDENTITY_FIELDS), else UserError and nothing is touched. All processes take the same decisions.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(state))
  damaged = []
  for step in steps:
    meta, problem = None, None
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict):
        raise ValueError(f"meta is a {type(meta).__name__}, not a JSON object")
    except Exception as e:  # pylint: disable=broad-except
      problem = _first_line(e)
    if _all_agree(problem is None):
      check_compatible(meta, expected, workdir)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # pylint: disable=broad-except
        problem = _first_line(e)
      if _all_agree(problem is None):
        _move_aside(manager, damaged, workdir)
        return tree_to_state(state, restored["state"]), meta
    problem = problem or "unreadable on another process"
    logging.warning("checkpoint %d in %s is damaged (%s); trying the previous one", step, workdir, problem)
    if jax.process_index() == 0:
      print(f"warning: checkpoint {step} in {workdir} is damaged ({problem}); trying the previous one",
            file=sys.stderr, flush=True)
    damaged.append(step)
  if damaged:
    # Nothing readable: start afresh, but keep the damaged ones for inspection.
    _move_aside(manager, damaged, workdir)
  return state, None


# --- Fine-tuning from another run ----------------------------------------------------------------

def _to_global(value: np.ndarray, like: jax.Array) -> jax.Array:
  """A host array placed with `like`'s sharding (works when `like` spans several processes)."""
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def init_from(state, path: str):
  """Starts from another run's weights (fine-tuning).

  `path` is a workdir (its latest checkpoint is used), its `checkpoints` folder, or a `checkpoints/<step>`
  directory. Parameters and BatchNorm statistics whose path and shape match are copied; the rest (e.g. a
  classifier head for a different class count) keep their fresh initialisation. The optimiser state,
  step and RNG start anew. The source is read as host arrays, so it may come from any device count.
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
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise UserError(f"--config.init_from={path!r} holds no complete checkpoint")
  try:
    metadata = manager.item_metadata(step)["state"]
    # Host (CPU device 0 of this process) placement: independent of the source run's mesh.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    src_target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), metadata)
    source = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(src_target)))["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--config.init_from={path!r}: checkpoint {step} is unreadable ({_first_line(e)})") from e

  copied, kept = [], []

  def merge(tree, src, prefix):
    if src is None:
      return tree
    flat_src = {"/".join(map(str, k)): v for k, v in _flatten(src).items()}
    out = {}
    for k, v in _flatten(tree).items():
      key = "/".join(map(str, k))
      if key in flat_src and tuple(flat_src[key].shape) == tuple(v.shape):
        out[k] = _to_global(np.asarray(flat_src[key]), v)
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
  if jax.process_index() == 0:
    print(f"Initialised from {directory} step {step}: {len(copied)} arrays copied"
          f"{', fresh: ' + ', '.join(kept) if kept else ''}", flush=True)
  return state.replace(params=params, batch_stats=batch_stats)


def _flatten(tree):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(tree)


def _unflatten(flat):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat)
