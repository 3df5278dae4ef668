"""cnn_jax: the classic CNNs after LeNet (AlexNet, VGG, NiN, LeNet) in JAX/Flax.

Modules:
  models/   Flax linen networks and their registry (``cnn_jax.models.get_model``).
  data/     tfds / tf.data input pipeline (never imports flax or jax).
  ops/      low-level layer kernels (convolution, pooling) with CPU-tuned gradients.
  train.py  the training loop (``train_and_evaluate``).
"""

__version__ = "0.1.0"
