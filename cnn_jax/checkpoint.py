"""Orbax checkpoints of the train state plus a small JSON of run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. `state` holds params, optimiser state, BatchNorm
statistics, step and the base RNG key (tensorstore/OCDBT arrays); `meta` is JSON: the model/dataset identity,
the pipeline position (the next step: the input pipeline is a pure function of (seed, step), see
cnn_jax.data), the best eval so far, and the config. Nothing is ever unpickled.

Kept: the last `keep` checkpoints plus the best by eval top-1 (Orbax preservation policies).
Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a process
killed mid-save leaves only a temporary directory, which the next start removes. The meta records a
checksum of every array (cnn_jax.checksum). A committed checkpoint that fails to read later (truncated or
deleted files) or whose arrays fail their checksums (a flipped bit) is skipped with one warning line and
moved to `<workdir>/checkpoints_damaged/` (never deleted); the previous one is used. A checkpoint that does
not fit the config (another optimiser structure, batch size, dataset) is never taken for damage: the run
is refused with one line and nothing is moved (see `restore_latest`).

Multi-process: every process calls the same functions in the same order; Orbax coordinates the writes
(each process writes its shards, process 0 the metadata) through the jax.distributed barriers. The
workdir must be one shared filesystem path seen by all processes.
"""

import contextlib
import errno
import functools
import gc
import inspect
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn_jax import checksum as checksum_lib
from cnn_jax.errors import UserError

# Fields that must match for a checkpoint to be resumed by a config.
IDENTITY_FIELDS = ("model", "num_classes", "model_kwargs", "image_size")
DAMAGED_DIR = "checkpoints_damaged"
SUPERSEDED_DIR = "checkpoints_superseded"  # the checkpoints a --config.restore_step rewound past

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


class _KeepLastGood:
  """Orbax preservation policy: keeps the two newest checkpoints saved while the loss was sane.

  After a divergence every new checkpoint would otherwise push the good ones out of the last `keep`. Two,
  because a checkpoint's parameters are judged only by the next step's loss: of two checkpoints saved
  while the loss was sane, the older one's next step was seen (by the time the newer one was saved).
  In a healthy run they are the newest two, kept anyway.
  """

  def should_preserve(self, checkpoints, *, context=None):
    del context
    good = sorted((c.step for c in checkpoints if c.metrics and c.metrics.get("sane")))[-2:]
    return [c.step in good for c in checkpoints]


def _top1(metrics) -> float:
  return metrics.get("top1", float("-inf"))  # checkpoints between evals have no top1


def use_replica_parallel() -> bool:
  """Whether Orbax splits the write of a replicated array among its replicas: on TPUs only.

  Orbax's default is on unless $JAX_PLATFORMS names a GPU. Each replica then copies its slice to the host,
  which costs one small sliced program per array shape and device layout, compiled at a process's first
  save. On a CPU every device already shares host memory: measured with 4 CPU devices (VGG-11-BN 1/8, 16
  steps, a save every 4 steps, warm compilation cache) a train.py launch took 13.0 / 11.0 s with it and
  8.2 / 7.0 s without (`tests/test_checkpoint.py::test_a_save_on_cpu_devices_compiles_nothing`). Orbax
  already leaves it off for GPUs when $JAX_PLATFORMS names one; here it is used on TPUs only.
  """
  return jax.default_backend() == "tpu"


