r"""Compares finished (or running) workdirs: a verified-identical pipeline, then tables and plots.

  runs = load_runs(['runs/families/*'])
  check_identical(runs)                       # UserError naming the fields when pipelines differ
  paths = write_report(runs, 'reports/families')

How runs are found, read and checked to share one recipe: cnn_jax/compare/runs.py. Here: one row per run and
per architecture, report.md, the CSVs, the plots (plots.py), and the manifest that keeps report.py from
replacing or deleting files it did not write.
"""

import csv
import json
import math
import os
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from cnn_jax.compare.runs import (ALWAYS_ALLOWED, RunRecord, check_identical, covered,  # pylint: disable=unused-import
                                  differing_fields, flatten, load_run, load_runs, recipe_hash, sweep_varies)
from cnn_jax.errors import UserError

TABLE_COLUMNS = (
    "run", "architecture", "model", "seed", "status", "steps", "params", "gflops_per_image",
    "train_img_per_s", "best_top1", "best_top5", "final_top1", "final_top5", "train_eval_top1", "gap_top1",
    "epochs_to_target", "wall_to_target_s", "wall_s", "device", "fingerprint", "workdir",
)
# report.py --target_top1: the first eval at or above it gives 'epochs_to_target' (how long a net takes to train).
DEFAULT_TARGET_TOP1 = 0.9


# --- Rows and groups ------------------------------------------------------------------------------

MAX_LABEL_DETAIL = 60  # longer lists of differing fields are replaced by the run's name in labels


def _model_kwargs_shown(run: RunRecord) -> Dict[str, Any]:
  """The run's model kwargs as configured, with None (= the family's default) replaced by the value the
  run's recorded architecture resolved it to."""
  kwargs = flatten(run.run_info.get("model_kwargs", {}))
  resolved = run.run_info.get("architecture") or {}
  return {k: resolved.get(k) if v is None and k in resolved else v for k, v in kwargs.items()}


def _architecture_labels(runs: Sequence[RunRecord], extra_fields: Sequence[str]) -> Dict[str, str]:
  """'nin', or 'nin (use_1x1=False)' when a model kwarg (or a studied field) tells runs apart.

  A kwarg is shown when the runs that have it are not all configured alike: a family's own switch
  (AlexNet's lrn) that no run changes, or a family default left at None, stays out of every label.
  """
  configured = {r.name: flatten(r.run_info.get("model_kwargs", {})) for r in runs}
  kw = {r.name: _model_kwargs_shown(r) for r in runs}
  keys = sorted({k for d in configured.values() for k in d})
  # Varying as configured (a family's own default is not a study: LeNet's dropout 0 beside AlexNet's 0.5
  # under dropout_rate=None stays out), shown as resolved.
  varying = [k for k in keys
             if len({json.dumps(d[k], sort_keys=True, default=str) for d in configured.values() if k in d}) > 1]
  labels = {}
  for r in runs:
    parts = [f"{k}={kw[r.name][k]}" for k in varying if k in kw[r.name]]
    parts += [f"{k}={r.fields.get(k)}" for k in extra_fields if not covered(k, ALWAYS_ALLOWED)]
    detail = ", ".join(parts)
    if len(detail) > MAX_LABEL_DETAIL:  # e.g. five augmentation fields: the sweep's run name says it better
      detail = r.name
    labels[r.name] = r.model + (f" ({detail})" if detail else "")
  return labels


def _mean(values: Sequence[float]) -> Optional[float]:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def time_to_target(run: RunRecord, target: float) -> Tuple[Optional[float], Optional[float]]:
  """(epoch, seconds since the first record) of the first eval with top-1 >= target; (None, None) if none.

  Seconds are wall time from the run's first metrics record (so they include evals and input start-up, not
  compilation), read off the records' timestamps; for a run resumed before the hit they include the pause.
  """
  hit = next((e for e in run.evals if e.get("top1", -1) >= target), None)
  if hit is None:
    return None, None
  times = [r["time"] for r in run.train + run.evals if "time" in r and r["step"] <= hit["step"]]
  return hit.get("epoch"), (hit["time"] - min(times)) if times and "time" in hit else None


