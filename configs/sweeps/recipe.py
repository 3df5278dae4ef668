r"""The recipe search: which ONE shared recipe trains every family well. A stage varies one part of the recipe
for AlexNet, VGG-11 and NiN together (small geometry, width 1/4), everything else at the base recipe, so each
stage's report says which value is best for all three at once; the next stage starts from it.

  python sweep.py --sweep=configs/sweeps/recipe.py:stage=lr,epochs=2,dataset=folder:/data/cifar10 \
      --root=runs/recipe/lr --set=eval_split=holdout:10%
  python report.py --runs='runs/recipe/lr/*' --out=runs/report/recipe_lr
  python sweep.py --sweep=configs/sweeps/recipe.py:stage=schedule,epochs=2,lr=0.1,dataset=... ...

Stages (stage=NAME; its values with values=a+b+c):
  lr          optimizer.learning_rate (at batch 128; scaled with the batch)       0.025 0.05 0.1 0.2 0.4
  warmup      schedule.warmup_epochs                                             0 0.25 1
  schedule    schedule.name                                                      cosine linear onecycle
  nesterov    optimizer.nesterov                                                 False True
  clip        optimizer.grad_clip_norm (0 = off)                                 0 1 2
  decay       optimizer.weight_decay                                             1e-4 5e-4 1e-3
  smoothing   optimizer.label_smoothing                                          0 0.1 0.2
  ema         optimizer.ema_decay                                                0 0.99 0.999
  flip        eval_flip                                                          False True
  batch       batch_size                                                         64 128 256
  pad         augment.pad (the pad-crop's shift)                                 0 2 4
  epochs      num_epochs                                                         3 10 30
Sweep args: stage=, values=, models=a+b (default alexnet+vgg11+nin), width= (default 0.25), seeds=N (default 1);
dotted fields (optimizer.nesterov=True, schedule.name=linear, ...) and the stages' own fields (batch_size=64,
eval_flip=True) set the base recipe of every run;
anything else (epochs=, lr=, batch=, dataset=, smoke) goes to the base config string of configs/common.py.
"""

import ast

from configs import common
from configs.sweeps import _ablation

MODELS = ("alexnet", "vgg11", "nin")
STAGES = {
    "lr": ("optimizer.learning_rate", (0.025, 0.05, 0.1, 0.2, 0.4)),
    "warmup": ("schedule.warmup_epochs", (0.0, 0.25, 1.0)),
    "schedule": ("schedule.name", ("cosine", "linear", "onecycle")),
    "nesterov": ("optimizer.nesterov", (False, True)),
    "clip": ("optimizer.grad_clip_norm", (0.0, 1.0, 2.0)),
    "decay": ("optimizer.weight_decay", (1e-4, 5e-4, 1e-3)),
    "smoothing": ("optimizer.label_smoothing", (0.0, 0.1, 0.2)),
    "ema": ("optimizer.ema_decay", (0.0, 0.99, 0.999)),
    "flip": ("eval_flip", (False, True)),
    "batch": ("batch_size", (64, 128, 256)),
    "pad": ("augment.pad", (0, 2, 4)),
    "epochs": ("num_epochs", (3, 10, 30)),
}


def _value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a schedule name


def get_sweep(arg=None):
  """Returns (base config spec, [(run name, {dotted field: value})])."""
  args = common.parse_arg(arg)
  stage = args.pop("stage", "lr")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGES)}")
  field, values = STAGES[stage]
  if "values" in args:
    values = tuple(_value(v) for v in str(args.pop("values")).split("+"))
  seeds = int(args.pop("seeds", 1))
  recipe_fields = {f for f, _ in STAGES.values()}  # e.g. batch_size, eval_flip: fields without a dot
  fixed = {k: _value(v) for k, v in list(args.items())
           if ("." in k and not k.startswith("folder")) or k in recipe_fields}
  for k in fixed:
    args.pop(k)
  if stage == "epochs":
    args.pop("epochs", None)
  names, width, base = _ablation.pop_common(args, models=MODELS, epochs=args.pop("epochs", 3),
                                            width=args.pop("width", 0.25))
  if args:
    base += "," + ",".join(k if v is True else f"{k}={v}" for k, v in args.items())
  runs = []
  for value in values:
    for name in names:
      for seed in range(seeds):
        overrides = {**fixed, **_ablation.model_overrides(name, width), field: value, "seed": seed}
        runs.append((f"{name}_{stage}{value}_s{seed}", overrides))
  return base, runs
