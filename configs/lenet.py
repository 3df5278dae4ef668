r"""LeNet-5 (LeCun et al., 1998) as d2l gives it: the cheap baseline, at Fashion-MNIST's own 28x28.

  python train.py --config=configs/lenet.py               # 28 px; no dropout, as in the paper (the model's default)
"""

from configs import common


def get_config(arg=None):
  return common.get_config(arg, model="lenet", native_res=28)
