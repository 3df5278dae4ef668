"""report.py on hand-written run folders (no training): labels, run status, empty runs, readable plots."""

import json
import os
import socket
import subprocess

import pytest

from cnn_jax.compare import plots
from cnn_jax.compare import report as report_lib
from cnn_jax.errors import UserError

RECIPE = {"dataset": "fashion_mnist", "image_size": 32, "seed": 0, "optimizer": {"learning_rate": 0.01},
          "num_epochs": 12}


def make_run(root, name, model, params, gflops, top1s=(), kwargs=None, finished=True, total_steps=100,
             lock=None, recipe=None):
  """A workdir as the loop writes it: run_info.json, metrics.jsonl (one eval per epoch), summary.json."""
  workdir = os.path.join(str(root), name)
  os.makedirs(workdir)
  kwargs = {"width": 0.25, "dropout_rate": None, **(kwargs or {})}
  arch = {"model": model, **{k: v for k, v in kwargs.items() if v is not None}}
  arch.setdefault("dropout_rate", 0.0 if model == "lenet" else 0.5)
  info = {"model": model, "model_kwargs": kwargs, "architecture": arch, "params": params,
          "flops_per_example": gflops * 1e9, "total_steps": total_steps, "num_devices": 1,
          "device_kind": "cpu", "fingerprint": "f", "fingerprint_fields": dict(recipe or RECIPE)}
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for epoch, top1 in enumerate(top1s, 1):
      f.write(json.dumps({"split": "train", "step": epoch * 10 - 5, "time": 100.0 + epoch, "loss": 1.0,
                          "img_per_s": 500.0}) + "\n")
      f.write(json.dumps({"split": "eval", "step": epoch * 10, "time": 101.0 + epoch, "top1": top1,
                          "top5": 0.99, "loss": 0.5, "epoch": float(epoch)}) + "\n")
  if finished:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"model": model, "params": params, "gflops_per_image": gflops, "final_top1": top1s[-1],
                 "final_top5": 0.99, "best_top1": max(top1s), "best_top5": 0.99, "steps": total_steps,
                 "train_img_per_s": 500.0, "wall_s": 60.0}, f)
  if lock:
    with open(os.path.join(workdir, ".lock"), "w") as f:
      f.write(lock)
  return workdir


def _families(root):
  """The shape of the published comparison: four families, AlexNet with its own switches."""
  make_run(root, "alexnet_s0", "alexnet", 1_883_626, 0.0349, (0.78, 0.9068), {"lrn": False, "groups": 1})
  make_run(root, "vgg11_s0", "vgg11", 1_769_066, 0.0187, (0.76, 0.8995))
  make_run(root, "nin_s0", "nin", 131_542, 0.0286, (0.49, 0.8809))
  make_run(root, "lenet_s0", "lenet", 83_126, 0.0017, (0.70, 0.8610), {"width": 1.0})
  return root


def test_labels_show_only_what_tells_runs_apart(tmp_path):
  runs = report_lib.load_runs([str(_families(tmp_path / "families"))])
  labels = report_lib._architecture_labels(runs, [])  # pylint: disable=protected-access
  assert labels["alexnet_s0"] == "alexnet (width=0.25)" and labels["lenet_s0"] == "lenet (width=1.0)"
  assert not any("None" in l or "lrn" in l or "groups" in l or "dropout" in l for l in labels.values()), labels
  # A studied architecture field shows its resolved value, also where it was left at the default.
  root = tmp_path / "dropout"
  make_run(root, "a_default", "alexnet", 1, 0.1, (0.8,), {"dropout_rate": None})
  make_run(root, "a_0", "alexnet", 1, 0.1, (0.85,), {"dropout_rate": 0.0})
  labels = report_lib._architecture_labels(report_lib.load_runs([str(root)]), [])  # pylint: disable=protected-access
  assert labels == {"a_default": "alexnet (dropout_rate=0.5)", "a_0": "alexnet (dropout_rate=0.0)"}


def test_unfinished_runs_are_running_or_stopped(tmp_path):
  root = tmp_path / "runs"
  make_run(root, "done", "nin", 10, 0.1, (0.5, 0.6))
  dead = subprocess.Popen(["true"])
  dead.wait()
  make_run(root, "stopped", "nin", 10, 0.1, (0.5,), finished=False, lock=f"pid {dead.pid} on {socket.gethostname()}")
  make_run(root, "running", "nin", 10, 0.1, (0.5,), finished=False, lock=f"pid {os.getpid()} on {socket.gethostname()}")
  make_run(root, "no_lock", "nin", 10, 0.1, (0.5,), finished=False)
  runs = {r.name: r for r in report_lib.load_runs([str(root)])}
  status = {name: report_lib.row(r, "nin")["status"] for name, r in runs.items()}
  assert status == {"done": "done", "stopped": "stopped (10/100)", "running": "running (10/100)",
                    "no_lock": "stopped (10/100)"}
  groups = report_lib.group_rows([report_lib.row(runs[n], n) for n in ("stopped", "running")])
  assert [g["architecture"] for g in groups] == ["stopped (stopped)", "running (running)"]