def row(run: RunRecord, architecture: str, target: float = DEFAULT_TARGET_TOP1) -> Dict[str, Any]:
  """One table row; numbers exactly as summary.json has them (from metrics.jsonl while running)."""
  info, s = run.run_info, run.summary
  device = f"{info.get('num_devices', '?')} x {info.get('device_kind', '?')}"
  epochs_to, wall_to = time_to_target(run, target)
  last_train_eval = run.train_evals[-1] if run.train_evals else {}
  common = {"run": run.name, "architecture": architecture, "model": run.model, "seed": run.seed,
            "fingerprint": info.get("fingerprint"), "workdir": run.workdir, "device": device,
            "epochs_to_target": epochs_to, "wall_to_target_s": wall_to,
            "train_eval_top1": last_train_eval.get("top1")}
  if s is not None:
    return {**common, "status": "done", "steps": s.get("steps"), "params": s.get("params"),
            "gflops_per_image": s.get("gflops_per_image"), "train_img_per_s": s.get("train_img_per_s"),
            "best_top1": s.get("best_top1"), "best_top5": s.get("best_top5"),
            "final_top1": s.get("final_top1"), "final_top5": s.get("final_top5"), "wall_s": s.get("wall_s"),
            "train_eval_top1": s.get("train_eval_top1", common["train_eval_top1"]),
            "gap_top1": s.get("gap_top1")}
  last = run.evals[-1] if run.evals else {}
  best = max(run.evals, key=lambda r: r["top1"]) if run.evals else {}
  step = max([r["step"] for r in run.train + run.evals], default=0)
  times = [r["time"] for r in run.train + run.evals if "time" in r]
  flops = info.get("flops_per_example")
  state = "running" if run.running else "stopped"
  return {**common, "status": f"{state} ({step}/{info.get('total_steps', '?')})", "steps": step,
          "params": info.get("params"), "gflops_per_image": flops / 1e9 if flops else None,
          "train_img_per_s": _mean([r.get("img_per_s") for r in run.train]),
          "best_top1": best.get("top1"), "best_top5": best.get("top5"),
          "final_top1": last.get("top1"), "final_top5": last.get("top5"),
          "wall_s": (max(times) - min(times)) if times else None,
          "gap_top1": (last_train_eval["top1"] - last["top1"]) if last_train_eval and last else None}


def _std(values: Sequence[float]) -> float:
  return statistics.stdev(values) if len(values) > 1 else 0.0


GROUP_KEYS = ("params", "gflops_per_image", "train_img_per_s", "best_top1", "best_top5", "final_top1",
              "final_top5", "train_eval_top1", "gap_top1", "epochs_to_target", "wall_to_target_s", "wall_s")


