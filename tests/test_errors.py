"""Bad input anywhere gives one clear line on stderr and a non-zero exit status, never a traceback.

Command-line errors run `train.py` as a user does (they fail before JAX starts, so they are cheap);
errors found while setting up a run go through `cli.run(cli.train_main, ...)`, the same path `train.py`
takes, in-process. Unknown model/dataset, an unprepared data dir, an indivisible batch and an impossible
geometry are covered by tests/test_train.py::test_bad_input_gives_one_clear_line.
"""

import errno
import os
import subprocess
import sys

import pytest

from cnn_jax import cli
from cnn_jax.compare.sweep import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=120):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "train.py"] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _one_error_line(stderr):
  lines = [l for l in stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in stderr and "FATAL" not in stderr, stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("args,expect", [
    # absl/ml_collections flag errors: absl alone prints 'FATAL Flags parsing error' or a traceback.
    (["--config=configs/nin.py:smoke", "--config.no_such_field=1"], "has no field 'no_such_field'"),
    (["--config=configs/nin.py:smoke", "--config.batch_sise=64"], 'Did you mean "batch_size"'),
    (["--config=configs/nin.py:smoke", "--config.model_kwargs.widht=2"], 'Did you mean "width"'),
    (["--config=configs/nin.py:smoke", "--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config=configs/nin.py:smoke", "--config.optimizer.learning_rate=fast"], "could not convert"),
    (["--config=configs/nin.py:smoke,no_such_arg=1"], "unknown config arg(s) ['no_such_arg']"),
    (["--config=configs/nin.py:smoke,res=big"], "invalid literal for int()"),
    (["--config=configs/no_such_model.py"], "cannot load the config file"),
    (["--config=configs/nin.py:smoke", "--workdir=/tmp/x", "stray"], "unexpected arguments"),
    (["--config=configs/nin.py:smoke", "--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
])
def test_command_line_errors(args, expect, tmp_path):
  if not any(a.startswith("--workdir") for a in args):
    args = args + [f"--workdir={tmp_path / 'w'}"]
  proc = _run(args)
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
  assert expect in _one_error_line(proc.stderr)


@pytest.mark.parametrize("source,expect", [
    ("def get_config(:\n  pass\n", "bad.py:1: SyntaxError: invalid syntax"),
    ("import no_such_module\ndef get_config(arg=None):\n  pass\n",
     "bad.py:1: ModuleNotFoundError: No module named 'no_such_module'"),
    ("x = 1\ndef get_config(arg=None):\n  return undefined_name\n",
     "bad.py:3: NameError: name 'undefined_name' is not defined"),
    ("X = 1\n", "defines no get_config(arg=None) function"),
    ("def get_config(arg=None):\n  x = 1\n", "get_config() returned None"),
])
def test_broken_config_file_gives_file_and_line(source, expect, tmp_path):
  """A config file's own error is one line with its file:line (it was a 40-50 line traceback, status 1;
  a file without get_config reported "no field 'module'")."""
  bad = tmp_path / "bad.py"
  bad.write_text(source)
  proc = _run([f"--config={bad}", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
  line = _one_error_line(proc.stderr)
  assert expect in line and "'module'" not in line, line


def test_missing_config_flag():
  # --workdir may be left out (runs/<config name>: tests/test_console.py); --config may not.
  proc = _run(["--workdir=/tmp/unused"])
  assert proc.returncode == cli.EXIT_USER_ERROR and "--config" in _one_error_line(proc.stderr)


@pytest.mark.parametrize("flags,expect", [
    (["--process_id=1"], "need --coordinator_address"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], "host:port"),
    (["--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"], "--process_id=2"),
])
def test_multiprocess_flag_errors(flags, expect, tmp_path):
  proc = _run(["--config=configs/nin.py:smoke", f"--workdir={tmp_path / 'w'}"] + flags)
  assert proc.returncode == cli.EXIT_USER_ERROR and expect in _one_error_line(proc.stderr)


# --- Errors found while setting a run up (in-process, through cli.run) -------------------------------

def _config(**overrides):
  sys.path.insert(0, REPO)
  from configs import lenet  # pylint: disable=g-import-not-at-top
  config = lenet.get_config("smoke")
  config.progress = False
  return apply_overrides(config, overrides)


def _train_status(config, workdir, capfd):
  """(exit status, the single stderr line) of the command-line training entry."""
  capfd.readouterr()
  status = cli.run(cli.train_main, config, str(workdir))
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  return status, err[0]


@pytest.mark.parametrize("overrides,expect", [
    (dict(dtype="float64"), "--config.dtype='float64'"),
    (dict(image_size=0), "--config.image_size>=12"),
    (dict(eval_batch_size=12), "eval_batch_size=12 is not divisible by the 8 devices"),
    (dict(log_every_steps=0), "--config.log_every_steps=0"),
    (dict(checkpoint_every_steps=-5), "--config.checkpoint_every_steps=-5"),
    (dict(keep_checkpoints=0), "--config.keep_checkpoints=0"),
    (dict(eval_every_epochs=0.0), "--config.eval_every_epochs"),
    (dict(num_train_steps=-1, num_epochs=0), "num_epochs > 0"),
    (dict(train_split="validation"), "no split 'validation'"),
    (dict(batch_size=64, train_split="train[:40]"), "fewer than one batch"),
    (dict(init_from="/nonexistent/run"), "no such checkpoint directory"),
    # Were the device-divisibility message (0, -1) or accepted (a negative learning rate).
    (dict(batch_size=0), "--config.batch_size=0 must be a whole number >= 1"),
    (dict(batch_size=-1), "--config.batch_size=-1 must be a whole number >= 1"),
    (dict(eval_batch_size=0), "--config.eval_batch_size=0 must be a whole number >= 1"),
    ({"optimizer.learning_rate": -0.1}, "--config.optimizer.learning_rate=-0.1 must be a finite number >= 0"),
    (dict(restore_step=-2), "--config.restore_step=-2"),
])
def test_bad_config_values(overrides, expect, fashion_mnist_dir, tmp_path, capfd):
  status, line = _train_status(_config(data_dir=fashion_mnist_dir, **overrides), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and expect in line, line
  assert not (tmp_path / "w").exists()  # nothing written: not even the workdir the run would have made


def _folder_config(root):
  return _config(dataset=f"folder:{root}", batch_size=8, eval_batch_size=8, num_train_steps=2)


def test_missing_image_folder(tmp_path, capfd):
  status, line = _train_status(_folder_config(tmp_path / "nowhere"), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and "does not exist" in line


def test_empty_class_folder(image_folder_factory, tmp_path, capfd):
  root = image_folder_factory()
  os.makedirs(os.path.join(root, "train", "empty_class"))
  status, line = _train_status(_folder_config(root), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and "empty_class" in line and "holds no images" in line, line


@pytest.mark.parametrize("mode", ["device", "host"])
@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_an_empty_split_is_one_line(fashion_mnist_dir, tmp_path, capfd, mode, field):
  overrides = {field: "train[:0]" if field == "train_split" else "test[:0]", "input": mode}
  status, line = _train_status(_config(data_dir=fashion_mnist_dir, **overrides), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and ("holds no examples" in line or "0 examples" in line), line


def test_an_empty_image_folder_is_said_to_be_empty(tmp_path, capfd):
  os.makedirs(tmp_path / "empty")
  status, line = _train_status(_folder_config(tmp_path / "empty"), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and "it is empty" in line and "(it has )" not in line, line


def test_a_folder_of_one_class_is_refused(image_folder_factory, tmp_path, capfd):
  root = image_folder_factory(classes=("cat",))
  status, line = _train_status(_folder_config(root), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and "1 class (cat)" in line and "at least 2" in line, line
  assert not os.path.exists(tmp_path / "w")  # the refused run made the folder, and leaves none (not even .lock)
  kept = tmp_path / "kept"  # a folder of the user's stays, as it was
  (kept / "notes.txt").parent.mkdir()
  (kept / "notes.txt").write_text("mine")
  status, _ = _train_status(_folder_config(root), kept, capfd)
  assert status == cli.EXIT_USER_ERROR and sorted(os.listdir(kept)) == ["notes.txt"]


def test_a_workdir_that_is_a_file(tmp_path, capfd):
  path = tmp_path / "a_file"
  path.write_text("x")
  status, line = _train_status(_config(), path, capfd)
  assert status == cli.EXIT_USER_ERROR and "is a file, not a folder" in line, line
  assert path.read_text() == "x"


def test_a_config_file_that_returns_none(tmp_path):
  (tmp_path / "none.py").write_text("def get_config(arg=None):\n  pass\n")
  proc = _run([f"--config={tmp_path / 'none.py'}", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode == cli.EXIT_USER_ERROR
  assert "get_config() returned None (a missing return?)" in _one_error_line(proc.stderr)
  assert proc.stderr.strip().count("\n") == 0, proc.stderr  # no library warning beside it


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_in_folder(damage, image_folder_factory, tmp_path, capfd):
  root = image_folder_factory()
  bad = os.path.join(root, "train", "cat", "img_0.png")
  data = open(bad, "rb").read()
  with open(bad, "wb") as f:
    f.write(b"this is not an image" * 10 if damage == "garbage" else data[:len(data) // 2])
  status, line = _train_status(_folder_config(root), tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and bad in line, line


def test_unwritable_workdir(fashion_mnist_dir, tmp_path, capfd):
  # A workdir below a regular file cannot be created (chmod would not stop root, who runs CI here).
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  status, line = _train_status(_config(data_dir=fashion_mnist_dir), blocker / "w", capfd)
  assert status == cli.EXIT_USER_ERROR and "not writable" in line and "--workdir" in line, line


def test_disk_full_while_saving(fashion_mnist_dir, tmp_path, capfd, monkeypatch):
  """Every file write of a checkpoint fails with ENOSPC (as on a full disk): one line, status 2."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path_cls = type(epath.Path(str(tmp_path)))

  def no_space(self, *args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

  monkeypatch.setattr(path_cls, "write_text", no_space)
  config = _config(data_dir=fashion_mnist_dir, train_split="train[:256]", eval_split="test[:64]",
                   num_train_steps=4, checkpoint_every_steps=2)
  status, line = _train_status(config, tmp_path / "w", capfd)
  assert status == cli.EXIT_USER_ERROR, line
  assert "could not write the checkpoint" in line and "no space left" in line, line
  assert not [n for n in os.listdir(tmp_path / "w" / "checkpoints") if n.isdigit()]
