r"""NiN (Lin et al., 2013): conv + two 1x1 convs per block, global average pooling, no FC layers.

  # d2l recipe: Fashion-MNIST resized to 224, offline from the original files.
  python train.py --config=configs/nin.py --workdir=runs/nin --config.manual_dir=/path/to/fashion_mnist
  # CPU-practical: the small geometry at 32 px.
  python train.py --config=configs/nin.py:small --workdir=runs/nin_small --config.manual_dir=...
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="nin", native_res=224)
