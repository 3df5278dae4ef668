r"""VGG (Simonyan & Zisserman, 2014): blocks of 3x3 convs, each ending in a 2x2 max-pool; AlexNet's FC head.

  python train.py --config=configs/vgg.py --workdir=runs/vgg11 --config.manual_dir=/path/to/fashion_mnist
  python train.py --config=configs/vgg.py:small --workdir=runs/vgg11_small --config.manual_dir=...
Depth/BatchNorm: --config.model=vgg16 or vgg11_bn. d2l trains VGG-11 at 1/4 width: --config.model_kwargs.width=0.25.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="vgg11", native_res=224)
