"""Which checkpoint a run resumes from, and what happens to the others.

`restore_latest` walks the checkpoints from the newest and takes the first one that can be trusted and fits
the config. Two kinds of trouble are kept apart, because they call for opposite actions:
  * damage (cnn_jax.checkpoint_files.Damaged: a small file that does not parse, a meta without the run's
    identity or of another step, unreadable arrays, a checksum mismatch): the checkpoint is skipped with
    one warning line and, once an older one restores (or none does and the run starts afresh), moved to
    `<workdir>/checkpoints_damaged/`, never deleted;
  * a config that does not fit (another model, an optimiser with other state entries, a changed batch
    size or dataset): the run is refused with one line (a UserError) and nothing is moved.
`set_aside_unopenable` does the first before Orbax's manager opens the directory, for the small files the
manager itself reads. A rewind (`--config.restore_step`) moves the later checkpoints to
`<workdir>/checkpoints_superseded/` and is recorded in the run's lineage with the config changes.

Multi-process: every process calls the same functions in the same order and takes the same decisions
(each one is agreed on through a small allgather); process 0 moves the directories and prints.
"""

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cnn_jax import checkpoint_files as files
from cnn_jax import checksum as checksum_lib
from cnn_jax.errors import UserError

IDENTITY_FIELDS = files.IDENTITY_FIELDS
DAMAGED_DIR = "checkpoints_damaged"
SUPERSEDED_DIR = "checkpoints_superseded"  # the checkpoints a --config.restore_step rewound past
# Changing these on resume changes what a step is (the data stream and its epochs, the learning-rate
# scaling with the batch): refused unless --config.allow_config_change=True.
PROTECTED_FIELDS = ("dataset", "train_split", "batch_size")


# --- Agreeing, moving aside -------------------------------------------------------------------------

def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (one tiny allgather; free with one process)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _any_process(flags: List[bool]) -> List[bool]:
  """Element-wise: whether each flag holds on some process (all processes pass as many flags)."""
  if jax.process_count() == 1 or not flags:
    return list(flags)
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return [bool(x) for x in np.any(np.asarray(gathered).reshape(-1, len(flags)), axis=0)]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _move_dirs(directory: str, steps, workdir: str, folder: str) -> Dict[int, str]:
  """Renames step directories of `directory` into <workdir>/<folder>/ (process 0); {step: new path}."""
  moved = {}
  if not steps:
    return moved
  dest_root = os.path.join(os.path.abspath(workdir), folder)
  stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  if jax.process_index() == 0:
    os.makedirs(dest_root, exist_ok=True)
    for step in sorted(steps):
      src = os.path.join(directory, str(step))
      dest = os.path.join(dest_root, f"{step}-{stamp}")
      if os.path.exists(src):
        os.replace(src, dest)
        moved[step] = dest
  _sync(f"cnn_jax:moved_checkpoints_{folder}")
  return moved


def _say_damaged(damaged: Dict[int, str], moved: Dict[int, str], workdir: str) -> None:
  if jax.process_index() == 0:
    for step, problem in sorted(damaged.items(), reverse=True):
      where = f"moved to {moved[step]}" if step in moved else "left in place"
      print(f"warning: checkpoint {step} in {workdir} is damaged ({problem}); {where}", file=sys.stderr,
            flush=True)


def set_aside_unopenable(directory: str, workdir: str) -> Dict[int, str]:
  """Moves the checkpoints whose manager files are damaged (see checkpoint_files.manager_files_problem)
  to <workdir>/checkpoints_damaged/ with one warning line each, before a manager opens `directory`
  (Orbax's CheckpointManager() raises on them, at every restart). {step: problem}."""
  steps = files.complete_steps(directory)
  problems = [files.manager_files_problem(os.path.join(directory, str(s))) for s in steps]
  flagged = _any_process([p is not None for p in problems])
  damaged = {s: p or "damaged on another process" for s, p, bad in zip(steps, problems, flagged) if bad}
  if damaged:
    _say_damaged(damaged, _move_dirs(directory, damaged, workdir, DAMAGED_DIR), workdir)
  return damaged


def _report_damaged(manager, damaged: Dict[int, str], workdir: str) -> None:
  if damaged:
    moved = _move_dirs(str(manager.directory), damaged, workdir, DAMAGED_DIR)
    manager.reload()
    _say_damaged(damaged, moved, workdir)


def _rewind(manager, newer, restore_step: int, latest: int, workdir: str, lineage) -> None:
  """Moves the checkpoints after `restore_step` aside (to checkpoints_superseded/) and records it."""
  moved = _move_dirs(str(manager.directory), newer, workdir, SUPERSEDED_DIR)
  manager.reload()
  lineage["rewinds"].append({"to": restore_step, "from": latest, "time": time.time()})
  if jax.process_index() == 0 and moved:
    print(f"Rewinding {workdir} to {'the start' if restore_step == 0 else f'step {restore_step}'} "
          f"(--config.restore_step): moved checkpoints {', '.join(map(str, sorted(moved)))} to "
          f"{os.path.join(os.path.abspath(workdir), SUPERSEDED_DIR)}", flush=True)


# --- A checkpoint that does not fit the config ------------------------------------------------------

def _canon(x):
  return json.loads(json.dumps(x, sort_keys=True, default=str))


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
    saved = files.saved_arrays(os.path.join(str(manager.directory), str(step)), meta)
  except files.Damaged as e:
    return str(e)
  wanted = {k: (tuple(v.shape), str(v.dtype)) for k, v in checksum_lib.flat(target).items()}
  if saved != wanted:
    raise _structure_error(step, saved, wanted, meta, expected, workdir)
  return None


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


# --- Choosing the checkpoint -------------------------------------------------------------------------

