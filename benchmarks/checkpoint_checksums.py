r"""What the checkpoint checksums cost against saving and restoring an AlexNet-sized train state.

  python benchmarks/checkpoint_checksums.py [--model=alexnet --image_size=227 --num_classes=1000]

Builds the model's real train state (params + SGD momentum, float32), then times, best of --repeats:
  checksums         cnn_jax.checksum.checksums (numpy on the CPU backend, one jitted reduction elsewhere)
  save (blocking)   what the train loop waits for in an asynchronous save (copy to host), with and
                    without the checksums the loop adds
  save (total)      until the background write has finished
  restore           CheckpointManager.restore of the state, then verifying the checksums
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", "alexnet", "Model name.")
_SIZE = flags.DEFINE_integer("image_size", 227, "Input size.")
_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per quantity (the best is printed).")


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from cnn_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cnn_jax import checksum  # pylint: disable=g-import-not-at-top
  from cnn_jax import models  # pylint: disable=g-import-not-at-top
  from cnn_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top

  model = models.get_model(_MODEL.value, _CLASSES.value)
  tx = optax.sgd(0.01, momentum=0.9)
  state = steps_lib.jit_init(model, tx, (_SIZE.value, _SIZE.value, 3))(jax.random.PRNGKey(0))
  tree = ckpt_lib.state_to_tree(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  print(f"{_MODEL.value} {_SIZE.value}px {_CLASSES.value} classes: train state {nbytes / 1e6:.0f} MB "
        f"({jax.default_backend()})")
  sums = checksum.checksums(tree)
  t_sum = _best(lambda: checksum.checksums(tree), _REPEATS.value)

  root = tempfile.mkdtemp(prefix="ckpt_bench_")
  manager = ckpt_lib.make_manager(root, keep=2, async_save=True)
  step = [0]

  def orbax_save(meta):
    step[0] += 1
    manager.save(step[0], args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                  meta=ocp.args.JsonSave(meta)), force=True)

  def timed_save(with_sums):
    t = time.perf_counter()
    orbax_save({"checksums": checksum.checksums(tree)} if with_sums else {})
    blocking = time.perf_counter() - t
    manager.wait_until_finished()
    return blocking, time.perf_counter() - t

  plain = min(timed_save(False) for _ in range(_REPEATS.value))
  summed = min(timed_save(True) for _ in range(_REPEATS.value))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  last = manager.latest_step()

  def restore(verify):
    restored = manager.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    if verify:
      assert not checksum.mismatch(sums, checksum.checksums(restored))

  t_restore = _best(lambda: restore(False), _REPEATS.value)
  t_restore_verify = _best(lambda: restore(True), _REPEATS.value)
  print(f"checksums of every array:            {t_sum:.3f} s ({nbytes / 1e9 / t_sum:.1f} GB/s)")
  print(f"save, blocking part (without / with): {plain[0]:.3f} / {summed[0]:.3f} s")
  print(f"save, total         (without / with): {plain[1]:.3f} / {summed[1]:.3f} s")
  print(f"restore             (without / with): {t_restore:.3f} / {t_restore_verify:.3f} s")


if __name__ == "__main__":
  app.run(main)
