"""One checkpoint on disk: its layout, reading its meta and arrays, and what makes it damaged.

`<workdir>/checkpoints/<step>/` holds
  _CHECKPOINT_METADATA  Orbax's JSON of the step (item handlers, commit time)
  metrics/metrics       Orbax's JSON of the metrics the retention policy reads ('sane', 'top1')
  meta/metadata         this project's JSON: identity (IDENTITY_FIELDS), `step`, pipeline position, best eval,
                        config, lineage and a checksum of every array (cnn_jax.checksum)
  state/                the arrays (tensorstore OCDBT) with Orbax's JSON `_METADATA` and `_sharding`
Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so only committed steps
have that name. Nothing is ever unpickled.

A checkpoint is damaged (`Damaged`) when any of these cannot be trusted: a small file that does not parse,
a meta without the run's identity or whose `step` is not the directory's (a renamed directory), arrays that
do not read or fail their checksums. The caller decides what to do with it (cnn_jax.resume, cnn_jax.checkpoint).
Every failed read is reduced to one short reason: the reports of the reads Orbax abandons when one of them
fails (coroutines never awaited, tasks whose exception was never retrieved, tensorstore callbacks into a
closed event loop) are dropped.
"""

import contextlib
import gc
import inspect
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cnn_jax import checksum as checksum_lib

# Fields of the meta that name the run a checkpoint belongs to: a resume must match them.
IDENTITY_FIELDS = ("model", "num_classes", "model_kwargs", "image_size")
# Orbax's small JSON files of a step: the manager reads them when it opens the checkpoint directory.
MANAGER_FILES = ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics"))
# The small JSON files of the items: read when a step is restored.
ITEM_FILES = (os.path.join("meta", "metadata"), os.path.join("state", "_METADATA"),
              os.path.join("state", "_sharding"))


class Damaged(Exception):
  """A checkpoint that cannot be trusted: unreadable files, or arrays that fail their checksums."""


def reason(error: BaseException) -> str:
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


# --- Keeping a failed read or write to one line ----------------------------------------------------

def _closed_loop_report(unraisable) -> bool:
  """A tensorstore callback into the event loop of an Orbax operation that already ended (with an error)."""
  return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def drop_closed_loop_reports() -> None:
  """Installs (if not already there) a sys.unraisablehook that drops `_closed_loop_report`s.

  When a write fails (a full disk) or a read fails, Orbax closes its event loop while tensorstore still
  completes the other operations; each completion then reports 'RuntimeError: Event loop is closed' with a
  traceback, from a C++ thread, at any later moment of the process (dozens per failed save). The failure
  itself is reported once by the caller. Checked on every call: test runners replace the hook per test.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(unraisable):
    if not _closed_loop_report(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


class _DropAbandonedReads(logging.Filter):
  """asyncio's "Task exception was never retrieved" for the other reads of a failed restore."""

  def filter(self, record):
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return "tensorstore_spec" not in text and f"{os.sep}orbax{os.sep}" not in text


@contextlib.contextmanager
def quiet_failures():
  """Keeps a failed read to the caller's one line: drops the reports of the reads Orbax abandons when one
  of them fails ('Exception ignored in: <coroutine ...>' with TensorStore's spec dump, asyncio's unretrieved
  task exceptions, "RuntimeWarning: coroutine ... was never awaited")."""
  drop_closed_loop_reports()
  previous = sys.unraisablehook

  def hook(unraisable):
    abandoned = inspect.iscoroutine(unraisable.object) or "orbax" in repr(unraisable.object)
    if not abandoned:
      previous(unraisable)

  asyncio_logger, quiet = logging.getLogger("asyncio"), _DropAbandonedReads()
  sys.unraisablehook = hook
  asyncio_logger.addFilter(quiet)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
      try:
        yield
      finally:
        gc.collect()  # abandoned coroutines and tasks report now, while the filters are in place
  finally:
    sys.unraisablehook = previous
    asyncio_logger.removeFilter(quiet)


def quiet_read(read: Callable[[], Any]) -> Any:
  """read() inside `quiet_failures`; a failure becomes Damaged (its one-line `reason`; `error_text`: the
  whole message), raised once Orbax's exception is released: the abandoned coroutines its traceback holds
  report "never awaited" when freed, which must happen while the filters are in place."""
  failure = None
  with quiet_failures():
    try:
      return read()
    except Damaged:
      raise
    except Exception as e:  # pylint: disable=broad-except
      failure = Damaged(reason(e))
      failure.error_text = str(e)
  raise failure


# --- Small files and the meta ----------------------------------------------------------------------

