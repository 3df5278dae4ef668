"""Comparing architectures: sweeps (expand, resume, skip), verified-identical reports, plots, predict.

Three tiny REAL runs on Fashion-MNIST (NiN x 2 seeds, LeNet x 1; 12 steps each) are trained once by the
sweep runner itself and shared by every test of this module.
"""

import csv
import json
import os
import shutil
import time
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax.compare import report as report_lib
from cnn_jax.compare import sweep as sweep_lib
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/sweeps/families.py:seeds=2,models=nin+lenet,smoke"
ONLY = r"^(nin_s0|nin_s1|lenet_s0)$"
STEPS = 12


def _extra(data_dir):
  """Overrides making the smoke runs cheap; identical for every run, so the fingerprints still agree."""
  return {"data_dir": data_dir, "num_train_steps": STEPS, "checkpoint_every_steps": 6, "log_every_steps": 4,
          "eval_every_epochs": 6 / 128,        # 128 steps per epoch on train[:4096]: evals at steps 6 and 12
          "train_split": "train[:4096]", "eval_split": "test[:512]", "eval_batch_size": 128,
          "cache": False, "shuffle_buffer": 512, "progress": False}


@pytest.fixture(scope="module")
def sweep_root(fashion_mnist_dir, tmp_path_factory):
  """(sweep, root, extra, outcomes) after training the three runs with run_sweep."""
  sweep = sweep_lib.load_sweep(SPEC)
  root = str(tmp_path_factory.mktemp("families"))
  extra = _extra(fashion_mnist_dir)
  outcomes = sweep_lib.run_sweep(sweep, root, only=ONLY, extra=extra, log=lambda m: None)
  return sweep, root, extra, outcomes


def _summary(root, name):
  with open(os.path.join(root, name, "summary.json")) as f:
    return json.load(f)


