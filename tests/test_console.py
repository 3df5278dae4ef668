"""The terminal a user sees: status lines, a progress bar without stale characters, no library chatter,
the backend, a default workdir, a CPU-cost warning, and one line when the dataset cannot be downloaded."""

import io
import os
import re
import socket
import subprocess
import sys

import pytest

from cnn_jax import cli
from cnn_jax import console
from cnn_jax.data import datasets
from cnn_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines libraries print that the default output must not show.
CHATTER = re.compile(r"^(I|W)\d{4} |absl::InitializeLog|cpu_feature_guard|oneDNN|xla_bridge|Unknown size|"
                     r"Unable to initialize backend|partially cached", re.M)


class _Terminal(io.StringIO):
  """A stream that says it is a terminal; `screen()` replays carriage returns like one does."""

  def isatty(self):
    return True

  def fileno(self):
    raise io.UnsupportedOperation("no fd")

  def screen(self):
    lines = []
    for raw in self.getvalue().split("\n"):
      line = ""
      for chunk in raw.split("\r"):
        line = chunk + line[len(chunk):]  # text overwrites from column 0; the rest stays (stale)
      lines.append(line.rstrip())
    return [l for l in lines if l]


def test_progress_bar_leaves_no_stale_characters_and_ends_with_the_final_eval():
  term = _Terminal()
  progress = console.Progress(total_steps=100, start_step=0, stream=term)
  progress.update(50, loss=1.23456, img_per_s=12345.0)
  progress.evaluated(50, 0.5, {"top1": 0.716262, "top5": 0.9, "loss": 1.0})
  progress.update(100, loss=0.5, img_per_s=9.0)        # a shorter line than the one before
  progress.evaluating()
  progress.evaluated(100, 1.0, {"top1": 0.7162, "top5": 0.95, "loss": 0.8})
  progress.close()
  screen = term.screen()
  assert screen[0] == "epoch 0.50 (step 50): eval top-1 0.7163, top-5 0.9000, loss 1.0000"
  assert screen[1].startswith("epoch 1 (step 100): eval top-1 0.7162")
  bar = screen[-1]
  assert bar.startswith("train 100%") and bar.endswith("loss 0.5000, 9 img/s, eval top-1 0.7162"), bar
  assert "0.716262" not in bar and "12345" not in bar and "evaluating" not in bar
  assert console.Progress.active is None


def test_progress_lines_without_a_terminal():
  out = io.StringIO()
  progress = console.Progress(total_steps=10, start_step=4, stream=out)
  progress.update(6, loss=0.25, img_per_s=100.0)
  progress.evaluated(6, 1.0, {"top1": 0.5, "top5": 0.9, "loss": 0.7})
  progress.update(8, loss=0.2, img_per_s=100.0)
  progress.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("step 6/10 (60.0%) loss 0.2500 | 100 img/s | ETA ")
  assert lines[1] == "epoch 1 (step 6): eval top-1 0.5000, top-5 0.9000, loss 0.7000"
  assert lines[2].endswith("| eval top-1 0.5000") and "\r" not in out.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal with TIOCSWINSZ")
