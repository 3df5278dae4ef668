"""Shared pieces of the claim sweeps (activation, augmentation, dropout): one recipe, a few switches.

Not a sweep itself (no get_sweep); the sweep files import it.
"""

from configs import common

# The families the width= arg does not scale: LeNet is already tiny and is the baseline.
UNSCALED = ("lenet",)


def pop_common(args, *, models, epochs, width):
  """Pops the shared sweep args: (model names, width, base config spec); the rest stays in `args`."""
  names = str(args.pop("models", "+".join(models))).split("+")
  width = float(args.pop("width", width))
  base_args = ["small", f"epochs={args.pop('epochs', epochs)}"]
  for key in ("lr", "batch", "dataset"):
    if key in args:
      base_args.append(f"{key}={args.pop(key)}")
  if "smoke" in args:  # seconds-long plumbing version of the same sweep (tests, --dry_run checks)
    args.pop("smoke")
    base_args.append("smoke")
  return names, width, "configs/common.py:" + ",".join(base_args)


def model_overrides(name, width):
  """{'model': name, 'model_kwargs.width': width} (no width for UNSCALED families)."""
  out = {"model": name}
  if name not in UNSCALED:
    out["model_kwargs.width"] = width
  return out


def subset_overrides(train_examples, eval_every_epochs):
  """Train on the first `train_examples` training images (0 = all) and measure the train-test gap on them.

  A smaller training set makes overfitting show within a few CPU-minutes; the train side of the gap is
  measured with eval preprocessing (no augmentation, no dropout) on the very images trained on.
  """
  split = f"train[:{int(train_examples)}]" if int(train_examples) > 0 else "train"
  return {"train_split": split, "eval_train_split": split, "eval_every_epochs": float(eval_every_epochs)}


def overfitting_runs(args, known, variants, run_name):
  """The runs of an overfitting sweep (augmentation, dropout): every model x variant on a training subset.

  `variants`: {variant: {dotted field: value}}; `run_name(model, variant, n_models)` names a run. Pops
  train= (training images, default 10,000), eval_every= (epochs, default 2) and the shared args; the base is
  the small geometry for 12 epochs, models default to AlexNet at width 0.25.
  """
  if "model" in args:
    args["models"] = args.pop("model")
  train = args.pop("train", 10_000)
  eval_every = args.pop("eval_every", 2)
  names, width, base = pop_common(args, models=("alexnet",), epochs=12, width=0.25)
  check_no_args_left(args, known)
  runs = []
  for name in names:
    for variant, fields in variants.items():
      overrides = model_overrides(name, width)
      overrides.update(subset_overrides(train, eval_every))
      overrides.update(fields)
      runs.append((run_name(name, variant, len(names)), overrides))
  return base, runs


def check_no_args_left(args, known):
  if args:
    raise ValueError(f"unknown sweep arg(s) {sorted(args)}; known: {sorted(known)}")
