r"""VGG (Simonyan & Zisserman, 2014): blocks of 3x3 convs, each ending in a 2x2 max-pool; AlexNet's FC head.

  python train.py --config=configs/vgg.py                  # 224 px: a GPU's job
  python train.py --config=configs/vgg.py:quick            # the README's quick start: ~6 min on 2 CPU cores
Offline: add --config.manual_dir=/path/to/fashion_mnist. Dropout 0.5 in the FC head is VGG's own default.
Depth/BatchNorm: --config.model=vgg16 or vgg11_bn. d2l trains VGG-11 at 1/4 width: --config.model_kwargs.width=0.25.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="vgg11", native_res=224)
