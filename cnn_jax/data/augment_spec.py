"""What the training augmentation is, independent of where it runs: settings, their checks, constants.

Both implementations read these: `augment.py` (TensorFlow ops in the host tf.data pipeline) and
`augment_jax.py` (JAX ops inside the jitted train step of the device-resident input). This module imports
neither TensorFlow nor JAX, so a run on device input never loads TensorFlow.
"""

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

from cnn_jax.errors import UserError

CROPS = ("random_resized", "resize_random_crop", "pad_random_crop", "none")
EVAL_CROPS = ("center", "ten_crop", "resize")

# AlexNet "fancy PCA" lighting: ImageNet's RGB eigenvalues and eigenvectors (columns), for pixel values
# in [0, 1]; the constants every re-implementation uses (fb.resnet.torch, timm, torchvision references).
IMAGENET_EIGVALS = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVECS = np.array([[-0.5675, 0.7192, 0.4009],
                             [-0.5808, -0.0045, -0.8140],
                             [-0.5836, -0.6948, 0.4203]], np.float32)

# ITU-R 601 luma weights (as PIL); they sum to 1, so grey pixels stay exactly grey.
LUMA = (0.299, 0.587, 0.114)

# Inception-style crops give up after this many draws and take the whole image (as tf.image does).
RANDOM_RESIZED_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The training augmentation, one field per `config.augment` entry (0 / False = op off).

  crop: 'random_resized' (Inception: a window of `area_range` x the image area and `aspect_range` w/h,
    resized to S), 'resize_random_crop' (AlexNet: shorter side resized to `resize_ratio` * S, random
    S x S crop), 'pad_random_crop' (CIFAR: pad `pad` pixels of the raw image with zeros, random crop of
    the raw size, resize to S), 'none' (resize the whole image to S x S).
  flip: random horizontal flip with probability 1/2.
  brightness, contrast, saturation: jitter factors drawn from [max(0, 1 - a), 1 + a] (torchvision's
    ColorJitter semantics); hue: shift drawn from [-hue, hue] of the colour circle (<= 0.5).
  pca_lighting: sigma of AlexNet's PCA lighting noise (0.1 in the paper).
  """
  crop: str = "none"
  resize_ratio: float = 256 / 224
  area_range: Tuple[float, float] = (0.08, 1.0)
  aspect_range: Tuple[float, float] = (3 / 4, 4 / 3)
  pad: int = 4
  flip: bool = False
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  pca_lighting: float = 0.0

  @classmethod
  def from_config(cls, augment: Optional[Any]) -> "AugmentSettings":
    """Builds and checks settings from a ConfigDict/dict (None = all defaults); bad values -> UserError."""
    if augment is None:
      return cls()
    values = dict(augment.to_dict() if hasattr(augment, "to_dict") else augment)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise UserError(f"unknown --config.augment field(s) {unknown}; known fields: {names}")
    for key in ("area_range", "aspect_range"):
      if key in values:
        values[key] = tuple(float(v) for v in values[key])
    settings = cls(**values)
    settings.check()
    return settings

  def check(self):
    """Raises UserError naming the first invalid field."""
    if self.crop not in CROPS:
      raise UserError(f"--config.augment.crop={self.crop!r} is not one of {list(CROPS)}")
    area, aspect = self.area_range, self.aspect_range
    if not (len(area) == 2 and 0 < area[0] <= area[1] <= 1):
      raise UserError(f"--config.augment.area_range={area} must be (lo, hi) with 0 < lo <= hi <= 1")
    if not (len(aspect) == 2 and 0 < aspect[0] <= aspect[1]):
      raise UserError(f"--config.augment.aspect_range={aspect} must be (lo, hi) with 0 < lo <= hi")
    if self.resize_ratio < 1:
      raise UserError(f"--config.augment.resize_ratio={self.resize_ratio} must be >= 1 (e.g. 256/224)")
    if self.pad < 0:
      raise UserError(f"--config.augment.pad={self.pad} must be >= 0")
    for name in ("brightness", "contrast", "saturation", "pca_lighting"):
      if getattr(self, name) < 0:
        raise UserError(f"--config.augment.{name}={getattr(self, name)} must be >= 0 (0 = off)")
    if not 0 <= self.hue <= 0.5:
      raise UserError(f"--config.augment.hue={self.hue} must be in [0, 0.5] (0 = off)")

  @property
  def has_color(self) -> bool:
    """True if any photometric op is on (flip excluded)."""
    return bool(self.brightness or self.contrast or self.saturation or self.hue or self.pca_lighting)


def check_eval_settings(eval_crop: str, resize_ratio: float) -> None:
  """UserError for eval preprocessing settings that cannot work."""
  if eval_crop not in EVAL_CROPS:
    raise UserError(f"--config.eval_crop={eval_crop!r} is not one of {list(EVAL_CROPS)}")
  if resize_ratio < 1:
    raise UserError(f"--config.eval_resize_ratio={resize_ratio} must be >= 1 (e.g. 256/224)")
