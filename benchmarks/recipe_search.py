r"""The recipe search, stage by stage: each stage is one `sweep.py` run of configs/sweeps/recipe.py (a part of the
recipe varied for AlexNet, VGG-11 and NiN at once) and one `report.py` report; the value with the best mean
hold-out top-1 over the families becomes the base of the next stage (means within --tie of the best are ties,
won by the value listed first: list the cheaper or more conventional values first).

  python benchmarks/recipe_search.py --dataset=folder:/data/cifar10 --root=runs/recipe_search \
      --out=runs/recipe_search/report --set=eval_split=holdout:10%     # the search of docs/results/recipe_search
  python benchmarks/recipe_search.py ... --stages=batch=128+64+32,lr=0.0125+0.025+0.05,ema@3=0+0.99+0.999

A stage is STAGE=values or STAGE@EPOCHS=values (that stage's runs train for EPOCHS instead of --epochs: the
parts of a recipe that act late, such as weight averaging, are compared over longer runs).

Writes <out>/search.md (one table per stage, the commands that ran it, the chosen value) and <out>/search.json;
<root>/<stage>/ holds the runs (rerunning resumes them, finished runs are skipped) and <out>/<stage>/ each
stage's report.py report. A stage's run at the base value is the previous stage's winner: when both stages train for the same
epochs it is not trained again, its numbers are reused (marked "(base)").
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags

_DATASET = flags.DEFINE_string("dataset", None, "The data to search on, e.g. folder:/data/cifar10.")
_ROOT = flags.DEFINE_string("root", "runs/recipe_search", "Folder of the stages' sweep roots.")
_OUT = flags.DEFINE_string("out", None, "Folder for search.md, search.json and the stages' reports.")
_EPOCHS = flags.DEFINE_float("epochs", 1, "Epochs of every search run.")
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE for every run (sweep.py --set).")
# The starting recipe, every searched field explicit, so that the search reproduces whatever configs/common.py's
# defaults become (the shared recipe's defaults before the search, with the base guesses of the issue that asked
# for it: Nesterov, linear-to-zero after a short warmup, label smoothing 0.1, LR 0.025 at batch 128).
_BASE = flags.DEFINE_list("base", [
    "optimizer.learning_rate=0.025", "batch_size=128", "schedule.name=linear", "schedule.warmup_epochs=0.25",
    "optimizer.nesterov=True", "optimizer.label_smoothing=0.1", "optimizer.weight_decay=0.0005", "augment.pad=4",
    "optimizer.ema_decay=0.0", "eval_flip=False"], "The starting recipe: fields of configs/common.py.")
_STAGES = flags.DEFINE_list("stages", [
    "batch=128+64+32", "lr=0.025+0.0125+0.05+0.1", "warmup=0.25+0.1+0.5", "schedule=linear+cosine+onecycle",
    "smoothing=0.1+0+0.2", "nesterov=True+False", "decay=5e-4+1e-4+1e-3", "pad@3=4+2+0", "ema@3=0+0.99+0.999",
    "flip@3=False+True"], "STAGE[@EPOCHS]=values, in order (configs/sweeps/recipe.py's stages); the first value of "
    "each is the conventional one, which wins ties.")
_MODELS = flags.DEFINE_string("models", "alexnet+vgg11+nin", "Families (sweep arg models=).")
_TIE = flags.DEFINE_float("tie", 0.005, "Mean top-1 differences up to this are ties, won by the value listed first "
                          "(list a stage's values cheapest or most conventional first). 0.005: about the spread "
                          "between seeds of one 1-epoch run on a 5,000-image hold-out.")
flags.mark_flags_as_required(["dataset", "out"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(text):
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _default(field: str):
  """configs/common.py's value of a dotted field: a stage's base value when no earlier stage set it."""
  from configs import common  # pylint: disable=g-import-not-at-top
  node = common.get_config("small")
  for part in field.split("."):
    node = node[part]
  return node


def _fmt(value) -> str:
  return str(value)


def _summaries(root: str):
  """{run name: summary.json} of the finished runs under `root`."""
  out = {}
  for path in glob.glob(os.path.join(root, "*", "summary.json")):
    with open(path) as f:
      out[os.path.basename(os.path.dirname(path))] = json.load(f)
  return out


def _run(cmd, log):
  log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
  log.flush()
  proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"{cmd[1]} failed with status {proc.returncode} (see {log.name})")


def main(argv):
  del argv
  from configs.sweeps import recipe  # pylint: disable=g-import-not-at-top
  os.makedirs(_OUT.value, exist_ok=True)
  base = dict(item.split("=", 1) for item in _BASE.value)
  models = _MODELS.value.split("+")
  results, md = [], ["# The recipe search", "",
                     f"Each stage varies one part of the shared recipe for {', '.join(models)} at once ({_EPOCHS.value:g} "
                     f"epoch(s) per run unless the stage says otherwise, `{_DATASET.value}`, {' '.join(_SET.value)}); the value with the best mean "
                     f"top-1 over the families becomes the base of the next stage; means within {_TIE.value:g} of the best are "
                     "ties, won by the value listed first (the cheaper or more conventional one).", ""]
  previous = None  # (field, value, {model: summary}, epochs) of the last stage's winner
  with open(os.path.join(_OUT.value, "search.log"), "a") as log:
    for item in _STAGES.value:
      stage, values = item.split("=", 1)
      stage, _, stage_epochs = stage.partition("@")
      epochs = float(stage_epochs or _EPOCHS.value)
      field = recipe.STAGES[stage][0]
      values = [_value(v) for v in values.split("+")]
      current = _value(base[field]) if field in base else _default(field)
      reuse = previous is not None and previous[3] == epochs
      todo = [v for v in values if not (reuse and v == current)]
      arg = ",".join([f"stage={stage}", "values=" + "+".join(_fmt(v) for v in todo), f"models={_MODELS.value}",
                      f"epochs={epochs:g}", f"dataset={_DATASET.value}"]
                     + [f"{k}={v}" for k, v in base.items() if k != field])
      root = os.path.join(_ROOT.value, stage + (f"_e{epochs:g}" if stage_epochs else ""))
      sweep_cmd = [sys.executable, "sweep.py", f"--sweep=configs/sweeps/recipe.py:{arg}", f"--root={root}"] + [
          f"--set={s}" for s in _SET.value]
      t0 = time.time()
      _run(sweep_cmd, log)
      report_cmd = [sys.executable, "report.py", f"--runs={root}/*", f"--out={os.path.join(_OUT.value, stage)}",
                    "--overwrite=true", "--target_top1=0.5"]
      _run(report_cmd, log)
      found = _summaries(root)
      table = {}
      for v in values:
        if v in todo:
          table[v] = {m: found.get(f"{m}_{stage}{v}_s0") for m in models}
        else:
          table[v] = dict(previous[2])
      score = {v: sum(s["best_top1"] if field == "num_epochs" else s["final_top1"] for s in runs.values()) / len(runs)
               for v, runs in table.items() if all(runs.values())}
      top = max(score.values())
      best = next(v for v in values if v in score and score[v] >= top - _TIE.value)
      base[field] = _fmt(best)
      previous = (field, best, table[best], epochs)
      results.append({"stage": stage, "field": field, "epochs": epochs, "values": values, "chosen": best,
                      "minutes": (time.time() - t0) / 60,
                      "top1": {_fmt(v): {m: (s or {}).get("final_top1") for m, s in runs.items()} for v, runs in table.items()},
                      "command": " ".join(shlex.quote(c) for c in sweep_cmd[1:])})
      md += [f"## {stage}: `{field}`, {epochs:g} epoch(s)", "", f"`python {results[-1]['command']}`", "",
             "| value | " + " | ".join(models) + " | mean |", "|---" * (len(models) + 2) + "|"]
      for v, runs in table.items():
        cells = [f"{runs[m]['final_top1']:.4f}" if runs.get(m) else "–" for m in models]
        mark = " **(chosen)**" if v == best else ""
        reused = " (base)" if v not in todo else ""
        md.append(f"| {_fmt(v)}{reused}{mark} | " + " | ".join(cells) + f" | {score.get(v, float('nan')):.4f} |")
      md += ["", f"Report: [{stage}/report.md]({stage}/report.md)", ""]
      with open(os.path.join(_OUT.value, "search.md"), "w") as f:
        f.write("\n".join(md + ["## The recipe found", "", "`" + " ".join(f"--config.{k}={v}" for k, v in base.items())
                                + "`", ""]))
      with open(os.path.join(_OUT.value, "search.json"), "w") as f:
        json.dump({"dataset": _DATASET.value, "epochs": _EPOCHS.value, "set": _SET.value, "stages": results,
                   "recipe": base}, f, indent=2, default=str)
  print(f"recipe: {base}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  app.run(main)