def group_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Mean and std over the runs of each architecture label (seeds of one model + kwargs + recipe)."""
  groups: Dict[str, List[Dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r["architecture"], []).append(r)
  out = []
  for label, members in groups.items():
    # A run still training would drag the mean down: groups average finished runs where there are any.
    done = [m for m in members if m["status"] == "done"]
    members = done or members
    unfinished = "" if done else (" (running)" if any(m["status"].startswith("running") for m in members)
                                  else " (stopped)")
    g = {"architecture": label + unfinished, "model": members[0]["model"],
         "runs": len(members), "seeds": [m["seed"] for m in members]}
    for key in GROUP_KEYS:
      values = [m[key] for m in members if m[key] is not None]
      g[key] = _mean(values)
      g[key + "_std"] = _std(values) if values else None
    out.append(g)
  return out


# --- Output ---------------------------------------------------------------------------------------

def _fmt(value, kind: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  if kind == "int":
    return f"{int(value):,}"
  if kind == "acc":
    return f"{value:.4f}"
  if kind == "gflops":
    return f"{value:.4g}"
  if kind == "rate":
    return f"{value:,.0f}"
  if kind == "epochs":
    return f"{value:.1f}"
  if kind == "time":
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"
  return str(value)


def _pm(mean, std, kind: str, n: int) -> str:
  if mean is None:
    return "–"
  return _fmt(mean, kind) + (f" ± {_fmt(std, kind)}" if n > 1 else "")


def _md_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines]
  return "\n".join(out)


def tensorboard_root(runs: Sequence[RunRecord]) -> str:
  """The folder whose `tensorboard --logdir` shows all `runs` side by side."""
  dirs = [os.path.abspath(r.workdir) for r in runs]
  root = os.path.commonpath(dirs) if len(dirs) > 1 else dirs[0]
  rel = os.path.relpath(root)
  return rel if not rel.startswith("..") else root


def write_report(runs: Sequence[RunRecord], out: str, allowed: Iterable[str] = (),
                 mismatched: Sequence[str] = (), plots: bool = True,
                 target: float = DEFAULT_TARGET_TOP1) -> Dict[str, str]:
  """Writes <out>/report.md, runs.csv, groups.csv and (with `plots`) the PNGs; returns {kind: path}.

  `mismatched`: the unexpected differing fields check_identical returned under --allow_mismatch; they
  open the report as a warning.
  """
  os.makedirs(out, exist_ok=True)
  diffs = differing_fields(runs)
  studied = [k for k in diffs if covered(k, tuple(allowed)) and not covered(k, ALWAYS_ALLOWED)]
  labels = _architecture_labels(runs, studied + list(mismatched))
  rows = [row(r, labels[r.name], target) for r in runs]
  groups = group_rows(rows)
  paths = _write_csvs(rows, groups, out)
  if plots:
    from cnn_jax.compare import plots as plots_lib  # pylint: disable=g-import-not-at-top
    paths.update(plots_lib.write_plots(runs, labels, groups, out))
  has_gap = any(r["train_eval_top1"] is not None for r in rows)
  md = (_md_recipe(runs, diffs, studied, mismatched) + _md_tables(rows, groups, target, has_gap)
        + _md_differences(runs, diffs) + (_md_plots(paths) if plots else [])
        + ["Files: `runs.csv` (one row per run), `groups.csv` (mean/std per architecture). "
           "Params and GFLOPs/image (forward pass, XLA cost analysis) come from each run's summary.json.", ""])
  paths["markdown"] = os.path.join(out, "report.md")
  with open(paths["markdown"], "w") as f:
    f.write("\n".join(md))
  return paths


def _write_csvs(rows: Sequence[Dict[str, Any]], groups: Sequence[Dict[str, Any]], out: str) -> Dict[str, str]:
  """runs.csv (one row per run) and groups.csv (mean/std per architecture); returns their paths."""
  paths = {"csv": os.path.join(out, "runs.csv"), "groups_csv": os.path.join(out, "groups.csv")}
  with open(paths["csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  group_columns = ["architecture", "model", "runs", "seeds"] + [k + s for k in GROUP_KEYS for s in ("", "_std")]
  with open(paths["groups_csv"], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=group_columns)
    writer.writeheader()
    writer.writerows([{**g, "seeds": " ".join(map(str, g["seeds"]))} for g in groups])
  return paths


def _md_recipe(runs: Sequence[RunRecord], diffs, studied, mismatched) -> List[str]:
  """The report's opening: the title, a mismatch warning, TensorBoard, whether the recipe is verified
  identical, the shared recipe and each run's architecture."""
  md = [f"# Comparison of {len(runs)} runs", ""]
  if mismatched:
    md += [f"> **WARNING: these runs do NOT share one pipeline/recipe** (differing: "
           f"{', '.join(mismatched)}). Accuracy differences below mix the network with those changes.", ""]
  no_tb = [r.name for r in runs if not r.tb_events]
  md += [f"TensorBoard shows these runs side by side: `tensorboard --logdir {tensorboard_root(runs)}` (each run "
         "writes its curves to `<workdir>/tb/`)." + (f" **No TensorBoard events in: {', '.join(no_tb)}.**"
                                                    if no_tb else ""), ""]
  other = [k for k in diffs if not covered(k, ALWAYS_ALLOWED)]
  if not other:
    md.append(f"Pipeline and recipe verified identical for all runs: every fingerprint field of run_info.json "
              f"is equal{' apart from the seed' if diffs else ''} (recipe hash without the seed: "
              f"`{recipe_hash(runs[0])}`).")
  else:
    md.append(f"Runs differ in: {', '.join(f'`{k}`' for k in other)}"
              f"{' (studied by the sweep)' if studied and not mismatched else ''}.")
  shared = {k: v for k, v in runs[0].fields.items() if k not in diffs}
  md += ["", "<details><summary>Shared pipeline and recipe</summary>", "",
         _md_table(["field", "value"], [[f"`{k}`", f"`{json.dumps(v, default=str)}`"]
                                        for k, v in sorted(shared.items())]), "", "</details>", ""]
  archs = {r.name: flatten(r.run_info.get("architecture") or {}) for r in runs}
  arch_keys = sorted({k for a in archs.values() for k in a})
  if arch_keys:
    md += ["<details><summary>Architecture of each run (the family's own fields, e.g. its paper's dropout; "
           "allowed to differ between families)</summary>", "",
           _md_table(["run"] + arch_keys, [[r.name] + [f"`{json.dumps(archs[r.name].get(k, '–'), default=str)}`"
                                                      for k in arch_keys] for r in runs]),
           "", "</details>", ""]
  return md


