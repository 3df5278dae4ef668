r"""bfloat16 compute vs float32 on whatever backend JAX runs (the GPU check's numerics half).

For each model: one SGD-momentum train step (`cnn_jax.steps.train_step`, dropout off) from the same float32
params and batch in float32 and in bfloat16 compute, then N steps on that fixed batch in each. Prints the
relative loss difference, the cosine between the two gradient vectors, the relative global-norm difference,
the loss curves' largest relative gap, and the dtypes of params/optimiser state after bf16 steps (must stay
float32). tests/test_bf16.py asserts the same on the CPU at tiny widths; this runs the native geometries on an
accelerator, where bf16 uses the tensor cores. No TensorFlow needed.

  python benchmarks/bf16_check.py                       # alexnet 227, vgg11 224, nin 224, batch 32
  python benchmarks/bf16_check.py --models=nin --res=32 --geometry=small --width=0.25
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnn_jax import models  # pylint: disable=g-import-not-at-top
from cnn_jax import ops
from cnn_jax import steps

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["alexnet", "vgg11", "nin"], "Registry names.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("res", 0, "Input side; 0 = native.")
flags.DEFINE_enum("geometry", "native", ["native", "small"], "Model geometry.")
flags.DEFINE_float("width", 1.0, "Channel width multiplier.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")
flags.DEFINE_integer("steps", 10, "Steps on the fixed batch per dtype.")
flags.DEFINE_float("lr", 0.002, "Learning rate of the N-step run.")


def _record_grads():
  """Pass-through transform that keeps the raw gradients in the optimiser state (read after one step)."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params), lambda g, s, p=None: (g, g))


def check(name):
  res = FLAGS.res or models.native_resolution(name)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(FLAGS.batch, res, res, 3)).astype(np.float32)),
           "label": jnp.asarray(rng.integers(0, FLAGS.num_classes, FLAGS.batch).astype(np.int32))}
  nets = {dt: models.get_model(name, FLAGS.num_classes, geometry=FLAGS.geometry, width=FLAGS.width,
                               dropout_rate=0.0, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)}
  tx = optax.chain(_record_grads(), optax.add_decayed_weights(5e-4), optax.sgd(FLAGS.lr, momentum=0.9))
  base = steps.create_train_state(nets[jnp.float32], tx, jax.random.key(0, impl="rbg"), (res, res, 3))
  step = jax.jit(steps.train_step, compiler_options=ops.compiler_options())
  out = {}
  for dt, net in nets.items():
    state = base.replace(apply_fn=net.apply)
    losses, grads = [], None
    for i in range(FLAGS.steps + 1):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
      if i == 0:
        grads = state.opt_state[0]
    out[dt] = (losses, grads, state)
  l32, g32, _ = out[jnp.float32]
  l16, g16, s16 = out[jnp.bfloat16]
  v32 = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g32)])
  v16 = jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(g16)])
  cos = float(v32 @ v16 / (jnp.linalg.norm(v32) * jnp.linalg.norm(v16)))
  norm_rel = abs(float(jnp.linalg.norm(v16) / jnp.linalg.norm(v32)) - 1)
  gap = max(abs(a - b) / abs(a) for a, b in zip(l32, l16))
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves((s16.params, s16.opt_state))})
  print(f"{name} {res}px batch {FLAGS.batch} on {jax.devices()[0].device_kind}: loss fp32 {l32[0]:.4f} bf16 "
        f"{l16[0]:.4f} (rel {abs(l16[0] - l32[0]) / abs(l32[0]):.1e}); grad cosine {cos:.5f}, norm rel "
        f"{norm_rel:.1e}; {FLAGS.steps} steps: {l32[0]:.3f} -> fp32 {l32[-1]:.3f} / bf16 {l16[-1]:.3f}, max "
        f"curve gap {100 * gap:.2f}%; bf16 run's params+opt state dtypes {dtypes}", flush=True)


def main(argv):
  del argv
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
  for name in FLAGS.models:
    check(name)


if __name__ == "__main__":
  app.run(main)
