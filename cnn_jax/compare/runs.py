"""The runs a comparison reads: workdirs found from globs, read back, and checked to share one recipe.

Reads only what the loop writes (docs/design.md, "Workdir"): run_info.json (model, params, FLOPs, device,
fingerprint fields), summary.json (final/best accuracy, throughput, wall time) and metrics.jsonl (the eval
curve). A run without summary.json is read from its metrics.jsonl and is running (its process still holds
the workdir) or stopped.

The recipe (run_info.json `fingerprint_fields`) must agree; the architecture (`architecture`, the
family's own defaults such as its paper's dropout) is recorded per run and may differ between families.
"""

import dataclasses
import glob
import hashlib
import json
import os
import socket
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from cnn_jax.errors import UserError

# Fields expected to differ between runs being compared: the seed is replication, not a pipeline change.
ALWAYS_ALLOWED = ("seed",)


@dataclasses.dataclass
class RunRecord:
  """One workdir as the comparison sees it."""
  name: str
  workdir: str
  run_info: Dict[str, Any]
  summary: Optional[Dict[str, Any]]
  evals: List[Dict[str, Any]]          # metrics.jsonl records with split == 'eval', in step order
  train: List[Dict[str, Any]]          # metrics.jsonl records with split == 'train'
  tb_events: List[str]                 # TensorBoard event files under tb/
  train_evals: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # split == 'train_eval'

  @property
  def finished(self) -> bool:
    return self.summary is not None

  @property
  def model(self) -> str:
    return self.run_info.get("model", "?")

  @property
  def seed(self):
    return self.run_info.get("fingerprint_fields", {}).get("seed")

  @property
  def fields(self) -> Dict[str, Any]:
    """The pipeline + recipe fingerprint fields, flattened to dotted leaves."""
    return flatten(self.run_info.get("fingerprint_fields", {}))

  @property
  def running(self) -> bool:
    """True while the run's process still holds its workdir (its `.lock` names a live process here)."""
    return self.summary is None and workdir_in_use(self.workdir)