def _md_tables(rows, groups, target: float, has_gap: bool) -> List[str]:
  """The per-run table, the per-architecture table (mean ± std over seeds) and what their columns mean."""
  gap_head = ["train top-1", "gap"] if has_gap else []
  target_head = [f"epochs to ≥{target:g}", f"wall to ≥{target:g}"]
  md = ["## Runs", "", _md_table(
      ["run", "architecture", "status", "params", "GFLOPs/img", "train img/s", "top-1 best",
       "top-1 final", "top-5 best", "top-5 final"] + gap_head + target_head + ["wall", "device"],
      [[r["run"], r["architecture"], r["status"], _fmt(r["params"], "int"),
        _fmt(r["gflops_per_image"], "gflops"), _fmt(r["train_img_per_s"], "rate"),
        _fmt(r["best_top1"], "acc"), _fmt(r["final_top1"], "acc"), _fmt(r["best_top5"], "acc"),
        _fmt(r["final_top5"], "acc")]
       + ([_fmt(r["train_eval_top1"], "acc"), _fmt(r["gap_top1"], "acc")] if has_gap else [])
       + [_fmt(r["epochs_to_target"], "epochs"), _fmt(r["wall_to_target_s"], "time"),
          _fmt(r["wall_s"], "time"), r["device"]] for r in rows]), ""]
  pm = lambda g, key, kind: _pm(g[key], g[key + "_std"], kind, g["runs"])
  md += ["## By architecture (mean ± std over seeds)", "", _md_table(
      ["architecture", "runs", "params", "GFLOPs/img", "train img/s", "top-1 best", "top-1 final",
       "top-5 best", "top-5 final"] + gap_head + target_head + ["wall"],
      [[g["architecture"], g["runs"], _fmt(g["params"], "int"), _fmt(g["gflops_per_image"], "gflops"),
        pm(g, "train_img_per_s", "rate"), pm(g, "best_top1", "acc"), pm(g, "final_top1", "acc"),
        pm(g, "best_top5", "acc"), pm(g, "final_top5", "acc")]
       + ([pm(g, "train_eval_top1", "acc"), pm(g, "gap_top1", "acc")] if has_gap else [])
       + [pm(g, "epochs_to_target", "epochs"), pm(g, "wall_to_target_s", "time"), pm(g, "wall_s", "time")]
       for g in groups]), ""]
  notes = [f"*epochs/wall to ≥{target:g}*: the first eval whose test top-1 reaches {target:g} (– never); wall "
           "is from the run's first metrics record (evals included, compilation not)."]
  if has_gap:
    notes.append("*train top-1*: top-1 on the run's `eval_train_split` (the images it trains on) with eval "
                 "preprocessing, no augmentation or dropout; *gap* = train top-1 − test top-1 (final). "
                 "A larger gap is more overfitting.")
  return md + [" ".join(notes), ""]


