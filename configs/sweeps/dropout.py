r"""Claim 3: dropout 0.5 in the FC layers reduces overfitting (train-test accuracy gap).

AlexNet (small geometry, 32 px) on the first 10,000 Fashion-MNIST training images for 12 epochs with the
shared augmentation (crop + flip), once per dropout rate of the FC head; everything else identical.
Like the augmentation sweep, each run measures top-1 on its 10,000 training images with eval
preprocessing, so summary.json and the report hold the train-test gap.

  python sweep.py --sweep=configs/sweeps/dropout.py --root=runs/dropout --set=data_dir=...
  python report.py --runs=runs/dropout --out=reports/dropout

Sweep args: rates=0.5+0.0, models=alexnet (vgg11 and nin have the switch too; NiN's is its
pre-classifier dropout), width=0.25, epochs=12, train=10000, eval_every=2, lr=, batch=, smoke.
"""

from configs.sweeps import _ablation

KNOWN = ("rates", "model", "models", "epochs", "width", "train", "eval_every", "lr", "batch", "dataset", "smoke")


def get_sweep(arg=None):
  args = _ablation.common.parse_arg(arg)
  rates = [float(r) for r in str(args.pop("rates", "0.5+0.0")).split("+")]
  return _ablation.overfitting_runs(
      args, KNOWN, {f"{rate:g}": {"model_kwargs.dropout_rate": rate} for rate in rates},
      lambda model, rate, n_models: f"{model}_dropout{rate}")
