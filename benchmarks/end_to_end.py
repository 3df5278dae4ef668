r"""End-to-end training img/s (input + step, measured by train.py's own loop) against the bare train step.

For each model, side by side in one run:
  synthetic  the same jitted `cnn_jax.steps.train_step` (same optimiser, same compiler options) on one
             constant batch already on the device: what the network alone costs
  host       `train.train_and_evaluate` with config.input='host' (tf.data on the host CPU)
  device     `train.train_and_evaluate` with config.input='device' (split resident on the device, gather +
             augmentation inside the jitted step)
The loop's img/s is the mean of its logged train records after the first (which holds compilation and
warm-up); the synthetic img/s is timed over the same number of steps after a warm-up. Ratios are
end-to-end / synthetic, and device / host.

  python benchmarks/end_to_end.py --data_dir=/path/to/prepared/tfds                # CPU: 32 px small, width 1/4
  python benchmarks/end_to_end.py --models=alexnet,vgg11,nin --geometry=native --width=1 \
      --batch=256 --dtype=bfloat16 --modes=device --steps=300 --array_cache_dir=...  # on a GPU

The augmentation is the shared recipe's (configs/common.py: pad-crop + flip at 32 px, AlexNet's
resize-crop + flip at the native resolutions). Evaluation (once, at the end of each run, on --eval_examples
test images) and checkpoints are not in the timed records.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
if __name__ == "__main__":  # defined only when run: the tests import this module's functions
  flags.DEFINE_list("models", ["lenet", "alexnet", "vgg11", "nin"], "Registry names.")
  flags.DEFINE_list("modes", ["host", "device"], "Input modes to time (host, device).")
  flags.DEFINE_enum("geometry", "small", ["small", "native"], "small: 32 px; native: the paper's resolution.")
  flags.DEFINE_float("width", 0.25, "Channel width of AlexNet/VGG/NiN (LeNet keeps its size).")
  flags.DEFINE_integer("batch", 128, "Global batch size.")
  flags.DEFINE_integer("steps", 100, "Timed steps per run (after the first logged interval).")
  flags.DEFINE_integer("log_every", 20, "The loop's log interval (one img/s record each).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_string("dataset", "fashion_mnist", "Dataset (tfds name or folder:...).")
  flags.DEFINE_string("data_dir", None, "Prepared tfds data dir (host mode, and to write the array cache).")
  flags.DEFINE_string("manual_dir", None, "Source files to prepare the dataset from, if not prepared.")
  flags.DEFINE_string("array_cache_dir", None, "Array cache folder (device mode).")
  flags.DEFINE_integer("eval_examples", 512, "Test images evaluated once at the end of each run.")
  flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")


def _config(model, mode):
  from configs import common  # pylint: disable=g-import-not-at-top
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  arg = "small" if FLAGS.geometry == "small" else ""
  config = common.get_config(arg, model=model, native_res=models.native_resolution(model))
  config.input = mode
  config.dataset = FLAGS.dataset
  config.data_dir = FLAGS.data_dir
  config.manual_dir = FLAGS.manual_dir
  config.array_cache_dir = FLAGS.array_cache_dir
  config.batch_size = FLAGS.batch
  config.dtype = FLAGS.dtype
  if model != "lenet":
    config.model_kwargs.width = FLAGS.width
  config.num_train_steps = FLAGS.steps + FLAGS.log_every
  config.log_every_steps = FLAGS.log_every
  config.checkpoint_every_steps = 10**9
  config.eval_every_epochs = 10**6
  config.eval_split = f"test[:{FLAGS.eval_examples}]"
  config.progress = False
  return config


def synthetic_img_per_s(config) -> float:
  """The bare train step on one constant on-device batch, timed like the loop (dispatch ahead, one sync)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn_jax import ops, sharding as shd, steps as steps_lib, train  # pylint: disable=g-import-not-at-top
  from cnn_jax.specs import OptimizerSpec  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh()
  model = train.build_model(config, 10)
  opt = OptimizerSpec.from_config(config)
  schedule = steps_lib.learning_rate_schedule(opt, 100, config.num_train_steps)
  tx = steps_lib.make_optimizer(opt, schedule)
  size = config.image_size
  repl = shd.replicated(mesh)
  state = steps_lib.jit_init(model, tx, (size, size, 3), out_shardings=repl)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = shd.make_global_batch({
      "image": rng.standard_normal((config.batch_size, size, size, 3)).astype(jnp.dtype(config.dtype)),
      "label": rng.integers(0, 10, config.batch_size).astype(np.int32)}, mesh)
  step = jax.jit(functools.partial(steps_lib.train_step, schedule=schedule),
                 in_shardings=(repl, shd.batch_sharded(mesh)), out_shardings=(repl, repl),
                 donate_argnums=(0,), compiler_options=ops.compiler_options())
  for _ in range(FLAGS.log_every):  # compile + warm up as the loop's first interval does
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return FLAGS.steps * config.batch_size / (time.perf_counter() - start)