def _md_differences(runs: Sequence[RunRecord], diffs) -> List[str]:
  if not diffs:
    return []
  names = [r.name for r in runs]
  return ["## What differs between runs", "", _md_table(
      ["field"] + names, [[f"`{k}`"] + [f"`{json.dumps(v[n], default=str)}`" for n in names]
                          for k, v in diffs.items()]), ""]


def _md_plots(paths: Mapping[str, str]) -> List[str]:
  md = ["## Plots", ""]
  md += [f"![{title}]({os.path.basename(paths[k])})" + "\n"
         for k, title in (("top1_vs_epoch", "test top-1 vs epoch"), ("top1_vs_params", "top-1 vs parameters"),
                          ("top1_vs_flops", "top-1 vs FLOPs"), ("train_vs_test", "train vs test"),
                          ("grad_norms", "grad norms")) if k in paths]
  if "top1_vs_epoch" not in paths:
    md += ["*No accuracy plots: none of these runs has evaluated yet (the first eval comes after "
           "`eval_every_epochs`, 1 epoch by default).*", ""]
  return md


MANIFEST = ".report.json"  # in a report's folder: the runs it compared and the files it wrote


def read_manifest(out: str) -> Optional[Dict[str, Any]]:
  try:
    with open(os.path.join(out, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) else None


def check_out(out: str, runs: Sequence[RunRecord], overwrite: bool) -> Optional[Dict[str, Any]]:
  """The previous manifest of `out`; UserError if writing there would replace a report of other runs (or
  files that no report wrote) without `overwrite`."""
  if not os.path.isdir(out) or not os.listdir(out):
    return None
  manifest = read_manifest(out)
  workdirs = sorted(os.path.abspath(r.workdir) for r in runs)
  if overwrite or (manifest is not None and manifest.get("runs") == workdirs):
    return manifest
  what = ("a report of other runs" if manifest is not None else
          f"files that report.py did not write ({', '.join(sorted(os.listdir(out))[:4])}, ...)")
  raise UserError(f"--out={out} already holds {what}; pass another --out (e.g. runs/report), or "
                  "--overwrite=true to replace it")


def write_manifest(out: str, runs: Sequence[RunRecord], paths: Mapping[str, str]) -> None:
  manifest = {"runs": sorted(os.path.abspath(r.workdir) for r in runs),
              "files": sorted(os.path.basename(p) for p in paths.values())}
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)


def report(patterns: Sequence[str], out: str, expect_identical: bool = True, allow_mismatch: bool = False,
           allowed: Sequence[str] = (), plots: bool = True, log=print,
           target: float = DEFAULT_TARGET_TOP1, overwrite: bool = False) -> Dict[str, str]:
  """The whole of report.py: load, verify, write. Returns the written paths.

  `out` must be empty, or hold this same set of runs' earlier report (its manifest says so), unless
  `overwrite`; only files an earlier report wrote (its manifest lists them) are ever removed.
  """
  runs = load_runs(patterns)
  previous = check_out(out, runs, overwrite)
  allowed = tuple(allowed) + sweep_varies(runs)
  mismatched = []
  if expect_identical:
    mismatched = check_identical(runs, allowed, allow_mismatch=allow_mismatch)
    for field in mismatched:
      log(f"WARNING: runs differ in {field}: {differing_fields(runs)[field]}")
  paths = write_report(runs, out, allowed=allowed if expect_identical else tuple(differing_fields(runs)),
                       mismatched=mismatched, plots=plots, target=target)
  for name in set((previous or {}).get("files") or []) - {os.path.basename(p) for p in paths.values()}:
    stale = os.path.join(out, os.path.basename(name))  # e.g. a plot this report has nothing for
    if os.path.isfile(stale):
      os.remove(stale)
  write_manifest(out, runs, paths)
  no_tb = [r.name for r in runs if not r.tb_events]
  if no_tb:
    log(f"WARNING: no TensorBoard events in {', '.join(no_tb)}")
  log(f"{len(runs)} runs -> {paths['markdown']}, {paths['csv']}"
      + (f", {len(paths) - 3} plots" if plots else ""))
  log(f"TensorBoard: tensorboard --logdir {tensorboard_root(runs)}")
  return paths
