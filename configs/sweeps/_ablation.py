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


def check_no_args_left(args, known):
  if args:
    raise ValueError(f"unknown sweep arg(s) {sorted(args)}; known: {sorted(known)}")


__all__ = ["common", "UNSCALED", "pop_common", "model_overrides", "subset_overrides"]
