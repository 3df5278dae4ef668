"""Multi-process training on jax.distributed, for real: two processes of train.py on 127.0.0.1.

In the first test each process has 1 fake CPU device (a 2-device global mesh), reads its own half of the
train split and feeds half of every global batch; gloo carries the cross-process collectives. The run is
compared, bit for bit, with a single process on 2 fake devices that is fed the very same global batches, and
a SIGTERM sent to process 1 alone must stop both processes at the same step with a checkpoint that a second
two-process launch resumes. The device-input test runs 2 devices per process. Also: a whole run on 8 devices equals the same run on 1 device (BatchNorm statistics and dropout
are global, not per device).

VGG-11 with BatchNorm (and dropout) at width 1/8 and 32 px keeps every run to seconds of compute.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.heavy  # every test here launches train.py 2-5 times

# Runs train.py (same flags) after two optional test hooks:
#   CNN_JAX_TEST_EMULATE_PROCESSES=2: a single process is fed the global train and eval batches of 2 processes
#     (process 0's local batch, then process 1's), i.e. what a 2-process run assembles with
#     make_array_from_process_local_data. Without it one process would shuffle the whole split itself, a
#     different (equally valid) order, and its eval batches would hold other examples, so the eval's float sums
#     would add the same numbers in another order.
#   CNN_JAX_TEST_SUMMARY_DIR: every process writes the summary it returns to summary_<process>.json (only
#     process 0 writes the workdir's summary.json).
# And always: every process writes its own entries to the session's persistent compilation cache. JAX writes
# from process 0 only (against write contention on shared file systems), and on CPU devices the cache keys of
# process 1 differ from process 0's (they hash the device topology, which differs per process), so process 1
# otherwise compiles its programs again at every launch, e.g. the resume after the SIGTERM.
_WRAPPER = r"""
import json, os, runpy, sys
import numpy as np
sys.path.insert(0, os.getcwd())
from jax._src import compiler as _compiler, distributed as _distributed
_cache_write = _compiler._cache_write
def _cache_write_from_any_process(*args, **kwargs):
  process_id = _distributed.global_state.process_id
  _distributed.global_state.process_id = 0
  try:
    return _cache_write(*args, **kwargs)
  finally:
    _distributed.global_state.process_id = process_id
_compiler._cache_write = _cache_write_from_any_process
from cnn_jax.data import pipeline
from cnn_jax import train as train_lib

emulate = int(os.environ.get("CNN_JAX_TEST_EMULATE_PROCESSES", "0"))
if emulate:
  real_iter = pipeline.create_train_iter
  def global_batches(config, *, seed, start_step=0, process_index=0, process_count=1):
    assert (process_index, process_count) == (0, 1)
    parts = [real_iter(config, seed=seed, start_step=start_step, process_index=p, process_count=emulate)
             for p in range(emulate)]
    for local in zip(*parts):
      yield {k: np.concatenate([b[k] for b in local]) for k in local[0]}
  real_eval_iter = pipeline.create_eval_iter
  def global_eval_batches(config, *, process_index=0, process_count=1, split=None):
    assert (process_index, process_count) == (0, 1)
    parts = [real_eval_iter(config, process_index=p, process_count=emulate, split=split) for p in range(emulate)]
    for local in zip(*parts):
      yield {k: np.concatenate([b[k] for b in local]) for k in local[0]}
  pipeline.create_train_iter = global_batches
  pipeline.create_eval_iter = global_eval_batches

summary_dir = os.environ.get("CNN_JAX_TEST_SUMMARY_DIR")
if summary_dir:
  real_train = train_lib.train_and_evaluate
  def train_and_dump(config, workdir):
    import jax
    summary = real_train(config, workdir)
    with open(os.path.join(summary_dir, f"summary_{jax.process_index()}.json"), "w") as f:
      json.dump(summary, f, default=str)
    return summary
  train_lib.train_and_evaluate = train_and_dump

sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _steps_in(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _load_state(workdir, step):
  """The saved state of `workdir`'s checkpoint `step` as numpy arrays (independent of its mesh)."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                        manager.item_metadata(step)["state"])
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return jax.tree.map(np.asarray, state)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, log_path, **env_extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", **env_extra)
  proc = subprocess.Popen([sys.executable, "-c", _WRAPPER] + args, cwd=REPO, env=env,
                          stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def _log(proc):
  with open(proc.log_path) as f:
    return f.read()


def _wait_all(procs, timeout=300):
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      pytest.fail(f"timed out; {p.log_path}:\n{_log(p)[-3000:]}")
  return [p.returncode for p in procs]


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def _args(data_dir, workdir, devices, input_mode="host", model=("vgg.py", "vgg11_bn")):
  # 2,048 train images, global batch 32: 64 steps per epoch; 16 steps; eval (500 images) at the end.
  # Host input by default: the single-process emulation above stands in for the tf.data pipeline.
  return [f"--config=configs/{model[0]}:smoke", f"--config.model={model[1]}", f"--config.data_dir={data_dir}",
          f"--config.input={input_mode}",
          "--config.train_split=train[:2048]", "--config.eval_split=test[:500]",
          "--config.num_train_steps=16", "--config.log_every_steps=2", "--config.checkpoint_every_steps=4",
          "--config.progress=false", f"--cpu_devices={devices}", f"--workdir={workdir}"]


def _two_processes(args, tmp_path, name, summary_dir):
  port = _free_port()
  return [_launch(args + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}"], tmp_path / f"{name}_{i}.log",
                  CNN_JAX_TEST_SUMMARY_DIR=str(summary_dir)) for i in range(2)]


def test_two_processes_match_one_process_and_resume_after_sigterm(fashion_mnist_dir,
                                                                   tmp_path):
  multi_dir, single_dir = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  summaries = tmp_path / "summaries"
  summaries.mkdir()
  procs = []
  try:
    # The single-process reference (4 devices, the 2-process global batches) runs alongside launch 1.
    single = _launch(_args(fashion_mnist_dir, single_dir, 2), tmp_path / "single.log",
                     CNN_JAX_TEST_EMULATE_PROCESSES="2")
    procs.append(single)

    # Launch 1: SIGTERM to process 1 only, once a checkpoint exists; both must stop at the same step,
    # save, and exit 0 (neither may hang waiting for the other in a collective).
    first = _two_processes(_args(fashion_mnist_dir, multi_dir, 1), tmp_path, "launch1",
                           summaries)
    procs += first
    deadline = time.time() + 240
    while not _steps_in(multi_dir):
      assert time.time() < deadline and all(p.poll() is None for p in first), _log(first[0])[-3000:]
      time.sleep(0.02)
    first[1].send_signal(signal.SIGTERM)
    assert _wait_all(first) == [0, 0], (_log(first[0])[-3000:], _log(first[1])[-3000:])
    out0 = _log(first[0])
    assert "Stopped by a signal to another process after step" in out0, out0[-2000:]
    stopped_at = int(out0.split("after step ")[1].split(";")[0])
    assert stopped_at < 16 and stopped_at in _steps_in(multi_dir)
    assert "Stopped" not in _log(first[1])  # process 1 stays quiet
    stop_summaries = [json.load(open(summaries / f"summary_{i}.json")) for i in range(2)]
    assert stop_summaries == [{"stopped": "a signal to another process", "step": stopped_at},
                              {"stopped": "SIGTERM", "step": stopped_at}]

    # Launch 2: the same command resumes from that checkpoint in both processes and finishes.
    second = _two_processes(_args(fashion_mnist_dir, multi_dir, 1), tmp_path, "launch2",
                            summaries)
    procs += second
    assert _wait_all(second) == [0, 0], (_log(second[0])[-3000:], _log(second[1])[-3000:])
    assert f"from step {stopped_at}." in _log(second[0])
    assert _wait_all([single]) == [0], _log(single)[-3000:]
  finally:
    _kill_all(procs)

  multi = [json.load(open(summaries / f"summary_{i}.json")) for i in range(2)]
  single_summary = json.load(open(os.path.join(single_dir, "summary.json")))
  # Both processes report the same global numbers (metrics are reduced over the global batch).
  for k in ("final_top1", "final_top5", "final_loss", "steps", "eval_examples", "num_devices"):
    assert multi[0][k] == multi[1][k], k
  assert multi[0]["num_devices"] == 2 and multi[0]["eval_examples"] == 500  # every example once
  run_info = json.load(open(os.path.join(multi_dir, "run_info.json")))
  assert run_info["num_processes"] == 2 and run_info["num_devices"] == 2

  # Two processes vs one process, the same 2-device mesh and global train and eval batches: every cross-device
  # sum (gradients, BatchNorm moments, metrics) has two operands, a single IEEE addition, which is commutative,
  # so gloo's all-reduce and the in-process one give the same bits whatever order each uses; the eval adds the
  # same batch sums in the same order on the host. (With 4 devices the sums
  # associate differently, ((a+b)+c)+d vs (a+b)+(c+d): rounding that 16 SGD steps grow to a relative distance
  # of 5e-8 on an AMD EPYC and 4e-5 on an Intel AVX-512 CPU, so no tolerance would be a measured one.)
  a, b = _load_state(multi_dir, 16), _load_state(single_dir, 16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  for k in ("final_top1", "final_top5", "final_loss", "eval_examples"):
    assert multi[0][k] == single_summary[k], k


def test_two_processes_with_device_input(fashion_mnist_dir, fashion_mnist_arrays, tmp_path):
  """Device-resident input on 2 processes: each holds and draws only its half of the train split (the log
  says 1,024 of 2,048 images per process), both finish with the same global numbers, eval covers the
  500 test images once. What is checked here is the input's split between processes, so LeNet (BatchNorm
  across processes is the test above): its step with the augmentation compiles in a fraction of VGG's."""
  workdir = str(tmp_path / "device")
  summaries = tmp_path / "summaries"
  summaries.mkdir()
  procs = _two_processes(_args(fashion_mnist_dir, workdir, 2, "device", model=("lenet.py", "lenet")),
                         tmp_path, "device", summaries)
  try:
    assert _wait_all(procs) == [0, 0], (_log(procs[0])[-3000:], _log(procs[1])[-3000:])
  finally:
    _kill_all(procs)
  assert "Input: device-resident fashion_mnist (1,024 train images" in _log(procs[0]), _log(procs[0])[-2000:]
  multi = [json.load(open(summaries / f"summary_{i}.json")) for i in range(2)]
  for k in ("final_top1", "final_top5", "final_loss", "steps", "eval_examples"):
    assert multi[0][k] == multi[1][k], k
  assert multi[0]["steps"] == 16 and multi[0]["eval_examples"] == 500
  assert json.load(open(os.path.join(workdir, "run_info.json")))["input"] == "device"


