"""bfloat16 mixed precision (`config.dtype='bfloat16'`) against float32, through the real `steps.train_step`.

For AlexNet, VGG-11, NiN and LeNet (tiny widths, batch 8, no dropout) on the CPU:
  * params, optimiser state and gradients stay float32 while every conv/dense layer computes in bfloat16
    (and the loss is float32);
  * one bf16 step gives the fp32 step's loss and gradients up to bf16 rounding;
  * 10 steps on one fixed batch lower the loss in both dtypes, and the two loss curves stay close.

What "up to bf16 rounding" means per gradient is measured, not guessed: the same fp32 step run on the params
rounded to bf16 (8 significant bits) shows how much a bf16-sized perturbation alone moves each gradient of
these tiny random-label nets, which is a lot for early layers (up to 18% for VGG-11's first convs, with fp32
compute). bf16 compute may move each gradient at most a small multiple of that; a precision bug (a layer
computing garbage, a gradient lost in a cast) moves it by O(1).
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import ops
from cnn_jax import steps as steps_lib
from cnn_jax import train
from cnn_jax.specs import OptimizerSpec
from cnn_jax.models import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# model: (model_kwargs, image side px, learning rate of the short training run).
FAMILIES = {
    "alexnet": (dict(geometry="small", width=0.125), 32, 0.003),
    "vgg11": (dict(geometry="small", width=0.125), 32, 0.003),
    "nin": (dict(geometry="small", width=0.125), 32, 0.01),
    "lenet": (dict(width=1.0), 28, 0.03),  # LeNet learns slowest here: a larger step
}
BATCH = 8
STEPS = 10

# Tolerances, with what they were measured at (jax 0.10.2, x86 CPU) in brackets.
LOSS_RTOL = 1e-2          # one step's loss, bf16 vs fp32 [<= 3.0e-3, NiN]
GRAD_NORM_RTOL = 3e-2     # global gradient norm [<= 1.2e-2, VGG-11]
MIN_GRAD_COSINE = 0.99    # all gradients as one vector [>= 0.9954, VGG-11]
# Per leaf: |g16 - g32| <= 5 |g32(params rounded to bf16) - g32| + 0.03 |g32|
# [|g16 - g32| / |g32| up to 0.25 (VGG-11 block1_conv1 kernel), at most 4x the rounding's effect where that
# effect is above 0.01 (NiN block1 mlp1 bias: bf16 activations add their own rounding in front of it)].
ROUNDING_MULTIPLE, ROUNDING_FLOOR = 5.0, 0.03
# Training: at every one of the STEPS + 1 losses, |l16 - l32| / l32 [<= 1.6e-2, AlexNet]. Longer runs on one
# fixed batch of 8 drift apart chaotically once the net starts memorising it (AlexNet: 23% after 20 steps), as
# the fp32 run from bf16-rounded params does too (11% after 20 steps).
TRAJECTORY_RTOL = 5e-2


def _f32(x):
  return jnp.dtype(x.dtype) == jnp.float32


def _floats(tree):
  """The floating-point leaves of `tree` (optimiser states also hold int32 step counts)."""
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _record_grads() -> optax.GradientTransformation:
  """Keeps the raw gradients of the last step in the optimiser state (so tests can read them)."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


def _config(name, dtype):
  sys.path.insert(0, REPO)
  from configs import common  # pylint: disable=g-import-not-at-top
  kwargs, size, lr = FAMILIES[name]
  config = common.get_config("small", model=name)
  config.model_kwargs.update(dict(kwargs, dropout_rate=0.0))
  config.image_size = size
  config.dtype = dtype
  config.optimizer.learning_rate = lr
  return config