def test_a_terminal_that_reports_zero_columns_gets_progress_lines():
  """Some pseudo-terminals report a width of 0: a bar there would never show; they get one line per update."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import pty  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  import termios  # pylint: disable=g-import-not-at-top
  main_fd, sub_fd = pty.openpty()
  fcntl.ioctl(sub_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))
  with os.fdopen(sub_fd, "w") as stream:
    assert stream.isatty() and os.get_terminal_size(sub_fd).columns == 0
    progress = console.Progress(100, stream=stream)
    progress.update(50, 0.5, 800.0)
    progress.close()
    out = os.read(main_fd, 4096).decode()
  os.close(main_fd)
  assert out.startswith("step 50/100 (50.0%) loss 0.5000 | 800 img/s") and "\r" not in out.replace("\r\n", "\n")


def test_default_workdir_is_named_after_the_config():
  assert console.default_workdir("configs/nin.py") == os.path.join("runs", "nin")
  assert console.default_workdir("configs/vgg.py:quick") == os.path.join("runs", "vgg_quick")
  assert console.default_workdir("/x/configs/nin.py:small,epochs=2") == os.path.join("runs", "nin_small_epochs_2")
  assert console.default_workdir("configs/vgg.py:quick,dataset=folder:/data/pets/,res=64") == os.path.join(
      "runs", "vgg_quick_dataset_pets_res_64")


def test_tensorflow_startup_lines_are_hidden_unless_verbose(monkeypatch):
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
  console.quiet_tensorflow_startup(["--config=x.py", "--verbosity=0"])
  assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
  console.quiet_tensorflow_startup(["--config=x.py"])
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_cpu_cost_warning_for_native_resolution():
  # NiN at 224 px for one epoch of Fashion-MNIST: ~2.2e12 FLOPs per step of 128 images.
  native = console.cpu_cost_warning("nin", "native", 224, total_steps=468, step_flops=2.2e12)
  assert native and "native resolution (224 px)" in native and "configs/nin.py:quick" in native
  assert re.search(r"at least \d+\.\d h", native) or "takes hours" in native
  assert console.cpu_cost_warning("nin", "small", 32, total_steps=1404, step_flops=3.6e9) is None
  assert "configs/vgg.py" in console.cpu_cost_warning("vgg11_bn", "native", 224, 468, 2e13)


def test_train_py_as_typed_default_workdir_status_lines_and_no_chatter(fashion_mnist_dir, tmp_path):
  """`python train.py --config=...` without --workdir, as a new user types it (a smoke-sized run)."""
  # As a user's shell: none of the suite's TensorFlow log settings.
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config=" + os.path.join(REPO, "configs/lenet.py:smoke"),
         f"--config.data_dir={fashion_mnist_dir}"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == f"workdir: {os.path.join('runs', 'lenet_smoke')} (--workdir not given; the same command resumes there)"
  assert os.path.exists(tmp_path / "runs" / "lenet_smoke" / "summary.json")
  assert re.search(r"^\[\d\d:\d\d\] JAX \S+ on cpu: 1 device \(cpu\)$", proc.stdout, re.M)
  # The input's own line: the device-resident split being loaded (input=auto picks it here), or the host
  # pipeline's first batch.
  for status in ("data: fashion_mnist", "initialising lenet", "(loading|reading the first batch)",
                 "compiling the train step", "compiled in ", "first step done in"):
    assert re.search(r"^\[\d\d:\d\d\] " + status, proc.stdout, re.M), status
  done = next(i for i, l in enumerate(lines) if l.startswith("Done:"))
  last_eval = [l for l in lines[:done] if l.strip()][-1]
  assert last_eval.startswith("epoch ") and "eval top-1" in last_eval  # the final eval, right above Done
  assert not CHATTER.findall(out), CHATTER.findall(out)


def test_library_lines_come_back_with_verbosity():
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  cmd = [sys.executable, "-m", "cnn_jax.models.summary", "--model=lenet", "--image_size=28", "--num_classes=10"]
  quiet = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  # The suite's JAX_PLATFORMS=cpu (conftest.py) leaves JAX no backends to probe and so nothing to log; with it
  # empty JAX tries them all, as in a shell without it, and logs the ones it could not start.
  loud = subprocess.run(cmd + ["--verbosity=0"], cwd=REPO, env={**env, "JAX_PLATFORMS": ""}, capture_output=True,
                        text=True, timeout=300)
  assert quiet.returncode == loud.returncode == 0
  assert not CHATTER.findall(quiet.stdout + quiet.stderr)
  assert re.search(r"^I\d{4} ", loud.stderr, re.M), loud.stderr[-2000:]  # JAX's backend INFO lines
  assert quiet.stdout == loud.stdout


def test_offline_download_fails_at_once_in_one_line(tmp_path, monkeypatch, capsys):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)  # never the network, also on a networked CI

  def offline(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")

  downloads = []
  monkeypatch.setattr(socket, "create_connection", offline)
  original = tfds.download.DownloadManager._download  # pylint: disable=protected-access
  monkeypatch.setattr(tfds.download.DownloadManager, "_download",
                      lambda self, resource: downloads.append(resource) or original(self, resource))
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config.update(dict(dataset="fashion_mnist", data_dir=str(tmp_path / "tfds"), manual_dir=None, download=True,
                     train_split="train", eval_split="auto"))
  status = cli.run(datasets.get_dataset_info, config)
  err = capsys.readouterr().err
  assert status == cli.EXIT_USER_ERROR
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in err, err
  assert "looks offline" in errors[0] and "--config.manual_dir=<folder>" in errors[0]
  assert "-ubyte.gz" in errors[0]  # names the files to fetch
  assert not downloads  # failed before tfds's retries began
  with pytest.raises(UserError):
    datasets.get_dataset_info(config)
