r"""Sweeps: one base config, a list of named runs that each override a few dotted fields.

A sweep file (``configs/sweeps/NAME.py``) defines ``get_sweep(arg=None)`` returning
``(base, runs)``: ``base`` is a config spec such as ``'configs/common.py:small'`` and ``runs`` a list of
``(name, {dotted.field: value})`` pairs (or dicts with 'name' and 'overrides'). Every run trains in
``<root>/<name>``; because the loop resumes from a workdir's checkpoints, running a sweep again continues
partial runs and skips finished ones (a ``summary.json`` whose pipeline fingerprint matches).

  sweep = load_sweep('configs/sweeps/families.py:seeds=2')
  config = run_config(sweep, sweep.runs[0])            # base config + that run's overrides
  run_sweep(sweep, 'runs/families', only='nin')        # trains the NiN runs one after another
"""

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections

from cnn_jax.compare.runs import flatten
from cnn_jax.errors import UserError
from cnn_jax.fingerprint import fingerprint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP_FILE = "sweep.json"  # written into the sweep root: what report.py reads to know what was varied


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its workdir name under the root and its dotted config overrides."""
  name: str
  overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded sweep file: the spec it came from, the base config spec and the runs."""
  spec: str
  base: str
  runs: Tuple[Run, ...]

  @property
  def varies(self) -> Tuple[str, ...]:
    """Dotted fields the sweep studies: overridden with different values (or only in some runs)."""
    keys = sorted({k for r in self.runs for k in r.overrides})
    out = []
    for k in keys:
      values = {json.dumps(r.overrides.get(k, "<unset>"), sort_keys=True, default=str) for r in self.runs}
      if len(values) > 1:
        out.append(k)
    return tuple(out)


def _split_spec(spec: str) -> Tuple[str, Optional[str]]:
  """'configs/x.py:a=1,b' -> ('configs/x.py', 'a=1,b'); the arg is None without a colon."""
  if ".py:" in spec:
    path, arg = spec.split(".py:", 1)
    return path + ".py", arg
  return spec, None


def _resolve(path: str) -> str:
  """An existing file: as given (relative to the working directory), else relative to the repo."""
  for candidate in (path, os.path.join(REPO, path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise UserError(f"no such config/sweep file {path!r} (looked in {os.getcwd()} and {REPO})")


def _load_module(path: str):
  """Imports a Python file by path; the repo root goes on sys.path so `from configs import common` works."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  name = "_cnn_jax_file_" + hashlib.sha1(path.encode()).hexdigest()[:12]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a spec 'path.py[:arg]' (calls the file's get_config(arg), as config_flags does)."""
  path, arg = _split_spec(spec)
  module = _load_module(_resolve(path))
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} defines no get_config(arg); is it a config file?")
  try:
    return module.get_config(arg) if arg is not None else module.get_config()
  except ValueError as e:  # common.get_config rejects unknown args with a ValueError
    raise UserError(f"config {spec!r}: {str(e).splitlines()[0]}") from e


def _parse_runs(runs, spec: str) -> Tuple[Run, ...]:
  out = []
  for r in runs:
    if isinstance(r, Run):
      out.append(r)
    elif isinstance(r, Mapping):
      out.append(Run(str(r["name"]), dict(r.get("overrides", {}))))
    else:
      name, overrides = r
      out.append(Run(str(name), dict(overrides)))
  names = [r.name for r in out]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise UserError(f"sweep {spec!r} names several runs {dupes}; run names must be unique (they are workdirs)")
  bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", n)]
  if bad:
    raise UserError(f"sweep {spec!r}: run names {bad} are not usable as directory names")
  return tuple(out)


def load_sweep(spec: str) -> Sweep:
  """Loads 'configs/sweeps/NAME.py[:arg]' by calling its get_sweep(arg) -> (base spec, runs)."""
  path, arg = _split_spec(spec)
  module = _load_module(_resolve(path))
  if not hasattr(module, "get_sweep"):
    raise UserError(f"{path} defines no get_sweep(arg); is it a sweep file?")
  try:
    base, runs = module.get_sweep(arg) if arg is not None else module.get_sweep()
  except ValueError as e:
    raise UserError(f"sweep {spec!r}: {str(e).splitlines()[0]}") from e
  runs = _parse_runs(runs, spec)
  if not runs:
    raise UserError(f"sweep {spec!r} defines no runs")
  return Sweep(spec=spec, base=base, runs=runs)


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
  """['data_dir=/x', 'num_train_steps=10'] -> {'data_dir': '/x', 'num_train_steps': 10} (literals parsed)."""
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set=data_dir=/data/tfds")
    if value.strip() in ("...", "Ellipsis"):  # Python would read '...' as Ellipsis: a copied placeholder
      raise UserError(f"--set {item!r}: '...' is a placeholder; put the real value there, e.g. "
                      f"--set={key.strip()}=/data/tfds")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value  # a bare string such as a path
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set; unknown fields and wrong types raise UserError."""
  # copy.deepcopy, not ConfigDict(config): that copy shares the FieldReferences of placeholder fields
  # (data_dir, init_from, ...), so setting one there would change the caller's config too.
  config = copy.deepcopy(config)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if node is None:
        break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise UserError(f"override {dotted}={value!r}: the config has no field {dotted!r}")
    if isinstance(value, Mapping) and isinstance(node[leaf], ml_collections.ConfigDict):
      node[leaf].update(value)
      continue
    try:
      node[leaf] = value
    except TypeError as e:
      raise UserError(f"override {dotted}={value!r}: {str(e).splitlines()[0]}") from e
  return config


def run_config(sweep: Sweep, run: Run, extra: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """The base config with the run's overrides, then `extra` (e.g. data_dir) on top."""
  config = apply_overrides(load_config(sweep.base), run.overrides)
  return apply_overrides(config, dict(extra or {}))


def identity_of(config) -> Dict[str, Any]:
  """What a finished workdir must match to count as this run: model, model_kwargs and the fingerprint."""
  fields = fingerprint(config)["fields"]
  kwargs = config.model_kwargs.to_dict() if hasattr(config.model_kwargs, "to_dict") else config.model_kwargs
  return json.loads(json.dumps({"model": config.model, "model_kwargs": kwargs, **fields},
                               sort_keys=True, default=str))


def _last_checkpoint_step(workdir: str) -> Optional[int]:
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps) if steps else None