def test_runs_without_an_eval_give_a_note_not_blank_plots(tmp_path):
  root = tmp_path / "runs"
  make_run(root, "a", "nin", 10, 0.1, (), finished=False)
  make_run(root, "b", "lenet", 5, 0.01, (), finished=False)
  out = tmp_path / "report"
  paths = report_lib.report([str(root)], str(out), log=lambda m: None)
  assert not any(k.startswith("top1_vs") for k in paths)
  assert not [f for f in os.listdir(out) if f.endswith(".png")]
  md = open(paths["markdown"]).read()
  assert "No accuracy plots: none of these runs has evaluated yet" in md and "![" not in md
  # One run with evals: its curve is drawn and the other is named on the plot.
  make_run(root, "c", "nin", 10, 0.1, (0.5,), finished=False)
  paths = report_lib.report([str(root)], str(out), log=lambda m: None, overwrite=True)  # a third run now
  assert "top1_vs_epoch" in paths and "top1_vs_params" in paths


def test_a_report_never_replaces_or_deletes_what_it_did_not_write(tmp_path):
  """A folder of published results (no manifest, as docs/results/*) or another set of runs' report is refused
  in one line with nothing touched; --overwrite replaces the report but removes only files a report wrote."""
  root, few = tmp_path / "runs", tmp_path / "few"
  make_run(root, "a", "nin", 10, 0.1, (0.4, 0.5))
  make_run(few, "b", "nin", 10, 0.1, (), finished=False)
  published = tmp_path / "published"
  os.makedirs(published)
  for name, data in (("report.md", b"# the published one"), ("top1_vs_epoch.png", b"png")):
    (published / name).write_bytes(data)
  with pytest.raises(UserError, match="did not write.*--overwrite"):
    report_lib.report([str(few)], str(published), log=lambda m: None)
  assert sorted(os.listdir(published)) == ["report.md", "top1_vs_epoch.png"]
  assert (published / "report.md").read_bytes() == b"# the published one"

  out = tmp_path / "out"
  report_lib.report([str(root)], str(out), log=lambda m: None)
  assert os.path.exists(out / "top1_vs_epoch.png")
  report_lib.report([str(root)], str(out), log=lambda m: None)  # the same runs again: updated in place
  with pytest.raises(UserError, match="a report of other runs"):
    report_lib.report([str(few)], str(out), log=lambda m: None)
  (out / "notes.txt").write_text("mine")
  report_lib.report([str(few)], str(out), log=lambda m: None, overwrite=True)
  assert not os.path.exists(out / "top1_vs_epoch.png")  # written by the earlier report: it goes
  assert (out / "notes.txt").read_text() == "mine"       # never written by a report: it stays


def _overlap(a, b):
  return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("x_key", ["params", "gflops_per_image"])
def test_tradeoff_plot_is_readable(tmp_path, x_key):
  root = tmp_path / "runs"
  # The activation study's shape: pairs of nearly equal points (sigmoid runs at chance) and long labels.
  for model, params, gflops in (("alexnet", 1_883_626, 0.0349), ("vgg11", 1_769_066, 0.0187),
                                ("lenet", 83_126, 0.0017)):
    for act, top1 in (("relu", 0.86 if model != "lenet" else 0.75), ("sigmoid", 0.1 if model != "lenet" else 0.19)):
      make_run(root, f"{model}_{act}", model, params, gflops, (top1,), {"activation": act})
  runs = report_lib.load_runs([str(root)])
  labels = report_lib._architecture_labels(runs, [])  # pylint: disable=protected-access
  groups = report_lib.group_rows([report_lib.row(r, labels[r.name]) for r in runs])
  fig = plots.tradeoff_figure(groups, x_key, "x")
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  (ax,) = fig.axes
  fig_box, ax_box = fig.bbox, ax.get_window_extent(renderer)
  assert ax_box.width > 0.8 * fig_box.width and ax_box.height > 0.7 * fig_box.height  # axes use the figure
  assert ax.get_legend() is None  # points are labelled: nothing sits over the y label
  notes = [t for t in ax.texts]
  assert len(notes) == 6 and all("None" not in t.get_text() for t in notes)
  boxes = [t.get_window_extent(renderer) for t in notes]
  for i, a in enumerate(boxes):
    assert ax_box.x0 <= a.x0 and a.x1 <= ax_box.x1 and ax_box.y0 <= a.y0 and a.y1 <= ax_box.y1, notes[i]
    for b in boxes[i + 1:]:
      assert not _overlap(a, b), (a, b)
  ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text() and t.get_visible()
           and ax_box.x0 - 1 <= t.get_window_extent(renderer).x0 <= ax_box.x1]
  assert len(ticks) >= 2
  for i, a in enumerate(ticks):
    for b in ticks[i + 1:]:
      assert not _overlap(a, b)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)


def test_report_still_refuses_a_different_recipe(tmp_path):
  root = tmp_path / "runs"
  make_run(root, "a", "nin", 10, 0.1, (0.5,))
  make_run(root, "b", "lenet", 10, 0.1, (0.5,), recipe={**RECIPE, "optimizer": {"learning_rate": 0.05}})
  with pytest.raises(UserError, match="optimizer.learning_rate"):
    report_lib.report([str(root)], str(tmp_path / "out"), log=lambda m: None)
  # Different architectures (LeNet without dropout beside NiN with it) are what a comparison compares.
  other = tmp_path / "ok"
  make_run(other, "a", "nin", 10, 0.1, (0.5,))
  make_run(other, "b", "lenet", 10, 0.1, (0.5,))
  paths = report_lib.report([str(other)], str(tmp_path / "out2"), log=lambda m: None)
  md = open(paths["markdown"]).read()
  assert "verified identical" in md and "Architecture of each run" in md
