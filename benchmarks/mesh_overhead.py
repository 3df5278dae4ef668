r"""Step time of the same global batch on a 1-device mesh and on an N-fake-device mesh (one process, CPU).

What sharding over fake CPU devices costs (the gradient all-reduce, smaller per-device GEMMs, one dispatch
per device): the number to keep in mind when the tests or a laptop run use --cpu_devices. The two meshes
run interleaved (one step of each in turn) so load from other processes hits both alike; medians.

  python benchmarks/mesh_overhead.py --models=lenet,nin --batch=256 --devices=8
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["lenet", "nin"], "Registry names (small geometry, width --width).")
flags.DEFINE_integer("batch", 256, "Global batch.")
flags.DEFINE_integer("res", 32, "Input side in px.")
flags.DEFINE_float("width", 0.25, "Channel width multiplier.")
flags.DEFINE_integer("devices", 8, "Fake CPU devices of the second mesh.")
flags.DEFINE_integer("steps", 20, "Timed steps per mesh.")


def main(argv):
  del argv
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  from cnn_jax import models, ops, sharding as shd, steps  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(FLAGS.batch, FLAGS.res, FLAGS.res, 3)).astype(np.float32),
           "label": rng.integers(0, 10, FLAGS.batch).astype(np.int32)}
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, global batch {FLAGS.batch}, "
        f"{FLAGS.res}px, width {FLAGS.width}")
  for name in FLAGS.models:
    kwargs = dict(width=FLAGS.width)
    if name != "lenet":
      kwargs["geometry"] = "small"
    model = models.get_model(name, 10, **kwargs)
    runs = {}
    for n in (1, FLAGS.devices):
      mesh = shd.make_mesh(jax.devices()[:n])
      repl = shd.replicated(mesh)
      state = steps.jit_init(model, optax.sgd(0.01, 0.9), (FLAGS.res, FLAGS.res, 3), out_shardings=repl)(
          jax.random.PRNGKey(0))
      step = jax.jit(steps.train_step, in_shardings=(repl, shd.batch_sharded(mesh)),
                     out_shardings=(repl, repl), donate_argnums=(0,),
                     compiler_options=ops.compiler_options())
      global_batch = shd.make_global_batch(batch, mesh)
      state, metrics = step(state, global_batch)  # compile + warm up
      jax.block_until_ready(metrics)
      runs[n] = [step, state, global_batch, []]
    for _ in range(FLAGS.steps):
      for n, run in runs.items():
        t = time.perf_counter()
        run[1], metrics = run[0](run[1], run[2])
        jax.block_until_ready(metrics)
        run[3].append(time.perf_counter() - t)
    t1, tn = (statistics.median(runs[n][3]) for n in (1, FLAGS.devices))
    print(f"{name:6s} 1 device {1e3 * t1:7.1f} ms/step ({FLAGS.batch / t1:6.0f} img/s) | "
          f"{FLAGS.devices} devices {1e3 * tn:7.1f} ms/step ({FLAGS.batch / tn:6.0f} img/s) | "
          f"overhead {100 * (tn / t1 - 1):+.0f}%")


if __name__ == "__main__":
  app.run(main)
