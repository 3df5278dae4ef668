"""cnn_jax.compile_check: LeNet (configs/lenet.py:smoke) compiled for a GPU and a multi-host TPU slice that are not
here, the report's numbers checked against the compiled programs themselves, and the bad-input cases.

Needs the packages of requirements-compile.txt (CI installs them); without them the compiling tests skip.
Kept small: the GPU compiles take seconds, and only the eval program is compiled for the TPU (XLA:TPU takes
~40-60 s for even LeNet's train step on 2 cores).
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cnn_jax import targets  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from cnn_jax.errors import UserError  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

GPU, TPU = "h200", "tpu-v5e:4x4"


def _needs(name):
  missing = targets.missing_requirements(targets.get(name))
  return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed "
                            f"(pip install -r {targets.REQUIREMENTS})")


def _smoke():
  from configs import lenet  # pylint: disable=g-import-not-at-top
  return lenet.get_config("smoke")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


# Runs the command line with TensorFlow made unimportable (sys.modules entry None): it must never need it.
_NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; sys.argv = ['compile_check'] + sys.argv[1:]; "
          "runpy.run_module('cnn_jax.compile_check', run_name='__main__')")


def _cli(*args, prelude=""):
  return subprocess.run([sys.executable, "-c", prelude + _NO_TF, *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)


def _platform(compiled):
  import jax  # pylint: disable=g-import-not-at-top
  return next(iter(jax.tree.leaves(compiled.input_shardings)[0].device_set)).platform


def _memory_fields(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes)


@pytest.fixture(scope="module")
def gpu_report():
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  return cc.check(_smoke(), GPU, search=(), keep_executables=True)


@_needs(GPU)
def test_gpu_report_is_the_programs_own(gpu_report):
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  report = gpu_report
  assert report.devices == 1 and report.target.memory_bytes == 151397597184  # h200.txtpb's device_memory_size
  for name, p in report.programs.items():
    compiled = p.compiled
    assert _platform(compiled) == "gpu"
    m = p.memory
    assert (m.arguments, m.outputs, m.temporaries, m.aliased) == _memory_fields(compiled), name
    text = compiled.as_text()
    calls = re.findall(r'custom_call_target="(__cudnn\$conv[A-Za-z]*)"', text)
    assert sum(p.gpu.cudnn_calls.values()) == len(calls) > 0, name
    assert {k: calls.count(k) for k in set(calls)} == p.gpu.cudnn_calls
    # Every convolution of the JAX program became a cuDNN call (none left to XLA's own kernels).
    assert "convolution(" not in text and set(p.gpu.conv_lowering) == {"cudnn conv"}, p.gpu.conv_lowering
    assert p.fits and 0 < m.need < report.budget and p.flops > 0
  train, evaluate = report.programs["train"], report.programs["eval"]
  # The train step donates its state: XLA aliases it; each program also carries the other's resident split,
  # and eval the optimiser state it does not read.
  assert train.memory.aliased > 0 and train.memory.resident > 0 and evaluate.memory.resident > 0
  assert evaluate.memory.unused_arguments > 0
  # A backward pass has both gradient convolutions.
  assert {"__cudnn$convBackwardFilter", "__cudnn$convBackwardInput"} <= set(train.gpu.cudnn_calls)
  # The GPU lowering's max-pool gradient (LeNet has two pools): no select-and-scatter, so no scatter and none of
  # its int32 window indices; plain XLA's has one (what cnn_jax.ops 'gpu' avoids, for half the temporaries).
  assert "select-and-scatter(" not in train.compiled.as_text() and " scatter(" not in train.compiled.as_text()
  table = cc.format_table(report)
  assert "h200" in table and "cuDNN" in table and "layout transposes/copies" in table
  json_out = report.to_json()
  assert json_out["programs"]["train"]["memory"]["temporaries"] == train.memory.temporaries


@_needs(GPU)
def test_gpu_batch_search_answer_fits_and_one_step_more_does_not(gpu_report):
  """The search over eval batches against a budget a few MiB above the configured batch's need: its answer
  compiled on its own fits, the answer plus one step does not."""
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  from cnn_jax.compile_check import programs  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  target = targets.get(GPU)
  mesh = Mesh(np.asarray(targets.devices(target)), ("data",))
  config = _smoke()
  first = gpu_report.programs["eval"]
  budget = first.memory.need + 4 * 2**20

  def build_at(batch):
    cfg = config.copy_and_resolve_references()
    cfg.eval_batch_size = batch
    return programs.build(cfg, mesh, device_memory_bytes=target.memory_bytes)["eval"]

  start = cc.Compile(first.batch, first.memory, 0.0, 0.0)
  step = 16
  search = cc.search_batch(build_at, start, budget, step, limit=None, max_compiles=8)
  assert search.largest is not None and not search.limited and not search.capped, search
  assert search.largest > first.batch
  assert cc.compile_program(build_at(search.largest)).need() <= budget
  assert cc.compile_program(build_at(search.largest + step)).need() > budget
  assert len(search.probes) <= 8


@_needs(TPU)
def test_tpu_multihost_eval_compiles_with_its_collectives():
  """A 16-chip v5e slice of 4 hosts: one mesh over the 4 processes' devices; the eval sums are all-reduced."""
  import cnn_jax.compile_check as cc  # pylint: disable=g-import-not-at-top
  report = cc.check(_smoke(), TPU, programs=("eval",), search=(), keep_executables=True)
  assert (report.devices, report.processes) == (16, 4)
  p = report.programs["eval"]
  assert _platform(p.compiled) == "tpu"
  m = p.memory
  assert (m.arguments, m.outputs, m.temporaries, m.aliased) == _memory_fields(p.compiled)
  text = p.compiled.as_text()
  reduces = [l for l in text.splitlines() if re.search(r"= \S.* all-reduce(-start)?\(", l)]
  assert p.collectives.by_kind["all-reduce"][0] == len(reduces) > 0
  assert p.fits and p.flops > 0 and p.batch // p.devices == 4
  assert "16 x TPU v5e in 4 processes" in cc.format_table(report)


