"""Test-session set-up that must happen before JAX initialises: 8 fake CPU devices.

Every test then runs its jitted steps over a real 8-device mesh (the batch split on `data`), which is how
sharding bugs show up on a laptop. CNN_JAX_TEST_DEVICES overrides the count.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", int(os.environ.get("CNN_JAX_TEST_DEVICES", "8")))

try:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass
