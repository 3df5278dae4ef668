r"""How long the parameter init takes to compile at XLA's default LLVM -O3 vs -O2 (steps.jit_init), and whether
the two give the same bits.

  python benchmarks/init_compile.py [--models=lenet:28,nin:224,alexnet:227,vgg11:224,vgg16_bn:224]

Each entry is model[:image_size[:width]] (small geometry below 67 px for AlexNet/NiN, below 224 px for
VGG). Per model: a fresh jit of `steps.create_train_state` compiled and run once at the default and once
with `steps.init_compiler_options()`, in that order, in one process; then a bit-for-bit comparison of every
array (params, optimiser state, step, key). Runs on whatever backend JAX finds; the options are -O2 on the
CPU only (elsewhere both columns compile the same program).
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODELS = flags.DEFINE_string("models", "lenet:28,nin:32:0.25,vgg11_bn:32:0.125,alexnet:32:0.125,nin:224,"
                              "alexnet:227,vgg11:224,vgg16_bn:224", "model[:image_size[:width]], comma-separated.")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")


def _bits(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  from cnn_jax import steps  # pylint: disable=g-import-not-at-top

  print(f"JAX {jax.__version__} on {jax.default_backend()}; init options {steps.init_compiler_options()}")
  print(f"{'model':<24} {'default (s)':>11} {'jit_init (s)':>12} {'ratio':>6}  bit-identical")
  key = jax.random.PRNGKey(0)
  for entry in _MODELS.value.split(","):
    parts = entry.split(":")
    name, size = parts[0], int(parts[1]) if len(parts) > 1 else 224
    kwargs = {}
    if len(parts) > 2:
      kwargs["width"] = float(parts[2])
    if (name.startswith(("alexnet", "nin")) and size < 67) or (name.startswith("vgg") and size < 224):
      kwargs["geometry"] = "small"
    model = models.get_model(name, _CLASSES.value, **kwargs)
    tx = optax.sgd(0.01, momentum=0.9)
    t = time.perf_counter()
    default = jax.jit(lambda k, m=model, s=size: steps.create_train_state(m, tx, k, (s, s, 3)))(key)
    jax.block_until_ready(default)
    t_default = time.perf_counter() - t
    t = time.perf_counter()
    fast = steps.jit_init(model, tx, (size, size, 3))(key)
    jax.block_until_ready(fast)
    t_fast = time.perf_counter() - t
    label = f"{name} {size}px" + (f" w{kwargs['width']:g}" if "width" in kwargs else "")
    print(f"{label:<24} {t_default:>11.2f} {t_fast:>12.2f} {t_default / t_fast:>5.1f}x  "
          f"{_bits(default) == _bits(fast)}", flush=True)


if __name__ == "__main__":
  app.run(main)
