r"""NiN (Lin et al., 2013): conv + two 1x1 convs per block, global average pooling, no FC layers.

  # d2l recipe: Fashion-MNIST resized to 224 (hours on a CPU: a GPU's job). Workdir runs/nin.
  python train.py --config=configs/nin.py
  # CPU-practical: the small geometry at 32 px; `quick` is it at width 1/4 for 3 epochs (minutes).
  python train.py --config=configs/nin.py:small
  python train.py --config=configs/nin.py:quick
Offline: add --config.manual_dir=/path/to/fashion_mnist (the four original files). Dropout 0.5 before the
last block is NiN's own default (cnn_jax/models/nin.py), not part of the shared recipe.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="nin", native_res=224)