def workdir_in_use(workdir: str) -> bool:
  """Whether the process named in <workdir>/.lock ('pid N on HOST') is alive on this host.

  A run writes that line when it takes the workdir's lock and its process holds the lock until it ends.
  A lock from another host cannot be checked from here: counted as in use (the run may be going on).
  """
  try:
    with open(os.path.join(workdir, ".lock")) as f:
      holder = f.read().split()
  except OSError:
    return False
  if len(holder) < 4 or holder[0] != "pid" or not holder[1].isdigit():
    return False
  if holder[3] != socket.gethostname():
    return True
  try:
    os.kill(int(holder[1]), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, owned by someone else
  return True


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read {path} ({e}); is the file complete?") from e


def _read_metrics(path: str) -> List[Dict[str, Any]]:
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut short by a killed run: the rest is still good
  return records


def load_run(workdir: str, name: Optional[str] = None) -> RunRecord:
  """Reads one workdir; UserError if it holds no run_info.json (not a run, or not started)."""
  info = _read_json(os.path.join(workdir, "run_info.json"))
  if info is None:
    raise UserError(f"{workdir} has no run_info.json: not a cnn_jax workdir, or the run has not started")
  records = _read_metrics(os.path.join(workdir, "metrics.jsonl"))
  # A resumed run may log a step twice (work after the last checkpoint is redone): keep the latest.
  evals = {r["step"]: r for r in records if r.get("split") == "eval"}
  train = {r["step"]: r for r in records if r.get("split") == "train"}
  train_evals = {r["step"]: r for r in records if r.get("split") == "train_eval"}
  tb = sorted(glob.glob(os.path.join(workdir, "tb", "**", "events.out.tfevents*"), recursive=True))
  return RunRecord(name=name or os.path.basename(os.path.normpath(workdir)), workdir=workdir, run_info=info,
                   summary=_read_json(os.path.join(workdir, "summary.json")),
                   evals=[evals[s] for s in sorted(evals)], train=[train[s] for s in sorted(train)],
                   tb_events=tb, train_evals=[train_evals[s] for s in sorted(train_evals)])


def find_workdirs(patterns: Iterable[str]) -> List[str]:
  """Expands globs; a folder without run_info.json whose children have one stands for those children."""
  found = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise UserError(f"--runs={pattern!r} matches nothing")
    for path in matches:
      if not os.path.isdir(path):
        if not glob.has_magic(pattern):
          raise UserError(f"--runs: {path!r} is not a directory")
        continue  # e.g. sweep.json next to the run folders
      if os.path.exists(os.path.join(path, "run_info.json")):
        found.append(os.path.normpath(path))
        continue
      children = sorted(os.path.normpath(os.path.join(path, c)) for c in os.listdir(path)
                        if os.path.exists(os.path.join(path, c, "run_info.json")))
      if children:
        found.extend(children)
      elif not glob.has_magic(pattern):
        raise UserError(f"{path} has no run_info.json and no run folders below it")
  return list(dict.fromkeys(found))  # de-duplicated, order kept


def load_runs(patterns: Iterable[str]) -> List[RunRecord]:
  """The runs under `patterns` (globs, workdirs or sweep roots), named uniquely."""
  workdirs = find_workdirs(patterns)
  if not workdirs:
    raise UserError("no runs found (a run is a folder with run_info.json); check --runs")
  names = [os.path.basename(w) for w in workdirs]
  if len(set(names)) < len(names):  # runs from several roots: name them by their path below the common root
    root = os.path.commonpath([os.path.abspath(w) for w in workdirs])
    names = [os.path.relpath(os.path.abspath(w), root) for w in workdirs]
  return [load_run(w, n) for w, n in zip(workdirs, names)]


def sweep_varies(runs: Sequence[RunRecord]) -> Tuple[str, ...]:
  """The fields a sweep declared as studied (sweep.json in the runs' common parent), else ()."""
  parents = {os.path.dirname(os.path.abspath(r.workdir)) for r in runs}
  if len(parents) != 1:
    return ()
  record = _read_json(os.path.join(parents.pop(), "sweep.json"))
  return tuple(record.get("varies", ())) if record else ()


def differing_fields(runs: Sequence[RunRecord]) -> Dict[str, Dict[str, Any]]:
  """{dotted fingerprint field: {run name: value}} for every field whose value is not the same in all runs."""
  flat = {r.name: r.fields for r in runs}
  keys = sorted({k for f in flat.values() for k in f})
  out = {}
  for k in keys:
    values = {name: f.get(k, "<missing>") for name, f in flat.items()}
    if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
      out[k] = values
  return out


def recipe_hash(run: RunRecord) -> str:
  """16 hex chars over the fingerprint fields except the seed: equal for every seed of one recipe."""
  fields = {k: v for k, v in run.run_info.get("fingerprint_fields", {}).items() if k not in ALWAYS_ALLOWED}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def covered(field: str, allowed: Iterable[str]) -> bool:
  """'optimizer.learning_rate' is covered by 'optimizer.learning_rate', 'optimizer' or 'learning_rate'?"""
  for a in allowed:
    if field == a or field.startswith(a + ".") or a.startswith(field + "."):
      return True
  return False


def check_identical(runs: Sequence[RunRecord], allowed: Iterable[str] = (),
                    allow_mismatch: bool = False) -> List[str]:
  """Verifies the runs share one pipeline and recipe, apart from `allowed` fields and the seed.

  Returns the unexpected differing fields (empty when identical). Raises UserError listing them, unless
  `allow_mismatch`, in which case the caller must flag them loudly.
  """
  allowed = tuple(allowed) + ALWAYS_ALLOWED
  diffs = {k: v for k, v in differing_fields(runs).items() if not covered(k, allowed)}
  if diffs and not allow_mismatch:
    parts = []
    for field, values in diffs.items():
      by_value = {}
      for name, v in values.items():
        by_value.setdefault(json.dumps(v, default=str), []).append(name)
      parts.append(f"{field} (" + "; ".join(f"{v}: {', '.join(n[:3])}{' ...' if len(n) > 3 else ''}"
                                          for v, n in by_value.items()) + ")")
    raise UserError(f"these runs do not share one pipeline/recipe, so their accuracies are not comparable; "
                    f"differing fields: {' | '.join(parts)}. Compare runs of one recipe, or pass "
                    "--allow_mismatch to report anyway with a warning")
  return list(diffs)