def _clone_run(src, dst, **field_changes):
  """Copies a workdir and rewrites fingerprint fields of its run_info.json (dotted keys)."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, "run_info.json")
  with open(path) as f:
    info = json.load(f)
  for dotted, value in field_changes.items():
    node = info["fingerprint_fields"]
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  info["fingerprint"] = "changed"
  with open(path, "w") as f:
    json.dump(info, f)
  return dst


# --- Sweeps ---------------------------------------------------------------------------------------

def test_sweep_expansion_and_commands():
  sweep = sweep_lib.load_sweep("configs/sweeps/families.py:seeds=3")
  assert len(sweep.runs) == 4 * 3
  assert {r.overrides["model"] for r in sweep.runs} == {"alexnet", "vgg11", "nin", "lenet"}
  assert sweep.varies == ("model", "seed")
  assert sweep.base == "configs/common.py:small"
  configs = [sweep_lib.run_config(sweep, r) for r in sweep.runs]
  # One recipe: the fingerprints differ only through the seed.
  by_seed = {}
  for c in configs:
    by_seed.setdefault(c.seed, set()).add(sweep_lib.fingerprint(c)["hash"])
  assert all(len(h) == 1 for h in by_seed.values()) and len(by_seed) == 3
  assert {c.image_size for c in configs} == {32} and {c.model_kwargs.geometry for c in configs} == {"small"}

  assert len(sweep_lib.select(sweep, "^nin")) == 3
  with pytest.raises(UserError, match="matches none"):
    sweep_lib.select(sweep, "resnet")
  cmd = sweep_lib.train_command(sweep, sweep.runs[0], "runs/families",
                                {"augment.area_range": (0.1, 1.0), "optimizer.learning_rate": 0.02})
  assert cmd.startswith("python train.py --config=configs/common.py:small --workdir=runs/families/alexnet_s0")
  assert "--config.model=alexnet" in cmd and "--config.seed=0" in cmd
  assert "'--config.augment.area_range=(0.1, 1.0)'" in cmd and "--config.optimizer.learning_rate=0.02" in cmd


def test_bad_overrides_are_user_errors():
  sweep = sweep_lib.load_sweep("configs/sweeps/families.py:seeds=1")
  with pytest.raises(UserError, match="no field 'optimizer.lr'"):
    sweep_lib.run_config(sweep, sweep.runs[0], {"optimizer.lr": 0.1})
  with pytest.raises(UserError, match="batch_size"):
    sweep_lib.run_config(sweep, sweep.runs[0], {"batch_size": "big"})
  with pytest.raises(UserError, match="unknown config arg"):
    sweep_lib.run_config(sweep_lib.load_sweep("configs/sweeps/families.py:bogus"), sweep.runs[0])
  assert sweep_lib.parse_overrides(["data_dir=/x/y", "num_train_steps=10", "augment.flip=False"]) == {
      "data_dir": "/x/y", "num_train_steps": 10, "augment.flip": False}
  with pytest.raises(UserError, match="'...' is a placeholder"):  # was a cryptic 'Ellipsis' type error
    sweep_lib.parse_overrides(["data_dir=..."])


def test_sweep_trains_then_skips_finished_runs(sweep_root):
  sweep, root, extra, outcomes = sweep_root
  assert outcomes == {"nin_s0": "trained", "nin_s1": "trained", "lenet_s0": "trained"}
  assert sorted(os.listdir(root)) == ["lenet_s0", "nin_s0", "nin_s1", "sweep.json"]
  before = {n: (os.path.getmtime(os.path.join(root, n, "summary.json")),
                os.path.getsize(os.path.join(root, n, "metrics.jsonl"))) for n in outcomes}
  again = sweep_lib.run_sweep(sweep, root, only=ONLY, extra=extra, log=lambda m: None)
  assert set(again.values()) == {"skipped (done)"}
  after = {n: (os.path.getmtime(os.path.join(root, n, "summary.json")),
               os.path.getsize(os.path.join(root, n, "metrics.jsonl"))) for n in outcomes}
  assert after == before  # nothing retrained, nothing appended
  assert all(_summary(root, n)["steps"] == STEPS for n in outcomes)


def test_sweep_cli_dry_run_and_errors(sweep_root):
  _, root, extra, _ = sweep_root
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  sets = [f"--set={k}={v}" for k, v in extra.items()]
  proc = subprocess.run([sys.executable, "sweep.py", f"--sweep={SPEC}", f"--root={root}", "--dry_run",
                         "--only=nin"] + sets, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  status = {l.split()[0]: " ".join(l.split()[1:3]) for l in proc.stdout.strip().splitlines()}
  assert status == {"nin_s0": "skipped (done)", "nin_s1": "skipped (done)"}
  proc = subprocess.run([sys.executable, "sweep.py", f"--sweep={SPEC}", f"--root={root}", "--dry_run",
                         "--set=optimizer.lr=0.1"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
      "error: override optimizer.lr=0.1: the config has no field 'optimizer.lr'"]


def test_sweep_resumes_a_partial_run(sweep_root, tmp_path):
  sweep, root, extra, _ = sweep_root
  root2 = str(tmp_path / "root2")
  work = os.path.join(root2, "lenet_s0")
  shutil.copytree(os.path.join(root, "lenet_s0"), work)
  # Make it an interrupted run: no summary, last checkpoint at step 6.
  os.remove(os.path.join(work, "summary.json"))
  shutil.rmtree(os.path.join(work, "checkpoints", str(STEPS)))
  assert sweep_lib.run_sweep(sweep, root2, only="lenet_s0", extra=extra, dry_run=True,
                             log=lambda m: None) == {"lenet_s0": "would resume from step 6"}
  t_resume = time.time()
  out = sweep_lib.run_sweep(sweep, root2, only="lenet_s0", extra=extra, log=lambda m: None)
  assert out == {"lenet_s0": "resumed from step 6"}
  assert _summary(root2, "lenet_s0")["steps"] == STEPS
  records = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  keys = [(r["split"], r["step"]) for r in records]
  assert len(keys) == len(set(keys))  # the resumed run cut the log back: no step is logged twice
  # Only the steps after the checkpoint were trained again; the records up to it are the original ones.
  assert any(r["step"] > 6 for r in records)
  assert all(r["time"] >= t_resume for r in records if r["step"] > 6)
  assert all(r["time"] < t_resume for r in records if r["step"] <= 6)


def test_sweep_refuses_a_workdir_of_another_recipe(sweep_root):
  sweep, root, extra, _ = sweep_root
  run = [r for r in sweep.runs if r.name == "nin_s0"][0]
  config = sweep_lib.run_config(sweep, run, dict(extra, **{"optimizer.learning_rate": 0.5}))
  with pytest.raises(UserError, match="optimizer.learning_rate"):
    sweep_lib.run_status(os.path.join(root, "nin_s0"), config)
  assert sweep_lib.run_status(os.path.join(root, "nin_s0"), sweep_lib.run_config(sweep, run, extra)) == (
      "done", STEPS)


# --- Fingerprints ---------------------------------------------------------------------------------

def test_fingerprint_equality_and_difference_detection(sweep_root, tmp_path):
  _, root, _, _ = sweep_root
  runs = report_lib.load_runs([os.path.join(root, "*")])
  assert [r.name for r in runs] == ["lenet_s0", "nin_s0", "nin_s1"]
  # Same recipe, different seeds: identical apart from the seed.
  assert set(report_lib.differing_fields(runs)) == {"seed"}
  assert report_lib.check_identical(runs) == []

  odd = report_lib.load_run(_clone_run(os.path.join(root, "nin_s1"), str(tmp_path / "nin_lr"),
                                       **{"optimizer.learning_rate": 0.5, "augment.flip": False}))
  diffs = report_lib.differing_fields(runs + [odd])
  assert set(diffs) == {"seed", "optimizer.learning_rate", "augment.flip"}
  assert diffs["optimizer.learning_rate"]["nin_lr"] == 0.5
  with pytest.raises(UserError, match=r"augment\.flip.*optimizer\.learning_rate"):
    report_lib.check_identical(runs + [odd])
  # Declared as studied: accepted; under --allow_mismatch: returned for a loud warning.
  assert report_lib.check_identical(runs + [odd], allowed=("optimizer", "augment.flip")) == []
  assert report_lib.check_identical(runs + [odd], allow_mismatch=True) == ["augment.flip",
                                                                            "optimizer.learning_rate"]


def test_report_cli_refuses_mismatched_pipelines(sweep_root, tmp_path):
  _, root, _, _ = sweep_root
  _clone_run(os.path.join(root, "nin_s0"), str(tmp_path / "runs" / "nin_big"), image_size=64)
  shutil.copytree(os.path.join(root, "lenet_s0"), str(tmp_path / "runs" / "lenet_s0"))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "report.py", f"--runs={tmp_path}/runs/*", f"--out={tmp_path}/rep", "--noplots"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "image_size" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "rep" / "report.md")
  proc = subprocess.run(cmd + ["--allow_mismatch"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "WARNING" in proc.stderr and "image_size" in proc.stderr
  assert "WARNING: these runs do NOT share one pipeline" in open(tmp_path / "rep" / "report.md").read()


# --- Report ---------------------------------------------------------------------------------------

def test_report_tables_and_plots_match_the_runs(sweep_root, tmp_path):
  _, root, _, _ = sweep_root
  out = str(tmp_path / "report")
  paths = report_lib.report([os.path.join(root, "*")], out, log=lambda m: None)

  with open(paths["csv"]) as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == ["lenet_s0", "nin_s0", "nin_s1"]
  for name, r in rows.items():
    s = _summary(root, name)
    assert r["architecture"] == s["model"] and r["status"] == "done"
    assert int(r["params"]) == s["params"] and int(r["steps"]) == STEPS
    for key in ("gflops_per_image", "train_img_per_s", "best_top1", "best_top5", "final_top1",
                "final_top5", "wall_s"):
      assert float(r[key]) == s[key], key
    assert r["device"] == f"{s['num_devices']} x {s['device_kind']}"
  assert rows["nin_s0"]["params"] == rows["nin_s1"]["params"] != rows["lenet_s0"]["params"]

  with open(paths["groups_csv"]) as f:
    groups = {g["architecture"]: g for g in csv.DictReader(f)}
  nin = [_summary(root, n)["final_top1"] for n in ("nin_s0", "nin_s1")]
  assert groups["nin"]["runs"] == "2" and groups["lenet"]["runs"] == "1"
  np.testing.assert_allclose(float(groups["nin"]["final_top1"]), np.mean(nin))
  np.testing.assert_allclose(float(groups["nin"]["final_top1_std"]), np.std(nin, ddof=1))

  md = open(paths["markdown"]).read()
  assert f"tensorboard --logdir {os.path.relpath(root)}" in md or f"tensorboard --logdir {root}" in md
  assert "verified identical" in md and "No TensorBoard events" not in md
  for name in rows:
    assert f"| {name} | " in md
  s = _summary(root, "lenet_s0")
  assert f"{s['final_top1']:.4f}" in md and f"{s['params']:,}" in md
  assert "± " in md  # NiN's two seeds give mean ± std

  for key in ("top1_vs_epoch", "top1_vs_params", "top1_vs_flops"):
    with open(paths[key], "rb") as f:
      data = f.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, key


def test_every_run_writes_tensorboard_events_and_eval_curve(sweep_root):
  _, root, _, _ = sweep_root
  for run in report_lib.load_runs([root]):
    assert run.tb_events, run.name
    assert [e["step"] for e in run.evals] == [6, STEPS]
    assert run.evals[-1]["top1"] == run.summary["final_top1"]


# --- Predict --------------------------------------------------------------------------------------

def _test_images(config, n, folder):
  """Writes the first n images of the eval split as PNG files; returns (paths, labels)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = tfds.load("fashion_mnist", split=f"test[:{n}]", data_dir=config.data_dir, shuffle_files=False)
  paths, labels = [], []
  os.makedirs(folder, exist_ok=True)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    path = os.path.join(folder, f"test_{i}.png")
    tf.io.write_file(path, tf.io.encode_png(ex["image"]))
    paths.append(path)
    labels.append(int(ex["label"]))
  return paths, labels