@functools.cache
def _configure_array_handler() -> None:
  """Registers Orbax's jax.Array handler with `use_replica_parallel()` (once per process)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=use_replica_parallel()), override=True)


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps, the best by eval `top1` and the last good one.

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
  _configure_array_handler()
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxNotice())
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=_top1, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
          _KeepLastGood(),
      ]),
      # Without best_fn Orbax keeps the metrics in memory only (its `_track_best`), so after a restart
      # BestN would see no metrics and drop the best checkpoint; with it they are written per step.
      best_fn=_top1, best_mode="max",
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
  if state.ema is not None:
    tree["ema"] = state.ema
  return tree


def tree_to_state(state, tree: Dict[str, Any]):
  """Puts a restored dict back into `state` (the template it was restored against)."""
  return state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                       rng=tree["rng"], batch_stats=tree.get("batch_stats"), ema=tree.get("ema"))


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

  The meta gets a checksum of every array ('checksums', see cnn_jax.checksum), verified at restore. A step
  that already exists is left alone (it holds the same state: the run is deterministic), so a resumed run
  never fails by reaching a step it saved before. A full or read-only disk is a UserError.
  """
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    logging.warning("checkpoint %d already exists in %s; not saving it again", step, manager.directory)
    return False
  tree = state_to_tree(state)
  meta = {**meta, "checksums": checksum_lib.checksums(tree)}
  # Every checkpoint carries metrics: 'sane' for _KeepLastGood, 'top1' at evals for the best.
  metrics = {**(metrics or {}), "sane": int(bool((meta.get("divergence") or {}).get("sane", True)))}
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
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


# --- Reading: damage, or a config that does not fit ----------------------------------------------

class Damaged(Exception):
  """A checkpoint that cannot be trusted: unreadable files, or arrays that fail their checksums."""


