r"""AlexNet (Krizhevsky et al., 2012) at its 227x227 geometry.

  python train.py --config=configs/alexnet.py              # 227 px: a GPU's job
  python train.py --config=configs/alexnet.py:quick        # small geometry, width 1/4, 3 epochs: minutes on a CPU
Offline: add --config.manual_dir=/path/to/fashion_mnist. Dropout 0.5 in the FC head is AlexNet's own default.
Paper switches: --config.model_kwargs.lrn=True (local response normalisation), --config.model_kwargs.groups=2.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="alexnet", native_res=227, model_kwargs=dict(lrn=False, groups=1))
