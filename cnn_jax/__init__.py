"""cnn_jax: the classic CNNs after LeNet (AlexNet, VGG, NiN, LeNet) in JAX/Flax.

Modules:
  models/   Flax linen networks and their registry (``cnn_jax.models.get_model``).
  data/     tfds / tf.data input pipeline (never imports flax or jax).
  ops/      low-level layer kernels (convolution, pooling) with CPU-tuned gradients.
  train.py  the training loop (``train_and_evaluate``).
"""

__version__ = "0.1.0"

# TensorFlow's C++ start-up lines appear when it is first imported, often before an entry point's main
# runs (`python -m cnn_jax.data.prepare` imports TensorFlow with the package): hide them here unless the
# command line asks for library output (--verbosity). See cnn_jax/console.py.
from cnn_jax import console as _console  # noqa: E402

_console.quiet_tensorflow_startup()