def test_predict_matches_eval(sweep_root, tmp_path):
  from cnn_jax import predict  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, root, _, _ = sweep_root
  workdir = os.path.join(root, "nin_s0")
  predictor = predict.Predictor.from_run(workdir=workdir)
  assert predictor.step == STEPS and len(predictor.class_names) == 10
  assert predictor.class_names[9] == "Ankle boot"

  config = predictor.config
  paths, labels = _test_images(config, 4, str(tmp_path / "img"))
  results = predictor.predict_files(paths, k=5)
  eval_config = predict.load_config(predict.find_checkpoint(workdir), {})
  eval_config.update(dict(eval_split="test[:4]", eval_batch_size=8))
  batch = next(iter(pipeline.create_eval_iter(eval_config)))
  assert list(batch["label"][:4]) == labels
  eval_logits = predictor.logits(batch["image"][:4])
  for (path, top), image_bytes, logits in zip(results, paths, eval_logits):
    assert len(top) == 5 and len({name for name, _ in top}) == 5
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert top[0][0] == predictor.class_names[int(np.argmax(logits))]
  # The file path and the eval pipeline give the same input pixels.
  np.testing.assert_allclose(predictor.preprocess(open(paths[0], "rb").read()), batch["image"][0], atol=1e-6)

  best = predict.find_checkpoint(workdir=workdir, which="best")
  evals = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in l]
  assert best.step == max(evals, key=lambda r: r["top1"])["step"]


