"""TensorFlow for the host pipeline, imported with the GPUs hidden so that it never competes with JAX.

Only the tf.data side (datasets.py, augment.py, pipeline.py) imports this; the device-resident input and a
run whose splits are in the array cache never load TensorFlow at all.
"""

import tensorflow as tf

try:  # must run before TF touches any device
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised by someone else: nothing we can change
  pass

__all__ = ["tf"]
