"""TensorFlow for the host pipeline, imported with the GPUs hidden so that it never competes with JAX.

Only the tf.data side (datasets.py, augment.py, pipeline.py) imports this; the device-resident input and a
run whose splits are in the array cache never load TensorFlow at all.

oneDNN's custom TensorFlow ops are turned off (unless $TF_ENABLE_ONEDNN_OPTS says otherwise): TensorFlow
enables them by default on some CPU kinds only (AVX-512 ones), so the host pipeline would run other kernels on
other machines, and announces it with start-up lines that no log level silences.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

try:  # must run before TF touches any device
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised by someone else: nothing we can change
  pass

__all__ = ["tf"]
