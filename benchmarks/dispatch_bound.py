r"""Train throughput with the loop's dispatch bound (step t waits for step t-2) against an unbounded queue.

  python benchmarks/dispatch_bound.py --config=configs/nin.py:small,width=0.25 --steps=60 --pairs=3 \
      --data_dir=/path/to/prepared/tfds

Runs the same short training alternately with cnn_jax.recovery.DispatchBound(depth=2) (what train.py uses)
and with an unbounded queue (depth 10^9, JAX's plain asynchronous dispatch), in one process, and prints
the training img/s (summary.json's train_img_per_s: eval and compilation excluded) of every run and the
median ratio bounded / unbounded. Interleaving the pairs keeps a busy machine's drift out of the ratio.
"""

import json
import os
import statistics
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = flags.DEFINE_string("config", "configs/nin.py:small,width=0.25", "Config file[:args].")
_STEPS = flags.DEFINE_integer("steps", 60, "Train steps per run.")
_PAIRS = flags.DEFINE_integer("pairs", 3, "Bounded/unbounded pairs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared tfds data dir.")
_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "Fake CPU devices (CPU only).")


def main(argv):
  del argv
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before any JAX operation; CPU only
  from cnn_jax import recovery  # pylint: disable=g-import-not-at-top
  from cnn_jax import train  # pylint: disable=g-import-not-at-top
  from cnn_jax.compare.sweep import apply_overrides  # pylint: disable=g-import-not-at-top

  path, _, arg = _CONFIG.value.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  overrides = dict(num_train_steps=_STEPS.value, log_every_steps=20, checkpoint_every_steps=10**6,
                   eval_every_epochs=1000.0, eval_split="test[:256]", progress=False)
  if _DATA_DIR.value:
    overrides["data_dir"] = _DATA_DIR.value
  config = apply_overrides(module.get_config(arg or None), overrides)

  real_bound = recovery.DispatchBound
  rates = {2: [], 10**9: []}
  for _ in range(_PAIRS.value):
    for depth in (2, 10**9):
      recovery.DispatchBound = lambda depth=depth, **_: real_bound(depth=depth)
      summary = train.train_and_evaluate(config, tempfile.mkdtemp(prefix="dispatch_bound_"))
      rates[depth].append(summary["train_img_per_s"])
      name = "2" if depth == 2 else "unbounded"
      print(json.dumps({"depth": name, "img_per_s": round(rates[depth][-1], 1)}), flush=True)
  recovery.DispatchBound = real_bound
  ratios = [a / b for a, b in zip(rates[2], rates[10**9])]
  print(f"bounded (depth 2) / unbounded img/s: median {statistics.median(ratios):.3f} "
        f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
  app.run(main)