def _json_file_problem(step_dir: str, name: str) -> Optional[str]:
  """Why `<step_dir>/<name>` is not a JSON object (None if it is, or if it is absent)."""
  path = os.path.join(step_dir, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      value = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return f"{name} is not readable JSON ({type(e).__name__}: {str(e)[:80]})"
  if not isinstance(value, dict):
    return f"{name} holds a JSON {type(value).__name__}, not an object"
  return None


def manager_files_problem(step_dir: str) -> Optional[str]:
  """Why Orbax's manager cannot open checkpoint `step_dir` (a small file of its own is damaged), or None.

  Orbax reads these for every kept step when a manager opens the directory: a damaged `metrics` raises out
  of CheckpointManager(), a damaged `_CHECKPOINT_METADATA` logs a raw error line.
  """
  for name in MANAGER_FILES:
    problem = _json_file_problem(step_dir, name)
    if problem:
      return problem
  return None


def item_files_problem(step_dir: str) -> Optional[str]:
  """Why the small JSON files of checkpoint `step_dir`'s items (meta, array metadata) are damaged, or None."""
  for name in ITEM_FILES:
    problem = _json_file_problem(step_dir, name)
    if problem:
      return problem
  return None


def meta_problem(meta: Any, step: int) -> Optional[str]:
  """Why `meta` cannot be the meta of checkpoint `step`, or None.

  Every meta this code writes holds the run's identity and its step. Without them it is damaged (an empty
  `{}` is valid JSON), not a checkpoint of another run; a `step` that is not the directory's name means
  the directory was renamed, and resuming it would leave a stale directory where that step belongs.
  """
  if not isinstance(meta, dict):
    return f"its meta is a {type(meta).__name__}, not a JSON object"
  missing = [k for k in IDENTITY_FIELDS + ("step",) if k not in meta]
  if missing:
    return f"its meta lacks {', '.join(missing)}"
  if meta["step"] != step:
    return f"its meta is of step {meta['step']!r}, not {step}: the directory was renamed"
  return None


def read_meta(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  """The JSON meta of checkpoint `step`, checked by `meta_problem`; Damaged if it cannot be trusted."""
  problem = item_files_problem(os.path.join(str(manager.directory), str(step)))
  if problem:
    raise Damaged(problem)
  meta = quiet_read(lambda: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  problem = meta_problem(meta, step)
  if problem:
    raise Damaged(problem)
  return meta


# --- Arrays ----------------------------------------------------------------------------------------

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


def saved_arrays(step_dir: str, meta: Dict[str, Any]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """{path: (shape, dtype)} of the arrays in `<step_dir>/state` (Orbax's metadata); Damaged if unreadable.

  The paths are also those of the checksums in `meta`, written from the same tree: where they differ, the
  array metadata changed after the save (a flipped bit in a name), which is damage, not another config.
  """
  tree = quiet_read(lambda: ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state"))
  if tree is None:
    raise Damaged("its array metadata is missing")
  arrays = {k: (tuple(v.shape), str(v.dtype)) for k, v in checksum_lib.flat(tree).items()
            if hasattr(v, "shape")}
  recorded = meta.get("checksums")
  if recorded and set(recorded) != set(arrays):
    odd = sorted(set(recorded) ^ set(arrays))[0]
    raise Damaged(f"its array metadata does not list the arrays its meta records ({odd})")
  return arrays


def _first_value(x) -> int:
  """A scalar array's value; for a jax.Array from this process's copy (it may span several processes)."""
  if isinstance(x, jax.Array):
    x = x.addressable_data(0)
  return int(np.asarray(x).reshape(-1)[0])


def verify(tree, meta: Dict[str, Any], step: int) -> Optional[str]:
  """Why the arrays of `tree` are not those saved as checkpoint `step`, or None.

  Their checksums must match those in `meta` (a meta without them, written before they were recorded,
  cannot be verified: see `verifiable`), and the saved step must be the directory's.
  """
  saved_step = _first_value(tree["step"]) if "step" in tree else step
  if saved_step != step:
    return f"its arrays are of step {saved_step}, not {step}: the directory was renamed"
  recorded = meta.get("checksums")
  if not recorded:
    return None
  bad = checksum_lib.mismatch(recorded, checksum_lib.checksums(tree))
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"checksum mismatch in {bad[0]}{more}: its data changed after it was written"
  return None


def verifiable(meta: Dict[str, Any]) -> bool:
  """Whether `meta` records checksums of the arrays (checkpoints of older runs do not)."""
  return bool(meta.get("checksums"))


def unverifiable_note(step: int, where: str) -> str:
  """The one line said when checkpoint `step` is used although its arrays cannot be verified."""
  return (f"note: checkpoint {step} in {where} records no checksums (written before they were), so its "
          "arrays cannot be verified; using it")


# --- Reading a checkpoint as host arrays (prediction, fine-tuning) ---------------------------------

def complete_steps(directory: str) -> List[int]:
  """Committed checkpoint steps in `directory`, ascending (Orbax writes into a temporary name first)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def _host_arrays(state_dir: str) -> Dict[str, Any]:
  """The arrays of `state_dir` as numpy arrays, whatever mesh wrote them; Orbax's errors propagate."""
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  if metadata is None:
    raise Damaged("its array metadata is missing")
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
  return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_host_checkpoint(directory: str, step: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(state tree as numpy arrays, meta) of `<directory>/<step>`, verified as `verify`; Damaged otherwise.

  Restored as plain numpy arrays, so a checkpoint written on 8 devices (or several hosts) loads on one.
  """
  step_dir = os.path.join(directory, str(step))
  problem = manager_files_problem(step_dir) or item_files_problem(step_dir)
  if problem:
    raise Damaged(problem)
  json_checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  meta = quiet_read(lambda: json_checkpointer.restore(os.path.join(step_dir, "meta")))
  problem = meta_problem(meta, step)
  if problem:
    raise Damaged(problem)
  tree = quiet_read(lambda: _host_arrays(os.path.join(step_dir, "state")))
  problem = verify(tree, meta, step)
  if problem:
    raise Damaged(problem)
  return tree, meta