def test_unknown_target_is_one_error_line_listing_the_known_ones():
  proc = _cli("--config=configs/lenet.py:smoke", "--target=h300")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for name in ("h100", "h200", "tpu-v4:2x2x1", "tpu-v5e:2x2", "tpu-v5e:4x4", "tpu-v6e:2x2"):
    assert name in errors[0]


def test_missing_extra_packages_name_the_requirements_file(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(UserError, match=r"libtpu.*requirements-compile\.txt"):
    targets.check_requirements(targets.get("tpu-v6e:2x2"))
  hide = ("import importlib.util as u; _f = u.find_spec; "
          "u.find_spec = lambda n, *a: None if n.startswith('jax_plugins.xla_cuda') else _f(n, *a); ")
  proc = _cli("--config=configs/lenet.py:smoke", "--target=h100", prelude=hide)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "requirements-compile.txt" in errors[0] and "jax-cuda13-plugin" in errors[0]


@_needs(GPU)
def test_a_program_that_does_not_fit_is_reported_and_fails_only_with_require_fit(tmp_path):
  """The command line, without TensorFlow: a budget of a few bytes fits nothing; the table says so; exit status
  1 with --require_fit (0 without it: cnn_jax.compile_check.__main__)."""
  out = tmp_path / "report.json"
  proc = _cli("--config=configs/lenet.py:smoke", f"--target={GPU}", "--memory_fraction=1e-9", "--search=none",
              "--require_fit", f"--json_out={out}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert re.search(r"^fits in .*\bNO\b", proc.stdout, re.M), proc.stdout
  assert "Traceback" not in proc.stderr and "does not fit" in proc.stderr
  import json  # pylint: disable=g-import-not-at-top
  data = json.loads(out.read_text())
  assert data["fits"] is False and data["programs"]["train"]["memory"]["arguments"] > 0
