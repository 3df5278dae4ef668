r"""AlexNet (Krizhevsky et al., 2012) at its 227x227 geometry.

  python train.py --config=configs/alexnet.py --workdir=runs/alexnet --config.manual_dir=/path/to/fashion_mnist
  python train.py --config=configs/alexnet.py:small --workdir=runs/alexnet_small --config.manual_dir=...
Paper switches: --config.model_kwargs.lrn=True (local response normalisation), --config.model_kwargs.groups=2.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="alexnet", native_res=227, model_kwargs=dict(lrn=False, groups=1))