def _relative_distance(a, b) -> float:
  """||a - b|| / ||b|| over all arrays of two trees taken as one vector."""
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_run_on_eight_devices_matches_one_device(fashion_mnist_dir, fashion_mnist_arrays, tmp_path):
  """A whole run (16 steps, eval) on 8 fake devices vs 1: the same numbers up to float32 rounding. Device-resident
  input: its batches, augmentation included, do not depend on the device count (tests/test_device_input.py), and
  neither process imports TensorFlow once the session's array cache holds the split."""
  dirs = {n: str(tmp_path / f"devices_{n}") for n in (1, 8)}
  # A 5x lower learning rate than the smoke default keeps SGD from amplifying rounding differences much.
  procs = [_launch(_args(fashion_mnist_dir, dirs[n], n, "device") + ["--config.optimizer.learning_rate=0.002"],
                   tmp_path / f"devices_{n}.log") for n in (1, 8)]
  try:
    assert _wait_all(procs) == [0, 0], [_log(p)[-3000:] for p in procs]
  finally:
    _kill_all(procs)
  s1, s8 = (json.load(open(os.path.join(dirs[n], "summary.json"))) for n in (1, 8))
  assert (s1["num_devices"], s8["num_devices"]) == (1, 8)
  # The first logged losses agree to float32 rounding: with per-device BatchNorm statistics (4 images per
  # device) they would differ in the first digits.
  l1, l8 = _train_losses(dirs[1]), _train_losses(dirs[8])
  np.testing.assert_allclose(l1[0], l8[0], rtol=1e-5)
  np.testing.assert_allclose(l1, l8, rtol=1e-3)
  # Over 16 SGD steps the rounding differences of 8 partial sums vs 1 grow: measured relative L2 distance
  # 1.8e-4 (params) and 8.9e-4 (batch_stats), first loss 3.2628145 vs 3.2628138 (host input: 1.1e-4 and
  # 2.8e-4; at the default rate (0.01) 2.5e-3 and 5.4e-3).
  a, b = _load_state(dirs[1], 16), _load_state(dirs[8], 16)
  assert _relative_distance(a["params"], b["params"]) < 1e-3
  assert _relative_distance(a["batch_stats"], b["batch_stats"]) < 2e-3
  assert abs(s1["final_loss"] - s8["final_loss"]) < 1e-3
  # At most 2 of the 500 eval images flip, counted in images: 0.14 - 0.136 is 0.0040000000000000036 in floats.
  assert abs(round(s1["final_top1"] * 500) - round(s8["final_top1"] * 500)) <= 2
