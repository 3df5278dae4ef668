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

KNOWN = ("rates", "models", "epochs", "width", "train", "eval_every", "lr", "batch", "dataset", "smoke")


def get_sweep(arg=None):
  args = _ablation.common.parse_arg(arg)
  rates = [float(r) for r in str(args.pop("rates", "0.5+0.0")).split("+")]
  train = args.pop("train", 10_000)
  eval_every = args.pop("eval_every", 2)
  names, width, base = _ablation.pop_common(args, models=("alexnet",), epochs=12, width=0.25)
  _ablation.check_no_args_left(args, KNOWN)
  runs = []
  for name in names:
    for rate in rates:
      overrides = _ablation.model_overrides(name, width)
      overrides.update(_ablation.subset_overrides(train, eval_every))
      overrides["model_kwargs.dropout_rate"] = rate
      runs.append((f"{name}_dropout{rate:g}", overrides))
  return base, runs
