"""The benchmarks' own failure paths: what a user sees when data is missing, a signal stops a run, or the tree that
would travel to a GPU machine is not whole. (What they measure is not tested: they print numbers.)"""

import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import end_to_end  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_end_to_end_stops_at_a_signal_instead_of_reporting_the_cut_short_run(monkeypatch):
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  # What train_and_evaluate returns when SIGINT/SIGTERM stopped its loop early (see cnn_jax/train.py).
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: {"stopped": "SIGINT", "step": 7})
  config = ml_collections.ConfigDict({"model": "lenet", "input": "device"})
  with pytest.raises(end_to_end.Stopped, match=r"SIGINT: stopped during the lenet run with device input "
                     r"\(after step 7\); its img/s is not reported"):
    end_to_end.loop_img_per_s(config)


def test_input_pipeline_without_prepared_data_fails_in_one_line(tmp_path):
  """Offline and unprepared: one `error:` line and status 2, never a download (tfds retried it for minutes)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("CNN_JAX_FASHION_MNIST_MANUAL_DIR", None)
  proc = subprocess.run([sys.executable, "benchmarks/input_pipeline.py", f"--data_dir={tmp_path / 'empty'}",
                         "--cases=fashion_mnist"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "--data_dir=" in errors[0] and "--manual_dir=" in errors[0], proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "empty")  # nothing prepared or downloaded there


def test_gpu_carry_names_a_tracked_file_missing_from_the_tree(tmp_path):
  """A committed file deleted from the working tree (as `report.py --out=docs/results/...` removes a plot it
  cannot draw) once made the size check's `xargs stat` fail: exit 123, no message. Now it is named, before any
  download."""
  repo = tmp_path / "repo"
  (repo / "benchmarks").mkdir(parents=True)
  shutil.copy(os.path.join(REPO, "benchmarks", "gpu_carry.sh"), repo / "benchmarks")
  shutil.copy(os.path.join(REPO, ".gitignore"), repo)
  (repo / "plot.png").write_bytes(b"png")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
  for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "tree"]):
    subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
  (repo / "plot.png").unlink()
  proc = subprocess.run(["bash", "benchmarks/gpu_carry.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, PIP="false"))
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "1 tracked file(s) are missing" in proc.stderr and "plot.png" in proc.stderr, proc.stderr
  assert not (repo / ".whl").exists()
