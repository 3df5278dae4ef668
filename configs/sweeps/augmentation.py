r"""Claim 2: flip / crop / colour augmentation reduces overfitting (train-test accuracy gap).

AlexNet (small geometry, 32 px) trained on the first 10,000 Fashion-MNIST training images for 12 epochs,
once per augmentation variant; everything else identical. At every eval the run also measures top-1 on
those 10,000 training images with eval preprocessing (config.eval_train_split), so summary.json holds
the train-test gap (gap_top1) and the report shows it per run.

  python sweep.py --sweep=configs/sweeps/augmentation.py --root=runs/augmentation --set=data_dir=...
  python report.py --runs=runs/augmentation --out=reports/augmentation     # + train_vs_test.png

Variants (variants=a+b+..., default none+flip+crop+crop_flip+all):
  none        no augmentation at all
  flip        horizontal flip only
  crop        pad-4 random crop only
  colour      brightness and contrast jitter (0.3) only
  pca         AlexNet's PCA lighting (sigma 0.1) only
  crop_flip   the shared recipe's default (crop + flip)
  all         crop + flip + colour + PCA lighting
Other args: model=alexnet, width=0.25, epochs=12, train=10000 (training images; 0 = all 60,000),
eval_every=2 (epochs), lr=, batch=, smoke.
"""

from configs.sweeps import _ablation

_OFF = {"augment.crop": "none", "augment.flip": False, "augment.brightness": 0.0,
        "augment.contrast": 0.0, "augment.pca_lighting": 0.0}
_CROP = {"augment.crop": "pad_random_crop"}
_FLIP = {"augment.flip": True}
_COLOUR = {"augment.brightness": 0.3, "augment.contrast": 0.3}
_PCA = {"augment.pca_lighting": 0.1}
VARIANTS = {
    "none": {},
    "flip": _FLIP,
    "crop": _CROP,
    "colour": _COLOUR,
    "pca": _PCA,
    "crop_flip": {**_CROP, **_FLIP},
    "all": {**_CROP, **_FLIP, **_COLOUR, **_PCA},
}
DEFAULT_VARIANTS = ("none", "flip", "crop", "crop_flip", "all")
KNOWN = ("variants", "model", "models", "epochs", "width", "train", "eval_every", "lr", "batch",
         "dataset", "smoke")


def get_sweep(arg=None):
  args = _ablation.common.parse_arg(arg)
  variants = str(args.pop("variants", "+".join(DEFAULT_VARIANTS))).split("+")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown augmentation variant(s) {unknown}; known: {sorted(VARIANTS)}")
  return _ablation.overfitting_runs(
      args, KNOWN, {v: {**_OFF, **VARIANTS[v]} for v in variants},
      lambda model, variant, n_models: f"{model}_{variant}" if n_models > 1 else variant)