class Stopped(Exception):
  """A signal (Ctrl-C, SIGTERM) stopped a run: the whole benchmark stops, the cut-short run is not reported."""

  def __init__(self, signal_name: str, what: str):
    super().__init__(f"{signal_name}: stopped during {what}; its img/s is not reported")
    self.signal_name = signal_name


def loop_img_per_s(config) -> float:
  """train.py's own loop: the mean img/s of its train records after the first interval.

  Raises Stopped if a signal stopped the loop early (train_and_evaluate then returns {'stopped': ...}).
  """
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    summary = train.train_and_evaluate(config, workdir)
    if summary.get("stopped"):
      raise Stopped(summary["stopped"], f"the {config.model} run with {config.input} input (after step "
                    f"{summary.get('step')})")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(l) for l in f]
  rates = [r["img_per_s"] for r in records if r["split"] == "train"][1:]
  # Each record covers log_every steps: the harmonic mean is total images / total time.
  return statistics.harmonic_mean(rates)


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # library lines (TensorFlow, tfds, Orbax) only with --verbosity, as in train.py
  import jax  # pylint: disable=g-import-not-at-top
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup_runtime(distributed="off")
  device = jax.devices()[0]
  print(f"end-to-end vs synthetic: {FLAGS.dataset}, {FLAGS.geometry} geometry, width {FLAGS.width}, batch "
        f"{FLAGS.batch}, {FLAGS.dtype}, {FLAGS.steps} timed steps, {jax.device_count()} x "
        f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores", flush=True)
  rows = []
  for model in FLAGS.models:
    row = {"model": model}
    base = _config(model, FLAGS.modes[0])
    # A signal outside the loop (here, or in a run's set-up) exits the process at once (cli.setup_runtime
    # guards it, status 130 / 143); one inside the loop ends that run early: stop everything, report nothing.
    row["synthetic"] = synthetic_img_per_s(base)
    for mode in FLAGS.modes:
      try:
        row[mode] = loop_img_per_s(_config(model, mode))
      except Stopped as e:
        print(f"{e}; the benchmark stops here{' (no --json_out written)' if FLAGS.json_out else ''}",
              file=sys.stderr, flush=True)
        return 130 if e.signal_name == "SIGINT" else 143
    rows.append(row)
    parts = [f"{model:8s} {base.image_size}px synthetic {row['synthetic']:8.0f} img/s"]
    for mode in FLAGS.modes:
      parts.append(f"{mode} {row[mode]:8.0f} img/s ({row[mode] / row['synthetic']:.2f}x)")
    if {"host", "device"} <= set(FLAGS.modes):
      parts.append(f"device/host {row['device'] / row['host']:.2f}x")
    print(" | ".join(parts), flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"device": device.device_kind, "backend": jax.default_backend(), "flags": {
          k: getattr(FLAGS, k) for k in ("geometry", "width", "batch", "steps", "dtype", "dataset")},
                 "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  app.run(main)
