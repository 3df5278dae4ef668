"""The chapter's claims as experiments: the claim sweeps expand to the runs they promise, the per-layer
gradient norms and train-test gap are measured by the real loop and reach the report and its plots, and
the static claims (parameters, 1x1 bottleneck FLOPs, FC bytes) come out of XLA / the model as stated."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import models
from cnn_jax import steps
from cnn_jax.compare import claims
from cnn_jax.compare import report as report_lib
from cnn_jax import fingerprint as fingerprint_lib
from cnn_jax.compare import sweep as sweep_lib
from cnn_jax.errors import UserError


def _configs(spec):
  sweep = sweep_lib.load_sweep(spec)
  return sweep, {r.name: sweep_lib.run_config(sweep, r) for r in sweep.runs}


# --- The sweep files -------------------------------------------------------------------------------

def test_activation_sweep_expands():
  sweep, configs = _configs("configs/sweeps/activation.py")
  assert [r.name for r in sweep.runs] == ["alexnet_relu", "alexnet_sigmoid", "vgg11_relu", "vgg11_sigmoid",
                                          "lenet_relu", "lenet_sigmoid"]
  assert sweep.base == "configs/common.py:small,epochs=3"
  assert set(sweep.varies) == {"model", "model_kwargs.activation", "model_kwargs.width"}
  for name, c in configs.items():
    model, act = name.split("_")
    assert (c.model, c.model_kwargs.activation) == (model, act)
    assert c.log_grad_norms is True
    assert c.model_kwargs.width == (1.0 if model == "lenet" else 0.25)
    assert (c.image_size, c.model_kwargs.geometry, c.num_epochs) == (32, "small", 3)
  # One pipeline: every fingerprint is the same (the activation is a model switch, not a recipe change).
  assert len({sweep_lib.fingerprint(c)["hash"] for c in configs.values()}) == 1
  sweep, _ = _configs("configs/sweeps/activation.py:models=nin,activations=relu+tanh+gelu,epochs=1")
  assert [r.name for r in sweep.runs] == ["nin_relu", "nin_tanh", "nin_gelu"]
  with pytest.raises(UserError, match="unknown sweep arg"):
    sweep_lib.load_sweep("configs/sweeps/activation.py:colour=1")


def test_augmentation_sweep_expands():
  sweep, configs = _configs("configs/sweeps/augmentation.py")
  assert [r.name for r in sweep.runs] == ["none", "flip", "crop", "crop_flip", "all"]
  aug = {n: c.augment for n, c in configs.items()}
  assert (aug["none"].crop, aug["none"].flip, aug["none"].brightness, aug["none"].pca_lighting) == (
      "none", False, 0.0, 0.0)
  assert (aug["flip"].crop, aug["flip"].flip) == ("none", True)
  assert (aug["crop"].crop, aug["crop"].flip) == ("pad_random_crop", False)
  assert (aug["crop_flip"].crop, aug["crop_flip"].flip, aug["crop_flip"].brightness) == (
      "pad_random_crop", True, 0.0)
  assert (aug["all"].brightness, aug["all"].contrast, aug["all"].pca_lighting) == (0.3, 0.3, 0.1)
  for c in configs.values():
    assert (c.model, c.model_kwargs.width, c.num_epochs) == ("alexnet", 0.25, 12)
    assert c.train_split == c.eval_train_split == "train[:10000]"
    assert fingerprint_lib.architecture(c)["dropout_rate"] == 0.5  # AlexNet's own (paper) dropout
  # Only augmentation fields tell the runs apart, and the report is told so through sweep.varies.
  assert all(k.startswith("augment.") for k in sweep.varies)
  hashes = {sweep_lib.fingerprint(c)["hash"] for c in configs.values()}
  assert len(hashes) == len(configs)
  sweep, configs = _configs("configs/sweeps/augmentation.py:variants=none+colour+pca,train=0,model=vgg11")
  assert [r.name for r in sweep.runs] == ["none", "colour", "pca"]
  assert configs["pca"].train_split == "train" and configs["pca"].model == "vgg11"
  with pytest.raises(UserError, match="unknown augmentation variant"):
    sweep_lib.load_sweep("configs/sweeps/augmentation.py:variants=mixup")


def test_dropout_sweep_expands():
  sweep, configs = _configs("configs/sweeps/dropout.py")
  assert [r.name for r in sweep.runs] == ["alexnet_dropout0.5", "alexnet_dropout0"]
  assert sweep.varies == ("model_kwargs.dropout_rate",)
  assert [c.model_kwargs.dropout_rate for c in configs.values()] == [0.5, 0.0]
  assert len({sweep_lib.fingerprint(c)["hash"] for c in configs.values()}) == 1
  for c in configs.values():
    assert c.augment.crop == "pad_random_crop" and c.augment.flip
    assert c.eval_train_split == "train[:10000]"
  sweep, _ = _configs("configs/sweeps/dropout.py:rates=0.5+0.25+0,models=alexnet+nin")
  assert len(sweep.runs) == 6


def test_families_sweep_width_leaves_lenet_at_paper_size():
  _, configs = _configs("configs/sweeps/families.py:seeds=1,width=0.25")
  assert {n: c.model_kwargs.width for n, c in configs.items()} == {
      "alexnet_s0": 0.25, "vgg11_s0": 0.25, "nin_s0": 0.25, "lenet_s0": 1.0}


# --- Per-layer gradient norms ------------------------------------------------------------------------

@pytest.mark.heavy
@pytest.mark.parametrize("name,expected", [
    ("alexnet", ["conv1", "conv2", "conv3", "conv4", "conv5", "head/fc1", "head/fc2", "head/logits"]),
    ("nin", [f"block{b}/{m}" for b in range(1, 5) for m in ("conv", "mlp1", "mlp2")]),
    ("lenet", ["conv1", "conv2", "head/fc1", "head/fc2", "head/logits"]),
])
def test_layer_grad_norms_match_manual(name, expected):
  """log_layer_grad_norms: one norm per layer in call order, equal to the norms of the gradients taken by
  hand (dropout off, so both are deterministic), and their squares sum to the global norm."""
  model = models.get_model(name, 10, geometry="small", width=0.25 if name != "lenet" else 1.0,
                           dropout_rate=0.0)
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  labels = jnp.array([0, 1, 2, 3])
  tx = optax.sgd(0.01, momentum=0.9)
  state0 = steps.jit_init(model, tx, images.shape[1:])(jax.random.key(1))
  assert list(steps.layers(state0.params)) == expected
  _, metrics0 = jax.jit(lambda s, b: steps.train_step(s, b, log_layer_grad_norms=True))(
      state0, {"image": images, "label": labels})
  keys = [k for k in metrics0 if k.startswith("grad_norm/")]
  assert sorted(keys) == sorted("grad_norm/" + e for e in expected)

  # The same gradients by hand -> the same per-layer norms.
  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=False)
    return jnp.mean(steps.cross_entropy(logits, labels))

  grads = jax.jit(jax.grad(loss_fn))(state0.params)
  for layer in expected:
    node = grads
    for part in layer.split("/"):
      node = node[part]
    manual = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(node)))
    np.testing.assert_allclose(float(metrics0["grad_norm/" + layer]), manual, rtol=2e-4)
  # The sum of squares of the parts is the global norm.
  total = np.sqrt(sum(float(metrics0[k]) ** 2 for k in keys))
  np.testing.assert_allclose(total, float(metrics0["grad_norm"]), rtol=1e-4)
  # Off by default: no per-layer keys.
  _, plain = jax.jit(steps.train_step)(state0, {"image": images, "label": labels})
  assert not [k for k in plain if k.startswith("grad_norm/")]


# --- Real smoke runs of the claim sweeps, then the report -----------------------------------------------

def _extra(data_dir, **more):
  return {"data_dir": data_dir, "num_train_steps": 8, "checkpoint_every_steps": 8, "log_every_steps": 2,
          "eval_split": "test[:256]", "eval_batch_size": 128, "cache": False, "shuffle_buffer": 256,
          "progress": False, **more}


def test_activation_sweep_runs_and_reports_grad_norms(fashion_mnist_dir, tmp_path):
  sweep = sweep_lib.load_sweep("configs/sweeps/activation.py:models=lenet,smoke")
  root = str(tmp_path / "activation")
  outcomes = sweep_lib.run_sweep(sweep, root, extra=_extra(fashion_mnist_dir, log_every_steps=2,
                                                           eval_every_epochs=1.0),
                                 log=lambda m: None)
  assert outcomes == {"lenet_relu": "trained", "lenet_sigmoid": "trained"}
  records = [json.loads(l) for l in open(os.path.join(root, "lenet_sigmoid", "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert len(train) == 4 and all("grad_norm/conv1" in r and "grad_norm/head/logits" in r for r in train)
  info = json.load(open(os.path.join(root, "lenet_sigmoid", "run_info.json")))
  assert info["layer_order"] == ["conv1", "conv2", "head/fc1", "head/fc2", "head/logits"]
  out = str(tmp_path / "report")
  paths = report_lib.report([root], out, log=lambda m: None)
  assert os.path.getsize(paths["grad_norms"]) > 10_000
  md = open(paths["markdown"]).read()
  assert "lenet (activation=relu)" in md and "lenet (activation=sigmoid)" in md
  assert "grad_norms.png" in md


def test_augmentation_sweep_runs_and_reports_gap(fashion_mnist_dir, tmp_path):
  sweep = sweep_lib.load_sweep("configs/sweeps/augmentation.py:variants=none+crop_flip,model=lenet,train=512,"
                               "eval_every=0.125,smoke")
  root = str(tmp_path / "augmentation")
  outcomes = sweep_lib.run_sweep(sweep, root, extra=_extra(fashion_mnist_dir, batch_size=32),
                                 log=lambda m: None)
  assert outcomes == {"none": "trained", "crop_flip": "trained"}
  summary = json.load(open(os.path.join(root, "none", "summary.json")))
  # 512 training images at batch 32 = 16 steps per epoch; eval_every=0.125 epoch = every 2 steps.
  assert summary["train_eval_split"] == "train[:512]"
  np.testing.assert_allclose(summary["gap_top1"], summary["train_eval_top1"] - summary["final_top1"])
  records = [json.loads(l) for l in open(os.path.join(root, "none", "metrics.jsonl"))]
  train_evals = [r for r in records if r["split"] == "train_eval"]
  assert [r["step"] for r in train_evals] == [2, 4, 6, 8] and all(r["count"] == 512 for r in train_evals)
  out = str(tmp_path / "report")
  paths = report_lib.report([root], out, log=lambda m: None)   # augment.* are the sweep's studied fields
  assert os.path.getsize(paths["train_vs_test"]) > 10_000
  md = open(paths["markdown"]).read()
  assert "| train top-1 | gap |" in md
  rows = list(__import__("csv").DictReader(open(paths["csv"])))
  assert {r["run"] for r in rows} == {"none", "crop_flip"}
  for r in rows:
    assert float(r["gap_top1"]) == pytest.approx(float(r["train_eval_top1"]) - float(r["final_top1"]))


def test_bad_eval_train_split_fails_before_training(fashion_mnist_dir, tmp_path):
  sweep = sweep_lib.load_sweep("configs/sweeps/dropout.py:models=lenet,rates=0.5,smoke")
  with pytest.raises(UserError, match="no split 'trian'"):
    sweep_lib.run_sweep(sweep, str(tmp_path), extra=_extra(fashion_mnist_dir, eval_train_split="trian[:100]"),
                        log=lambda m: None)
  workdir = os.path.join(tmp_path, "lenet_dropout0.5")
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints"))


# --- Static claims ---------------------------------------------------------------------------------------

def test_param_counts_claim():
  rows = {(r["model"], r["num_classes"]): r["params"] for r in claims.param_counts()}
  assert rows[("alexnet", 1000)] == 62_378_344 and rows[("vgg11", 1000)] == 132_863_336
  assert rows[("nin", 1000)] == 7_439_608 and rows[("nin", 10)] == 2_015_398
  assert rows[("alexnet", 10)] > 25 * rows[("nin", 10)]


def test_one_by_one_claim_from_xla():
  r = claims.one_by_one(size=32, c_in=256, c_mid=64, c_out=256, k=3)
  assert r["reduce_out_shape"] == (1, 32, 32, 64)            # spatial size kept
  # XLA counts a multiply-add as 2 FLOPs; SAME padding's border taps are not counted, so a little below 2*MACs.
  macs_1x1 = 32 * 32 * 256 * 64
  assert 2 * macs_1x1 <= r["flops_1x1"] <= 2 * macs_1x1 * 1.02
  macs_direct = 32 * 32 * 9 * 256 * 256
  assert 0.85 * 2 * macs_direct <= r["flops_next_direct"] <= 2 * macs_direct * 1.01
  # The following layer reads 64 channels instead of 256: 4x fewer FLOPs; with the 1x1 itself ~3.6x.
  assert r["next_layer_saving"] == pytest.approx(4.0, rel=0.01)
  assert 3.4 < r["total_saving"] < 4.0
  assert r["flops_total_with_1x1"] == pytest.approx(r["flops_1x1"] + r["flops_next_after_1x1"], rel=0.02)


def test_fc_memory_claim():
  m = claims.fc_memory("alexnet", 1000)
  layers = {l["layer"]: l for l in m["layers"]}
  assert layers["head/fc1"]["kernel"] == (9216, 4096)
  assert layers["head/fc1"]["params"] == 9216 * 4096 + 4096
  assert layers["head/fc2"]["params"] == 4096 * 4096 + 4096
  assert m["hidden_fc_params"] == 9216 * 4096 + 4096 + 4096 * 4096 + 4096
  assert m["hidden_fc_bytes_float32"] == 4 * m["hidden_fc_params"] == 2 * m["hidden_fc_bytes_bfloat16"]
  assert m["total_params"] == 62_378_344
  v = claims.fc_memory("vgg11", 1000)
  assert v["hidden_fc_params"] == 25088 * 4096 + 4096 + 4096 * 4096 + 4096
  md = claims.markdown()
  assert "218.1 MB" in md and "478.2 MB" in md and "3.99×" in md


def test_time_to_target_reads_first_eval_reaching_it():
  evals = [{"step": 10, "epoch": 1.0, "top1": 0.80, "time": 110.0},
           {"step": 20, "epoch": 2.0, "top1": 0.91, "time": 125.0},
           {"step": 30, "epoch": 3.0, "top1": 0.93, "time": 140.0}]
  train = [{"step": 5, "time": 100.0}, {"step": 15, "time": 117.0}]
  run = report_lib.RunRecord(name="r", workdir="/nonexistent/r", run_info={}, summary=None, evals=evals,
                             train=train, tb_events=[])
  assert report_lib.time_to_target(run, 0.9) == (2.0, 25.0)
  assert report_lib.time_to_target(run, 0.93) == (3.0, 40.0)
  assert report_lib.time_to_target(run, 0.95) == (None, None)
  row = report_lib.row(run, "x", target=0.9)
  assert (row["epochs_to_target"], row["wall_to_target_s"], row["gap_top1"]) == (2.0, 25.0, None)


def test_report_labels_use_run_names_when_the_differing_fields_are_many():
  def run(name, aug):
    return report_lib.RunRecord(name=name, workdir=f"/x/{name}", run_info={
        "model": "alexnet", "model_kwargs": {"width": 0.25},
        "fingerprint_fields": {"augment": aug, "seed": 0}}, summary=None, evals=[], train=[], tb_events=[])
  off = {"crop": "none", "flip": False, "brightness": 0.0, "contrast": 0.0, "pca_lighting": 0.0}
  runs = [run("none", off), run("all", {"crop": "pad_random_crop", "flip": True, "brightness": 0.3,
                                        "contrast": 0.3, "pca_lighting": 0.1})]
  fields = list(report_lib.differing_fields(runs))
  assert len(fields) == 5
  labels = report_lib._architecture_labels(runs, fields)  # pylint: disable=protected-access
  assert labels == {"none": "alexnet (none)", "all": "alexnet (all)"}
  short = report_lib._architecture_labels(runs, ["augment.flip"])  # pylint: disable=protected-access
  assert short == {"none": "alexnet (augment.flip=False)", "all": "alexnet (augment.flip=True)"}
