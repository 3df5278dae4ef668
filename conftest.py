"""Test-session set-up that must happen before JAX initialises: 8 fake CPU devices, a temp array cache.

Every test then runs its jitted steps over a real 8-device mesh (the batch split on `data`), which is how
sharding bugs show up on a laptop. CNN_JAX_TEST_DEVICES overrides the count.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Array caches (the device input's decoded splits) of the whole session go to one temporary folder, never
# beside a shared tfds data dir; train.py subprocesses inherit it.
if "CNN_JAX_ARRAY_CACHE_DIR" not in os.environ:
  os.environ["CNN_JAX_ARRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnn_jax_arrays_")
  atexit.register(shutil.rmtree, os.environ["CNN_JAX_ARRAY_CACHE_DIR"], True)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", int(os.environ.get("CNN_JAX_TEST_DEVICES", "8")))

try:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass
