"""benchmarks/gpu_campaign.sh end to end at --tiny scale (so the one-shot GPU script cannot rot), and the pieces
it relies on: the profile's HLO/trace reading and the goals' verdicts.

The dry run uses the real Fashion-MNIST array cache (written here, with TensorFlow, into the session's cache
folder) and runs every part with TensorFlow blocked, as on the GPU image.
"""

import gzip
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import campaign_results  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import profile_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = ("env", "throughput", "profile", "end_to_end", "accuracy")


@pytest.mark.heavy
def test_tiny_campaign_runs_every_part_without_tensorflow(fashion_mnist_arrays, tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, PYTHON=sys.executable, ARRAYS=fashion_mnist_arrays, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # conftest's fake devices are for this process only
  proc = subprocess.run(["bash", "benchmarks/gpu_campaign.sh", str(out), "--tiny"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  log = (out / "campaign.log").read_text()
  assert "TensorFlow blocked" in log
  for part in PARTS:
    assert f"== {part}: ok" in log, log[-4000:]
  # Only what a device run can bring back: the log, results.json and the tarballs; no scratch left in OUT.
  assert {"campaign.log", "results.json", "details.tar.gz"} <= set(os.listdir(out)) <= {
      "campaign.log", "results.json", "details.tar.gz", "traces.tar.gz"}

  results = json.loads((out / "results.json").read_text())
  assert results["tiny"] is True
  assert [results["parts"][p]["status"] for p in PARTS] == ["ok"] * len(PARTS)
  assert results["env"]["versions"]["ml_collections"] and results["env"]["backend"] == "cpu"
  (row,) = results["throughput"]
  assert row["model"] == "nin" and row["ours_img_per_s"] > 0 and row["ours_mfu"] > 0
  assert row["gflop_per_step"] > 0
  for profile in (results["step_profile"]["nin"], results["loop_profile"]["nin"]):
    assert profile["wall_ms"] > 0 and profile["busy_ms"] > 0
    assert profile["by_category"] and profile["top_ops"]
    assert profile["top_ops"][0]["ms"] > 0
  assert results["end_to_end"]["nin"]["ratio"] > 0
  accuracy = results["accuracy"]["models"]["nin"]
  assert accuracy["steps"] == 4 and accuracy["input"] == "device" and accuracy["dtype"] == "bfloat16"
  assert accuracy["curve"] and set(accuracy["to_target"]) == {"0.90", "0.93"}
  goals = {(g["goal"], g["model"]): g for g in results["goals"]}
  assert goals[("ours/PyTorch", "nin")]["verdict"] in ("met", "not met", "unknown")
  assert goals[("top-1", "nin")]["value"] == accuracy["best_top1"]


@pytest.mark.parametrize("args,message", [([], "usage:"), (["out", "--huge"], "unknown argument")])
def test_campaign_rejects_bad_arguments(tmp_path, args, message):
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_campaign.sh"), *args], cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and message in proc.stderr
  assert not os.path.exists(os.path.join(REPO, "out"))  # nothing created before the arguments are checked


# --- The profile's reading of HLO text and traces ------------------------------------------------------

_HLO = """HloModule jit_train_step, is_scheduled=true

%fused_computation.1 (param_0: bf16[8,16,16,4], param_1: bf16[3,3,4,8]) -> bf16[8,16,16,8] {
  %param_0 = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %param_1 = bf16[3,3,4,8]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,16,16,8]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3}
}

%fused_transpose (param_0.2: f32[8,4]) -> f32[4,8] {
  %param_0.2 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.3 = f32[4,8]{1,0} transpose(%param_0.2), dimensions={1,0}
}

ENTRY %main.10 (p0: bf16[8,16,16,4], p1: bf16[3,3,4,8]) -> (f32[4,8]) {
  %p0 = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,4,8]{3,2,1,0} parameter(1)
  %conv_fusion = bf16[8,16,16,8]{3,2,1,0} fusion(%p0, %p1), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(NiN)/block1/conv/conv_general_dilated" source_file="x.py"}
  %cudnn-conv.2 = (bf16[8,16,16,4]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(train_step)/transpose(jvp(NiN))/block2/conv_general_dilated"}
  %gemm.4 = f32[8,4]{1,0} custom-call(%p0, %p1), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/transpose(jvp(AlexNet))/head/fc1/dot_general"}
  %transpose_fusion = f32[4,8]{1,0} fusion(%gemm.4), kind=kLoop, calls=%fused_transpose, metadata={op_name="jit(train_step)/mul"}
  ROOT %tuple = (f32[4,8]) tuple(%transpose_fusion)
}
"""


def test_hlo_instructions_get_category_pass_and_layer():
  ops = profile_step.parse_hlo(_HLO)
  assert (ops["conv_fusion"].category, ops["conv_fusion"].phase, ops["conv_fusion"].layer) == (
      "conv", "fwd", "block1/conv")
  assert (ops["cudnn-conv.2"].category, ops["cudnn-conv.2"].phase, ops["cudnn-conv.2"].layer) == (
      "conv", "bwd", "block2")
  assert (ops["gemm.4"].category, ops["gemm.4"].layer) == ("matmul", "head/fc1")
  assert (ops["transpose_fusion"].category, ops["transpose_fusion"].phase) == ("layout", "other")
  assert profile_step.phase_and_layer("jit(train_step)/jvp(VGG)/jit(relu)/max") == ("fwd", "")


def _write_trace(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def test_gpu_trace_counts_stream_kernels_once_and_idle_time(tmp_path):
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
  ]
  kernel = lambda ts, dur, op, name="sm90_xmma_fprop": {
      "ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": dur, "name": name,
      "args": {"hlo_op": op, "hlo_module": "jit_train_step"}}
  events = meta + [
      kernel(0, 600, "conv_fusion"), kernel(600, 200, "cudnn-conv.2", "sm90_xmma_dgrad"),
      kernel(1000, 100, "gemm.4", "cutlass_gemm"), kernel(1100, 100, "transpose_fusion", "loop_transpose"),
      kernel(1200, 50, "", "Memcpy DtoD"),
      # The derived line repeats the same ops: it must not be counted again.
      {"ph": "X", "pid": 1, "tid": 2, "ts": 0, "dur": 1250, "name": "conv_fusion",
       "args": {"hlo_op": "conv_fusion", "hlo_module": "jit_train_step"}},
      # Another module's kernel (e.g. a metrics reduction outside the step).
      {"ph": "X", "pid": 1, "tid": 7, "ts": 1300, "dur": 500, "name": "k",
       "args": {"hlo_op": "fusion", "hlo_module": "jit__all_finite"}},
  ]
  path = str(tmp_path / "perfetto_trace.json.gz")
  _write_trace(path, events)
  found, source = profile_step.op_events(path, "jit_train_step")
  assert "stream" in source and len(found) == 5
  result = profile_step.breakdown(found, profile_step.parse_hlo(_HLO), steps=1, wall_s=2e-3)
  assert result["op_ms"] == pytest.approx(1.05)
  assert result["busy_ms"] == pytest.approx(1.05) and result["idle_ms"] == pytest.approx(0.95)
  assert result["by_category"]["conv"] == pytest.approx(0.8)
  assert result["by_category"]["matmul"] == pytest.approx(0.1)
  assert result["by_category"]["layout"] == pytest.approx(0.1)
  assert result["by_category"]["memcpy"] == pytest.approx(0.05)
  assert result["by_phase"]["bwd"] == pytest.approx(0.3)
  assert result["ops"][0]["op"] == "conv_fusion" and result["ops"][0]["layer"] == "block1/conv"
  assert "conv" in profile_step.format_breakdown(result)


def test_goals_are_unknown_without_a_number_and_judged_against_the_issue_targets(tmp_path):
  work = tmp_path / "work"
  work.mkdir()
  (work / "status.tsv").write_text("throughput\tok\t0\t100\t150\naccuracy\ttimeout\t143\t300\t300\n")
  (work / "throughput.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": [
      {"model": "vgg11", "res": 224, "batch": 256, "dtype": "bfloat16", "flops_per_step": 1e13,
       "variants": {"jax[auto]": {"img_per_s": 9000.0, "mfu": 0.51},
                    "torch 2.11.0 compiled": {"img_per_s": 7000.0, "mfu": 0.4}},
       "torch": {"label": "torch 2.11.0 compiled", "mode": "compiled", "note": ""},
       "ours_over_torch": 9000 / 7000},
      {"model": "nin", "res": 224, "batch": 256, "dtype": "bfloat16", "flops_per_step": 1e12,
       "variants": {"jax[auto]": {"img_per_s": 27000.0, "mfu": 0.14}}}]}))
  (work / "e2e_nin.json").write_text(json.dumps({"rows": [{"model": "nin", "synthetic": 100.0, "device": 85.0}]}))
  (work / "accuracy.json").write_text(json.dumps({"models": {"vgg11": {"best_top1": 0.931}, "nin": {}}}))
  out = campaign_results.gather(str(work))
  verdicts = {(g["goal"], g["model"]): g["verdict"] for g in out["goals"]}
  assert verdicts == {
      ("top-1", "vgg11"): "met", ("top-1", "nin"): "unknown",
      ("ours/PyTorch", "vgg11"): "met", ("ours/PyTorch", "nin"): "unknown",
      ("MFU", "vgg11"): "met", ("MFU", "nin"): "not met",
      ("end-to-end/synthetic", "nin"): "not met"}
  assert out["parts"]["accuracy"] == {"status": "timeout", "exit_status": 143, "seconds": 300.0, "budget_s": 300.0}