def _conv_dtypes(step_fn, *args):
  """Dtypes of the operands of every convolution in the jaxpr of step_fn(*args), sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jex_core.subjaxprs(jaxpr):
      walk(sub)

  walk(jax.make_jaxpr(step_fn)(*args).jaxpr)
  return found


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(a)))


def run_family(name):
  """Everything the tests compare, for one family: each jitted step compiles once per dtype."""
  _, size, lr = FAMILIES[name]
  models = {dt: train.build_model(_config(name, dt), 10) for dt in ("float32", "bfloat16")}
  config = _config(name, "bfloat16")
  tx = optax.chain(_record_grads(), steps_lib.make_optimizer(OptimizerSpec.from_config(config), optax.constant_schedule(lr)))
  # The bf16 model's own create_train_state; the fp32 state is the same arrays with the fp32 apply_fn.
  # An rbg key: threefry's random init takes ~8 s to compile per family on this CPU, rbg ~1.5 s.
  init = jax.jit(functools.partial(steps_lib.create_train_state, models["bfloat16"], tx,
                                   image_shape=(size, size, 3)))
  state16 = init(jax.random.key(0, impl="rbg"))
  states = {"bfloat16": state16, "float32": state16.replace(apply_fn=models["float32"].apply)}
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(BATCH, size, size, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32)}
  step = jax.jit(steps_lib.train_step, compiler_options=ops.compiler_options())

  out = {"name": name, "models": models, "state0": states, "batch": batch, "step": step}
  for dt, state in states.items():
    first, metrics = step(state, batch)
    losses = [float(metrics["loss"])]
    s = first
    for _ in range(STEPS):  # the step after update i reports the loss after i updates
      s, m = step(s, batch)
      losses.append(float(m["loss"]))  # losses[i]: the loss after i updates, i = 0..STEPS
    out[dt] = {"first": first, "metrics": jax.device_get(metrics), "grads": first.opt_state[0],
               "losses": losses, "last": s}
  # Calibration: the fp32 step on the params rounded to bf16 (fp32 compute).
  rounded = states["float32"].replace(
      params=jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), state16.params))
  out["rounded_grads"] = step(rounded, batch)[0].opt_state[0]
  return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
  return run_family(request.param)


def test_bf16_keeps_float32_state_and_computes_in_bf16(family):
  name, models, batch = family["name"], family["models"], family["batch"]
  state0 = family["state0"]["bfloat16"]
  # Params and optimiser state (momentum, recorded gradients) float32, at init and after bf16 steps.
  for tree in (state0.params, state0.opt_state, family["bfloat16"]["first"].params,
               family["bfloat16"]["grads"], family["bfloat16"]["last"].params,
               family["bfloat16"]["last"].opt_state):
    floats = _floats(tree)
    assert floats and all(_f32(x) for x in floats), {str(x.dtype) for x in floats}
  assert _f32(family["bfloat16"]["metrics"]["loss"]) and _f32(family["bfloat16"]["metrics"]["grad_norm"])

  # Every conv and dense layer outputs bf16; the logits come out float32. Dtypes are fixed when the forward pass
  # is traced, so its abstract evaluation says it without compiling the forward pass.
  is_layer = lambda module, method: isinstance(module, (layers.Conv, nn.Dense)) and method == "__call__"
  apply = functools.partial(models["bfloat16"].apply, train=True, capture_intermediates=is_layer,
                            mutable=["intermediates"])
  logits, inter = jax.eval_shape(apply, {"params": state0.params}, batch["image"])
  outs = jax.tree.leaves(inter["intermediates"])
  n_layers = len(jax.tree.leaves(state0.params)) // 2  # a kernel and a bias each
  assert len(outs) == n_layers, (len(outs), n_layers)
  assert {str(x.dtype) for x in outs} == {"bfloat16"}
  assert _f32(logits)

  # And the real jitted step convolves bf16 operands (forward and backward); the fp32 step none.
  conv16 = _conv_dtypes(steps_lib.train_step, state0, batch)
  conv32 = _conv_dtypes(steps_lib.train_step, family["state0"]["float32"], batch)
  assert conv16 and all(d == ("bfloat16", "bfloat16") for d in conv16), (name, conv16)
  assert conv32 and all(d == ("float32", "float32") for d in conv32), (name, conv32)


def test_bf16_step_matches_fp32(family):
  name = family["name"]
  m32, m16 = family["float32"]["metrics"], family["bfloat16"]["metrics"]
  loss_rel = abs(float(m16["loss"]) - float(m32["loss"])) / float(m32["loss"])
  assert loss_rel < LOSS_RTOL, (name, float(m32["loss"]), float(m16["loss"]))
  norm_rel = abs(float(m16["grad_norm"]) - float(m32["grad_norm"])) / float(m32["grad_norm"])
  assert norm_rel < GRAD_NORM_RTOL, (name, float(m32["grad_norm"]), float(m16["grad_norm"]))

  g32 = jax.tree_util.tree_flatten_with_path(family["float32"]["grads"])[0]
  g16 = jax.tree.leaves(family["bfloat16"]["grads"])
  gr = jax.tree.leaves(family["rounded_grads"])
  a = np.concatenate([np.ravel(x) for _, x in g32])
  b = np.concatenate([np.ravel(x) for x in g16])
  cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  assert cosine > MIN_GRAD_COSINE, (name, cosine)
  for (path, x32), x16, xr in zip(g32, g16, gr):
    rel16, rel_round = _rel(x32, x16), _rel(x32, xr)
    assert rel16 <= ROUNDING_MULTIPLE * rel_round + ROUNDING_FLOOR, (
        name, jax.tree_util.keystr(path), rel16, rel_round)


def test_bf16_training_tracks_fp32(family):
  name = family["name"]
  l32, l16 = np.asarray(family["float32"]["losses"]), np.asarray(family["bfloat16"]["losses"])
  assert np.all(np.isfinite(l16))
  assert l32[-1] < 0.8 * l32[0] and l16[-1] < 0.8 * l16[0], (name, l32, l16)  # [<= 0.68]
  drift = np.abs(l16 - l32) / l32
  assert np.max(drift) < TRAJECTORY_RTOL, (name, l32, l16)
  last = family["bfloat16"]["last"]
  assert all(_f32(x) for x in _floats((last.params, last.opt_state)))
  assert int(last.step) == STEPS + 1