def run_status(workdir: str, config) -> Tuple[str, Optional[int]]:
  """('new' | 'partial' | 'done', last step) of `workdir` for `config`.

  Raises UserError when the workdir holds a different run (its run_info.json records another model or
  pipeline): resuming its checkpoints would silently mix two recipes.
  """
  info_path = os.path.join(workdir, "run_info.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      info = json.load(f)
    if config.get("input", "auto") == "auto" and info.get("input"):
      # A run records the mode 'auto' chose (device or host); either one is this run.
      config = copy.deepcopy(config)
      config.input = info["input"]
    recorded = json.loads(json.dumps({"model": info.get("model"), "model_kwargs": info.get("model_kwargs"),
                                      **info.get("fingerprint_fields", {})}, sort_keys=True, default=str))
    wanted = identity_of(config)
    a, b = flatten(recorded), flatten(wanted)
    diffs = [f"{k}: {a.get(k)!r} there vs {b.get(k)!r} now" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    if diffs:
      raise UserError(f"{workdir} holds a different run ({'; '.join(diffs[:6])}"
                      f"{'; ...' if len(diffs) > 6 else ''}); delete it or use another --root")
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if summary.get("fingerprint") == fingerprint(config)["hash"] and summary.get("model") == config.model:
      return "done", summary.get("steps")
  step = _last_checkpoint_step(workdir)
  return ("partial", step) if step is not None else ("new", None)


def _flag_value(value: Any) -> str:
  """How config_flags reads a value back: tuples/lists as Python literals, the rest as str()."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def train_command(sweep: Sweep, run: Run, root: str, extra: Optional[Mapping[str, Any]] = None,
                  python: str = "python") -> str:
  """The shell command that trains `run` with train.py (for a cluster scheduler, one line per run)."""
  overrides = flatten({**run.overrides, **dict(extra or {})})
  args = [python, "train.py", f"--config={sweep.base}", f"--workdir={os.path.join(root, run.name)}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args)


def select(sweep: Sweep, only: Optional[str]) -> List[Run]:
  """The runs whose name matches the regex `only` (all when None); UserError when none does."""
  if not only:
    return list(sweep.runs)
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise UserError(f"--only={only!r} is not a valid regular expression ({e})") from e
  runs = [r for r in sweep.runs if pattern.search(r.name)]
  if not runs:
    raise UserError(f"--only={only!r} matches none of the runs: {', '.join(r.name for r in sweep.runs)}")
  return runs


def write_sweep_file(sweep: Sweep, root: str) -> str:
  """Records the sweep (spec, base, runs, studied fields) in <root>/sweep.json for report.py."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, SWEEP_FILE)
  record = {"sweep": sweep.spec, "base": sweep.base, "varies": list(sweep.varies),
            "runs": [{"name": r.name, "overrides": dict(r.overrides)} for r in sweep.runs]}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
  return path


def run_sweep(sweep: Sweep, root: str, only: Optional[str] = None,
              extra: Optional[Mapping[str, Any]] = None, dry_run: bool = False,
              log=print) -> Dict[str, str]:
  """Trains the selected runs one after another in <root>/<name>; returns {name: outcome}.

  Outcomes: 'skipped (done)', 'trained', 'resumed from step N', 'failed: ...' (NaN/Inf; the next run
  still starts), 'stopped' (SIGTERM/Ctrl-C: the sweep stops; run the command again to continue), and in a
  dry run 'would train' / 'would resume from step N'. Every config is built and checked before anything
  trains, so a bad override fails at once.
  """
  runs = select(sweep, only)
  configs = {r.name: run_config(sweep, r, extra) for r in runs}
  status = {r.name: run_status(os.path.join(root, r.name), configs[r.name]) for r in runs}
  outcomes = {}
  if dry_run:
    for r in runs:
      state, step = status[r.name]
      outcomes[r.name] = {"done": "skipped (done)", "partial": f"would resume from step {step}",
                          "new": "would train"}[state]
      log(f"{r.name:24s} {outcomes[r.name]:28s} {flatten(dict(r.overrides))}")
    return outcomes

  from cnn_jax import train  # pylint: disable=g-import-not-at-top  (JAX start-up only when training)
  write_sweep_file(sweep, root)
  for i, r in enumerate(runs):
    state, step = status[r.name]
    if state == "done":
      outcomes[r.name] = "skipped (done)"
      log(f"[{i + 1}/{len(runs)}] {r.name}: finished already, skipped")
      continue
    log(f"[{i + 1}/{len(runs)}] {r.name}: {'resuming from step %d' % step if step else 'training'}")
    try:
      summary = train.train_and_evaluate(configs[r.name], os.path.join(root, r.name))
    except train.NonFiniteError as e:
      outcomes[r.name] = f"failed: {str(e).splitlines()[0]}"
      log(f"{r.name} failed: {e}")
      continue
    if "stopped" in summary:
      outcomes[r.name] = "stopped"
      log(f"sweep stopped during {r.name}; run the same command again to continue")
      break
    outcomes[r.name] = f"resumed from step {step}" if step else "trained"
  return outcomes