def _reason(error: BaseException) -> str:
  """One short line for a failed read: the innermost message, without TensorStore's spec dump."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in reversed(chain):  # the innermost error says most (the outer ones wrap it)
    text = (str(e).strip().splitlines() or [""])[0]
    for cut in (" See full TensorStore details", " [tensorstore_spec=", " [source locations="):
      text = text.split(cut)[0]
    # TensorStore's wording names the driver stack and the database path: the caller names the step.
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = re.sub(r'Error opening "\w+" driver: ', "", text)
    if text:
      return f"{type(e).__name__}: {text[:200]}"
  return type(chain[0]).__name__ if chain else "unknown error"


@contextlib.contextmanager
def _quiet_failures():
  """Keeps a failed read to our one line: drops the 'Exception ignored in: <coroutine ...>' reports (with
  TensorStore's spec dump) of the reads Orbax abandons when one of them fails."""
  previous = sys.unraisablehook

  def hook(unraisable):
    abandoned = (inspect.iscoroutine(unraisable.object) or "orbax" in repr(unraisable.object)
                 or "Event loop is closed" in str(unraisable.exc_value))
    if not abandoned:
      previous(unraisable)

  class _DropAbandonedReads(logging.Filter):
    """asyncio's "Task exception was never retrieved" for the other reads of a failed restore."""

    def filter(self, record):
      text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
      return "tensorstore_spec" not in text and f"{os.sep}orbax{os.sep}" not in text

  asyncio_logger, quiet = logging.getLogger("asyncio"), _DropAbandonedReads()
  sys.unraisablehook = hook
  asyncio_logger.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()  # abandoned coroutines and tasks report now, while the filters are in place
    sys.unraisablehook = previous
    asyncio_logger.removeFilter(quiet)


def read_meta(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  """The JSON meta of checkpoint `step`; Damaged if it cannot be read."""
  try:
    with _quiet_failures():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(_reason(e)) from e
  if not isinstance(meta, dict):
    raise Damaged(f"its meta is a {type(meta).__name__}, not a JSON object")
  return meta


def _saved_arrays(step_dir: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """{path: (shape, dtype)} of the arrays in `<step_dir>/state` (Orbax's metadata); Damaged if unreadable."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    with _quiet_failures():
      tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state")
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(_reason(e)) from e
  if tree is None:
    raise Damaged("its array metadata is missing")
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in checksum_lib.flat(tree).items()
          if hasattr(v, "shape")}


def _flat_config(config: Any) -> Dict[str, Any]:
  """A config (ConfigDict, dict or its JSON text) as {'dotted.field': JSON value}."""
  if isinstance(config, str):
    try:
      config = json.loads(config)
    except ValueError:
      return {}
  out = {}

  def visit(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        visit(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = _canon(v)

  visit(config if isinstance(config, dict) else {}, "")
  return out


def _structure_error(step: int, saved, wanted, meta, expected, workdir) -> UserError:
  """The one line for a checkpoint whose arrays do not fit this config's train state."""
  old, new = _flat_config(meta.get("config") or {}), _flat_config(expected.get("config") or {})
  changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
  # The fields that shape the train state: the optimiser's (clipping, weight decay, momentum add or
  # remove state entries) and the model's.
  suspects = [k for k in changed if k.startswith(("optimizer.", "model"))] or changed
  if suspects:
    what = "; ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in suspects[:3])
    back = " ".join(f"--config.{k}={old[k]!r}" for k in suspects[:3])
    cause = (f"this config changed {what}, which changes the train state (optimiser state entries), "
             f"so it cannot continue from that checkpoint; resume with {back}, or")
  else:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    odd = [k for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
              else f"{odd[0]} is {saved[odd[0]]} there, {wanted[odd[0]]} here" if odd else "tree structure")
    cause = f"its train state does not fit this config's ({detail}); resume with the original config, or"
  return UserError(f"checkpoint {step} in {workdir}: {cause} start a new --workdir with "
                   f"--config.init_from={os.path.abspath(workdir)} to carry the weights over "
                   "(nothing was moved)")


def _check_structure(manager, step: int, target, meta, expected, workdir) -> Optional[str]:
  """None if checkpoint `step`'s arrays fit `target`; a damage reason if its metadata is unreadable;
  UserError if they differ (a config change, not damage: nothing may be moved for it)."""
  try:
    saved = _saved_arrays(os.path.join(str(manager.directory), str(step)))
  except Damaged as e:
    return str(e)
  wanted = {k: (tuple(v.shape), str(v.dtype)) for k, v in checksum_lib.flat(target).items()}
  if saved != wanted:
    raise _structure_error(step, saved, wanted, meta, expected, workdir)
  return None


def _verify(tree, meta: Dict[str, Any]) -> Optional[str]:
  """None if the arrays of `tree` match the checksums in `meta` (or it has none: written before them)."""
  recorded = meta.get("checksums")
  if not recorded:
    return None
  bad = checksum_lib.mismatch(recorded, checksum_lib.checksums(tree))
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"checksum mismatch in {bad[0]}{more}: its data changed after it was written"
  return None


# --- Config changes on resume ----------------------------------------------------------------------

# Changing these on resume changes what a step is (the data stream and its epochs, the learning-rate
# scaling with the batch): refused unless --config.allow_config_change=True.
PROTECTED_FIELDS = ("dataset", "train_split", "batch_size")


def check_compatible(meta: Dict[str, Any], expected: Dict[str, Any], workdir: str) -> None:
  """Raises UserError if a checkpoint's identity (model, classes, input size) differs from this config's."""
  diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {expected.get(k)!r}"
           for k in IDENTITY_FIELDS if k in expected and _canon(meta.get(k)) != _canon(expected.get(k))]
  if diffs:
    raise UserError(
        f"workdir {workdir} holds checkpoints of a different run ({'; '.join(diffs)}); "
        "use a new --workdir to start fresh, or --config.init_from to start from its weights "
        "(the existing checkpoints were left untouched)")


def config_changes(meta: Dict[str, Any], expected: Dict[str, Any], step: int) -> List[Dict[str, Any]]:
  """[{'step', 'field', 'from', 'to'}] for every pipeline/recipe field (the fingerprint's) that differs."""
  old = _flat_config(meta.get("fingerprint_fields") or {})
  new = _flat_config(expected.get("fingerprint_fields") or {})
  if "dataset" in meta and "dataset" in expected:  # the resolved name (a folder's absolute path)
    old["dataset"], new["dataset"] = meta["dataset"], expected["dataset"]
  return [{"step": step, "field": k, "from": old[k], "to": new[k]}
          for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def _check_changes(changes, workdir: str, step: int, allow: bool) -> None:
  protected = [c for c in changes if c["field"] in PROTECTED_FIELDS]
  if protected and not allow:
    what = "; ".join(f"{c['field']} {c['from']!r} -> {c['to']!r}" for c in protected)
    raise UserError(
        f"resuming {workdir} at step {step} would change {what}, which changes what a step and an epoch "
        "are (data order, epoch count, learning-rate scaling) for the rest of the run; use a new "
        f"--workdir (with --config.init_from={os.path.abspath(workdir)} to start from its weights), or "
        "pass --config.allow_config_change=True to continue with the change recorded in the run's "
        "config_changes (nothing was changed)")


# --- Restoring -----------------------------------------------------------------------------------

def _canon(x):
  return json.loads(json.dumps(x, sort_keys=True, default=str))


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


def _move_aside(manager: ocp.CheckpointManager, steps: Dict[int, str], workdir: str,
                folder: str = DAMAGED_DIR) -> Dict[int, str]:
  """Renames step directories into <workdir>/<folder>/ (process 0) and reloads; {step: new path}."""
  moved = {}
  if not steps:
    return moved
  dest_root = os.path.join(os.path.abspath(workdir), folder)
  stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  if jax.process_index() == 0:
    os.makedirs(dest_root, exist_ok=True)
    for step in sorted(steps):
      src = os.path.join(str(manager.directory), str(step))
      dest = os.path.join(dest_root, f"{step}-{stamp}")
      if os.path.exists(src):
        os.replace(src, dest)
        moved[step] = dest
  _sync(f"cnn_jax:moved_checkpoints_{folder}")
  manager.reload()
  return moved


def _report_damaged(manager, damaged: Dict[int, str], workdir: str) -> None:
  moved = _move_aside(manager, damaged, workdir)
  if jax.process_index() == 0:
    for step, problem in sorted(damaged.items(), reverse=True):
      where = f"moved to {moved[step]}" if step in moved else "left in place"
      print(f"warning: checkpoint {step} in {workdir} is damaged ({problem}); {where}", file=sys.stderr,
            flush=True)


def _rewind(manager, newer, restore_step: int, latest: int, workdir: str, lineage) -> None:
  """Moves the checkpoints after `restore_step` aside (to checkpoints_superseded/) and records it."""
  moved = _move_aside(manager, {s: "" for s in newer}, workdir, SUPERSEDED_DIR)
  lineage["rewinds"].append({"to": restore_step, "from": latest, "time": time.time()})
  if jax.process_index() == 0 and moved:
    print(f"Rewinding {workdir} to {'the start' if restore_step == 0 else f'step {restore_step}'} "
          f"(--config.restore_step): moved checkpoints {', '.join(map(str, sorted(moved)))} to "
          f"{os.path.join(os.path.abspath(workdir), SUPERSEDED_DIR)}", flush=True)


def _lineage(meta: Optional[Dict[str, Any]]) -> Dict[str, List[Any]]:
  old = (meta or {}).get("lineage") or {}
  return {"config_changes": list(old.get("config_changes") or []), "rewinds": list(old.get("rewinds") or [])}


def restore_latest(manager: ocp.CheckpointManager, state, expected: Dict[str, Any], workdir: str,
                   restore_step: int = -1, allow_config_change: bool = False
                   ) -> Tuple[Any, Optional[Dict[str, Any]], Dict[str, List[Any]]]:
  """Restores the newest good checkpoint (or `restore_step`) into `state`: (state, meta or None, lineage).

  In this order, for each checkpoint from the newest:
    * meta unreadable -> damaged;
    * another model / class count / input size (IDENTITY_FIELDS) -> UserError;
    * arrays that do not fit this config's train state (e.g. grad_clip_norm 0 -> 1 adds an optimiser
      state entry) -> UserError naming the changed field; a config's doing is never taken for damage;
    * a changed PROTECTED_FIELDS value -> UserError unless `allow_config_change`; any change of a pipeline/
      recipe field is recorded in lineage['config_changes'] with its step (and said on stderr);
    * unreadable arrays, or arrays whose checksums differ from those recorded at save -> damaged.
  Damaged checkpoints are skipped (one line each) and, once one restores, moved to
  `<workdir>/checkpoints_damaged/` (never deleted). A UserError leaves everything as it was.

  restore_step: -1 = the newest; N = that checkpoint, the later ones are moved to
  `<workdir>/checkpoints_superseded/` (after a divergence: the way back); 0 = start afresh, all moved.
  A rewind is recorded in lineage['rewinds'] and is not repeated when the same command runs again.
  All processes take the same decisions.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(state))
  newer, latest = [], steps[0] if steps else None
  if restore_step is not None and restore_step > 0 and not steps:
    raise UserError(f"--config.restore_step={restore_step}: {workdir} has no checkpoint to restore")
  if restore_step is not None and restore_step >= 0 and steps:
    try:
      done = any(r.get("to") == restore_step for r in _lineage(read_meta(manager, latest))["rewinds"])
    except Damaged:
      done = False
    if done:  # the same command again, after the rewind: go on from the newest
      if jax.process_index() == 0:
        print(f"note: --config.restore_step={restore_step} was applied before in {workdir}; resuming from "
              "its newest checkpoint (drop the flag to silence this)", file=sys.stderr, flush=True)
      restore_step = -1
    else:
      if restore_step and restore_step not in steps:
        raise UserError(f"--config.restore_step={restore_step}: {workdir} has no checkpoint of that step; "
                        f"it has {', '.join(map(str, sorted(steps)))}")
      newer = [s for s in steps if s > restore_step]
      steps = [restore_step] if restore_step else []
  damaged = {}
  for step in steps:
    meta, problem = None, None
    try:
      meta = read_meta(manager, step)
    except Damaged as e:
      problem = str(e)
    if _all_agree(problem is None):
      check_compatible(meta, expected, workdir)
      problem = _check_structure(manager, step, target, meta, expected, workdir)
    if _all_agree(problem is None):
      changes = config_changes(meta, expected, step)
      _check_changes(changes, workdir, step, allow_config_change)
      restored = None
      try:
        with _quiet_failures():
          restored = manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target)))["state"]
        problem = _verify(restored, meta)
      except Exception as e:  # pylint: disable=broad-except
        if "structures do not match" in str(e):
          raise _structure_error(step, {}, {}, meta, expected, workdir) from e
        problem = _reason(e)
      if _all_agree(problem is None):
        _report_damaged(manager, damaged, workdir)
        lineage = _lineage(meta)
        if newer:
          _rewind(manager, newer, step, latest, workdir, lineage)
        if changes:
          lineage["config_changes"] += changes
          if jax.process_index() == 0:
            what = "; ".join(f"{c['field']} {c['from']!r} -> {c['to']!r}" for c in changes)
            print(f"warning: resuming {workdir} at step {step} with {what} (recorded as config_changes "
                  "in run_info.json and summary.json)", file=sys.stderr, flush=True)
        return tree_to_state(state, restored), meta, lineage
    damaged[step] = problem or "unreadable on another process"
  if restore_step is not None and restore_step > 0 and damaged:
    raise UserError(f"--config.restore_step={restore_step}: checkpoint {restore_step} in {workdir} is "
                    f"damaged ({damaged[restore_step]}); name another one")
  lineage = _lineage(None)
  _report_damaged(manager, damaged, workdir)  # nothing readable: start afresh, keep them for inspection
  if newer:  # restore_step=0
    _rewind(manager, newer, 0, latest, workdir, lineage)
  return state, None, lineage


def last_good_step(manager: ocp.CheckpointManager, at_most: int) -> Optional[int]:
  """The newest kept checkpoint with step <= `at_most` whose meta does not mark it as diverged."""
  for step in sorted(manager.all_steps(), reverse=True):
    if step > at_most:
      continue
    try:
      meta = read_meta(manager, step)
    except Damaged:
      continue
    if (meta.get("divergence") or {}).get("sane", True):
      return step
  return None


# --- Reading a checkpoint as host arrays (prediction, fine-tuning) -------------------------------

def complete_steps(directory: str) -> List[int]:
  """Committed checkpoint steps in `directory`, ascending (Orbax writes into a temporary name first)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def read_host_checkpoint(directory: str, step: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(state tree as numpy arrays, meta) of `<directory>/<step>`, checksums verified; Damaged otherwise.

  Restored as plain numpy arrays, so a checkpoint written on 8 devices (or several hosts) loads on one.
  """
  step_dir = os.path.join(directory, str(step))
  try:
    with _quiet_failures():
      checkpointer = ocp.PyTreeCheckpointer()
      metadata = checkpointer.metadata(os.path.join(step_dir, "state")).item_metadata
      if metadata is None:
        raise Damaged("its array metadata is missing")
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
      tree = checkpointer.restore(os.path.join(step_dir, "state"),
                                  args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Damaged:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(_reason(e)) from e
  meta = {}
  if os.path.isdir(os.path.join(step_dir, "meta")):
    try:
      meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, "meta")) or {}
    except Exception as e:  # pylint: disable=broad-except
      raise Damaged(_reason(e)) from e
  problem = _verify(tree, meta) if isinstance(meta, dict) else None
  if problem:
    raise Damaged(problem)
  return tree, meta if isinstance(meta, dict) else {}


def read_newest_good(directory: str, step: Optional[int], flag: str) -> Tuple[int, Any, Dict[str, Any]]:
  """(step, numpy state tree, meta) of checkpoint `step`, or of the newest good one in `directory`.

  With `step` None, damaged checkpoints are skipped with one warning line each. With an explicit `step`
  that is damaged, the UserError names the earlier checkpoints to pass as `flag`=... instead.
  """
  steps = complete_steps(directory)
  if step is not None:
    try:
      tree, meta = read_host_checkpoint(directory, step)
      return step, tree, meta
    except Damaged as e:
      earlier = [s for s in steps if s < step]
      hint = (f"the earlier ones are {', '.join(map(str, earlier))}: pass {flag}="
              f"{os.path.join(directory, str(earlier[-1]))}" if earlier else "there is no earlier one")
      raise UserError(f"checkpoint {step} in {directory} is damaged ({e}); {hint}") from e
  for candidate in reversed(steps):
    try:
      tree, meta = read_host_checkpoint(directory, candidate)
      return candidate, tree, meta
    except Damaged as e:
      print(f"warning: checkpoint {candidate} in {directory} is damaged ({e}); trying the previous one",
            file=sys.stderr, flush=True)
  if steps:
    raise UserError(f"every checkpoint in {directory} is damaged ({', '.join(map(str, steps))})")
  raise UserError(f"no complete checkpoint in {directory}; has the run saved one yet?")


# --- Fine-tuning from another run ----------------------------------------------------------------

def _to_global(value: np.ndarray, like: jax.Array) -> jax.Array:
  """A host array placed with `like`'s sharding (works when `like` spans several processes)."""
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def init_from(state, path: str):
  """Starts from another run's weights (fine-tuning).

  `path` is a workdir (its newest good checkpoint is used: a damaged one is skipped with a warning), its
  `checkpoints` folder, or a `checkpoints/<step>` directory. Parameters and BatchNorm statistics whose path
  and shape match are copied; the rest (e.g. a classifier head for a different class count) keep their
  fresh initialisation. The optimiser state, step and RNG start anew. The source is read as host arrays
  with its checksums verified, so it may come from any device count.
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
  if step is not None and step not in complete_steps(directory):
    raise UserError(f"--config.init_from={path!r} holds no complete checkpoint")
  if step is None and not complete_steps(directory):
    raise UserError(f"--config.init_from={path!r} holds no complete checkpoint")
  step, source, _ = read_newest_good(directory, step, "--config.init_from")

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
