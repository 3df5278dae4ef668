r"""Claim 1: ReLU lets these networks train where sigmoid stalls. Per-layer gradient norms are logged.

Every family once with ReLU and once with sigmoid (everything else identical: the shared small-geometry
recipe at 32 px). Each run logs 'grad_norm/<layer>' at every log step (config.log_grad_norms), so the
report shows, besides the accuracy curves, how the gradient reaching the first layers shrinks.

  python sweep.py --sweep=configs/sweeps/activation.py --root=runs/activation --set=data_dir=...
  python report.py --runs=runs/activation --out=reports/activation      # + grad_norms.png

Sweep args: models=alexnet+vgg11+lenet, activations=relu+sigmoid, epochs=3, width=0.25 (not LeNet),
lr=, batch=, smoke.
"""

from configs.sweeps import _ablation

KNOWN = ("models", "activations", "epochs", "width", "lr", "batch", "dataset", "smoke")


def get_sweep(arg=None):
  args = _ablation.common.parse_arg(arg)
  acts = str(args.pop("activations", "relu+sigmoid")).split("+")
  names, width, base = _ablation.pop_common(args, models=("alexnet", "vgg11", "lenet"), epochs=3,
                                            width=0.25)
  _ablation.check_no_args_left(args, KNOWN)
  runs = []
  for name in names:
    for act in acts:
      overrides = _ablation.model_overrides(name, width)
      overrides.update({"model_kwargs.activation": act, "log_grad_norms": True, "log_every_steps": 20})
      runs.append((f"{name}_{act}", overrides))
  return base, runs
