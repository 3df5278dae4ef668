r"""AlexNet vs VGG-11 vs NiN vs LeNet under ONE recipe: Fashion-MNIST at 32 px, small geometry, x seeds.

Every run shares `configs/common.py:small` (pipeline, augmentation, optimiser, schedule, epochs); a run
changes only `model` and `seed`, so the pipeline fingerprints agree except for the seed and report.py
verifies that before it compares anything.

  python sweep.py --sweep=configs/sweeps/families.py --root=runs/families \
      --set=manual_dir=/path/to/fashion_mnist            # or --set=data_dir=... (a prepared tfds dir)
  python report.py --runs='runs/families/*' --out=reports/families
  tensorboard --logdir runs/families

Sweep args (after the colon, comma-separated):
  seeds=N            seeds 0..N-1 per architecture (default 3).
  models=a+b+...     architectures (default alexnet+vgg11+nin+lenet).
  width=F            channel multiplier for AlexNet, VGG and NiN (default 1.0; 0.25 is CPU-friendly). LeNet
                     always runs at its own (paper) size: it is already tiny, and it is the baseline.
  anything else      goes to the base config string, e.g. epochs=5, lr=0.02, batch=256, smoke.
"""

from configs import common
from configs.sweeps import _ablation

DEFAULT_MODELS = ("alexnet", "vgg11", "nin", "lenet")

# Model kwargs that MUST differ per family go here (none do: the small geometry and width apply to all).
FAMILY_KWARGS = {name: {} for name in DEFAULT_MODELS}
UNSCALED = _ablation.UNSCALED  # families the sweep's width= does not scale (LeNet)


def get_sweep(arg=None):
  """Returns (base config spec, [(run name, {dotted field: value})])."""
  args = common.parse_arg(arg)
  seeds = int(args.pop("seeds", 3))
  names = str(args.pop("models", "+".join(DEFAULT_MODELS))).split("+")
  width = args.pop("width", None)
  base_args = ["small"] + [k if v is True else f"{k}={v}" for k, v in args.items() if k != "small"]
  base = "configs/common.py:" + ",".join(base_args)
  runs = []
  for name in names:
    for seed in range(seeds):
      overrides = {"model": name, "seed": seed}
      if width is not None and name not in UNSCALED:
        overrides["model_kwargs.width"] = float(width)
      overrides.update({f"model_kwargs.{k}": v for k, v in FAMILY_KWARGS.get(name, {}).items()})
      runs.append((f"{name}_s{seed}", overrides))
  return base, runs