def test_predict_cli(sweep_root, tmp_path):
  _, root, _, _ = sweep_root
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.load(open(os.path.join(root, "lenet_s0", "config.json"))))
  paths, _ = _test_images(config, 2, str(tmp_path / "img"))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  # One device here, eight in the run that saved the checkpoint: the restore must not care.
  proc = subprocess.run([sys.executable, "predict.py", f"--checkpoint={root}/lenet_s0/checkpoints"] + paths,
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == f"{paths[0]}:" and lines[6] == f"{paths[1]}:" and len(lines) == 12
  probs = [float(l.split()[-1]) for l in lines[1:6]]
  assert 0 < sum(probs) <= 1.0001 and probs == sorted(probs, reverse=True)

  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  proc = subprocess.run([sys.executable, "predict.py", f"--workdir={root}/lenet_s0", str(bad)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: {bad}: not a readable image (JPEG, PNG, GIF or BMP expected)"]
  assert "Traceback" not in proc.stderr


def test_apply_overrides_leaves_the_callers_config_alone():
  from configs import common  # pylint: disable=g-import-not-at-top
  base = common.get_config("small")
  out = sweep_lib.apply_overrides(base, {"init_from": "/runs/a", "data_dir": "/data", "optimizer.momentum": 0.5})
  assert (out.init_from, out.data_dir, out.optimizer.momentum) == ("/runs/a", "/data", 0.5)
  assert (base.init_from, base.data_dir, base.optimizer.momentum) == (None, None, 0.9)
  with pytest.raises(UserError, match="data_dir"):
    sweep_lib.apply_overrides(base, {"data_dir": 3})   # placeholder types survive the copy
