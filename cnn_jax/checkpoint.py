"""Orbax checkpoints of the train state plus a small JSON of run metadata: saving, and reading for use.

Layout and what makes a checkpoint damaged: cnn_jax.checkpoint_files. Which checkpoint a run resumes from,
what happens to damaged ones and to a config that does not fit: cnn_jax.resume, whose entry points
(`restore_latest`, `last_good_step`, ...) are also reachable here, the module the training loop calls.

Kept: the last `keep` checkpoints plus the best by eval top-1 plus the last two saved while the loss was
sane (Orbax preservation policies). Orbax writes each checkpoint into `<step>.orbax-checkpoint-tmp*` and
renames it when complete, so a process killed mid-save leaves only a temporary directory, which the next
start removes. A full or read-only disk is one line (a UserError), not a traceback.

Multi-process: every process calls the same functions in the same order; Orbax coordinates the writes
(each process writes its shards, process 0 the metadata) through the jax.distributed barriers. The
workdir must be one shared filesystem path seen by all processes.
"""

import errno
import functools
import logging
import os
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from cnn_jax import checkpoint_files as files
from cnn_jax import checksum as checksum_lib
from cnn_jax import resume
from cnn_jax.errors import UserError

# The layer's vocabulary, for the callers of this module (train.py, predict.py, tests).
Damaged = files.Damaged
IDENTITY_FIELDS = files.IDENTITY_FIELDS
complete_steps = files.complete_steps
read_host_checkpoint = files.read_host_checkpoint
read_meta = files.read_meta
state_to_tree = files.state_to_tree
tree_to_state = files.tree_to_state
DAMAGED_DIR = resume.DAMAGED_DIR
SUPERSEDED_DIR = resume.SUPERSEDED_DIR
PROTECTED_FIELDS = resume.PROTECTED_FIELDS
check_compatible = resume.check_compatible
config_changes = resume.config_changes
last_good_step = resume.last_good_step
restore_latest = resume.restore_latest

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
  save; on CPU devices, which share host memory, that only adds compile time
  (`tests/test_checkpoint.py::test_a_save_on_cpu_devices_compiles_nothing`), and GPUs Orbax already
  exempts when $JAX_PLATFORMS names them.
  """
  return jax.default_backend() == "tpu"


@functools.cache
def _configure_array_handler() -> None:
  """Registers Orbax's jax.Array handler with `use_replica_parallel()` (once per process)."""
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=use_replica_parallel()), override=True)


def _options(keep: int, async_save: bool) -> ocp.CheckpointManagerOptions:
  policies = ocp.checkpoint_managers
  return ocp.CheckpointManagerOptions(
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


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager of `<workdir>/checkpoints` keeping the last `keep` steps, the best by eval `top1`
  and the last good one.

  Checkpoints whose own Orbax files are damaged (a `metrics` or `_CHECKPOINT_METADATA` that does not parse)
  are first moved to `<workdir>/checkpoints_damaged/` with one line each (cnn_jax.resume): Orbax's manager
  cannot open a directory holding them. async_save: the arrays are copied to host memory before `save`
  returns and written in a background thread while training continues; the next `save` (or `wait`) waits
  for it and re-raises its error. Two runs writing one workdir break Orbax's writes: the workdir lock in
  cnn_jax.train refuses the second.
  """
  if keep < 1:
    raise UserError(f"--config.keep_checkpoints={keep} must be >= 1")
  _configure_array_handler()
  files.drop_closed_loop_reports()
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxNotice())
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  resume.set_aside_unopenable(directory, workdir)
  return ocp.CheckpointManager(directory, options=_options(keep, async_save), item_names=("state", "meta"))


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


# --- Reading a checkpoint as host arrays (prediction, fine-tuning) -------------------------------

def _read_or_explain(directory: str, step: int, flag: str, steps) -> Tuple[Any, Dict[str, Any]]:
  """read_host_checkpoint of a checkpoint named by the user; a damaged one is a UserError naming the
  earlier ones to pass as `flag` instead."""
  try:
    return read_host_checkpoint(directory, step)
  except Damaged as e:
    earlier = [s for s in steps if s < step]
    hint = (f"the earlier ones are {', '.join(map(str, earlier))}: pass {flag}="
            f"{os.path.join(directory, str(earlier[-1]))}" if earlier else "there is no earlier one")
    raise UserError(f"checkpoint {step} in {directory} is damaged ({e}); {hint}") from e


def read_newest_good(directory: str, step: Optional[int], flag: str) -> Tuple[int, Any, Dict[str, Any]]:
  """(step, numpy state tree, meta) of checkpoint `step`, or of the newest good one in `directory`.

  With `step` None, damaged checkpoints are skipped with one warning line each. With an explicit `step`
  that is damaged, the UserError names the earlier checkpoints to pass as `flag`=... instead. A checkpoint
  without checksums (an older run's) is used with one line saying it cannot be verified.
  """
  files.drop_closed_loop_reports()
  steps = complete_steps(directory)
  for candidate in ([step] if step is not None else reversed(steps)):
    try:
      tree, meta = (_read_or_explain(directory, candidate, flag, steps) if step is not None
                    else read_host_checkpoint(directory, candidate))
    except Damaged as e:
      print(f"warning: checkpoint {candidate} in {directory} is damaged ({e}); trying the previous one",
            file=sys.stderr, flush=True)
      continue
    if not files.verifiable(meta):
      print(files.unverifiable_note(candidate, directory), file=sys.stderr, flush=True)
    return candidate, tree, meta
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
  steps = complete_steps(directory)
  if not steps or (step is not None and step not in steps):
    raise UserError(f"--config.init_from={path!r} holds no complete checkpoint")
  step, source, _ = read_newest_good(directory, step, "--config.init_from")

  copied, kept = [], []

  def merge(tree, src, prefix):
    if src is None:
      return tree
    flat_src = {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(src).items()}
    out = {}
    for k, v in traverse_util.flatten_dict(tree).items():
      key = "/".join(map(str, k))
      if key in flat_src and tuple(flat_src[key].shape) == tuple(v.shape):
        out[k] = _to_global(np.asarray(flat_src[key]), v)
        copied.append(prefix + key)
      else:
        out[k] = v
        kept.append(prefix + key)
    return traverse_util.unflatten_dict(out)

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