def _lineage(meta: Optional[Dict[str, Any]]) -> Dict[str, List[Any]]:
  old = (meta or {}).get("lineage") or {}
  return {"config_changes": list(old.get("config_changes") or []), "rewinds": list(old.get("rewinds") or [])}


def _candidates(manager, restore_step: Optional[int], workdir: str):
  """(steps to try, newest first; steps a rewind moves aside; the newest step; the restore_step in force).

  restore_step -1 = the newest; N = that checkpoint, the later ones superseded; 0 = none, all superseded.
  A rewind already recorded in the newest checkpoint's lineage is not repeated (the same command run
  again): then -1 is in force.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  latest = steps[0] if steps else None
  if restore_step is None or restore_step < 0 or not steps:
    if restore_step is not None and restore_step > 0:
      raise UserError(f"--config.restore_step={restore_step}: {workdir} has no checkpoint to restore")
    return steps, [], latest, restore_step
  try:
    done = any(r.get("to") == restore_step for r in _lineage(files.read_meta(manager, latest))["rewinds"])
  except files.Damaged:
    done = False
  if done:
    if jax.process_index() == 0:
      print(f"note: --config.restore_step={restore_step} was applied before in {workdir}; resuming from "
            "its newest checkpoint (drop the flag to silence this)", file=sys.stderr, flush=True)
    return steps, [], latest, -1
  if restore_step and restore_step not in steps:
    raise UserError(f"--config.restore_step={restore_step}: {workdir} has no checkpoint of that step; "
                    f"it has {', '.join(map(str, sorted(steps)))}")
  return ([restore_step] if restore_step else []), [s for s in steps if s > restore_step], latest, restore_step


def _try_restore(manager, step: int, target, expected, workdir: str, allow_config_change: bool):
  """(restored tree, meta, config changes, None) of checkpoint `step`, or (None, None, None, damage).

  Raises UserError (nothing moved) when the checkpoint is sound but does not fit the config.
  """
  meta, problem = None, None
  try:
    meta = files.read_meta(manager, step)
  except files.Damaged as e:
    problem = str(e)
  if _all_agree(problem is None):
    check_compatible(meta, expected, workdir)
    problem = _check_structure(manager, step, target, meta, expected, workdir)
  if not _all_agree(problem is None):
    return None, None, None, problem or "unreadable on another process"
  changes = config_changes(meta, expected, step)
  _check_changes(changes, workdir, step, allow_config_change)
  restored = None
  try:
    restored = files.quiet_read(lambda: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"])
    problem = files.verify(restored, meta, step)
  except files.Damaged as e:
    if "structures do not match" in getattr(e, "error_text", ""):
      raise _structure_error(step, {}, {}, meta, expected, workdir) from e
    problem = str(e)
  if not _all_agree(problem is None):
    return None, None, None, problem or "unreadable on another process"
  return restored, meta, changes, None


def _say_resumed(meta, changes, step: int, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  if not files.verifiable(meta):
    print(files.unverifiable_note(step, workdir), file=sys.stderr, flush=True)
  if changes:
    what = "; ".join(f"{c['field']} {c['from']!r} -> {c['to']!r}" for c in changes)
    print(f"warning: resuming {workdir} at step {step} with {what} (recorded as config_changes "
          "in run_info.json and summary.json)", file=sys.stderr, flush=True)


def restore_latest(manager: ocp.CheckpointManager, state, expected: Dict[str, Any], workdir: str,
                   restore_step: int = -1, allow_config_change: bool = False
                   ) -> Tuple[Any, Optional[Dict[str, Any]], Dict[str, List[Any]]]:
  """Restores the newest good checkpoint (or `restore_step`) into `state`: (state, meta or None, lineage).

  In this order, for each checkpoint from the newest:
    * meta unreadable, without the run's identity, or of another step (a renamed directory) -> damaged;
    * another model / class count / input size (IDENTITY_FIELDS) -> UserError;
    * arrays that do not fit this config's train state (e.g. grad_clip_norm 0 -> 1 adds an optimiser
      state entry) -> UserError naming the changed field; a config's doing is never taken for damage;
    * a changed PROTECTED_FIELDS value -> UserError unless `allow_config_change`; any change of a pipeline/
      recipe field is recorded in lineage['config_changes'] with its step (and said on stderr);
    * unreadable arrays, or arrays whose checksums differ from those recorded at save -> damaged (a
      checkpoint without checksums, from an older run, is used with one line saying it is unverified).
  Damaged checkpoints are skipped (one line each) and, once one restores, moved to
  `<workdir>/checkpoints_damaged/` (never deleted). A UserError leaves everything as it was.

  restore_step: -1 = the newest; N = that checkpoint, the later ones are moved to
  `<workdir>/checkpoints_superseded/` (after a divergence: the way back); 0 = start afresh, all moved.
  A rewind is recorded in lineage['rewinds'] and is not repeated when the same command runs again.
  All processes take the same decisions.
  """
  steps, newer, latest, restore_step = _candidates(manager, restore_step, workdir)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, files.state_to_tree(state))
  damaged = {}
  for step in steps:
    restored, meta, changes, problem = _try_restore(manager, step, target, expected, workdir,
                                                    allow_config_change)
    if problem is None:
      _report_damaged(manager, damaged, workdir)
      lineage = _lineage(meta)
      if newer:
        _rewind(manager, newer, step, latest, workdir, lineage)
      lineage["config_changes"] += changes
      _say_resumed(meta, changes, step, workdir)
      return files.tree_to_state(state, restored), meta, lineage
    damaged[step] = problem
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
      meta = files.read_meta(manager, step)
    except files.Damaged:
      continue
    if (meta.get("divergence") or {}).get("sane", True):
      return step
  return None
