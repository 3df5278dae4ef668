"""Pixel statistics of a dataset (normalisation mean/std, PCA-lighting eigen decomposition), TensorFlow-free.

The host pipeline feeds `accumulate` with pixels it decodes through tf.data (datasets.rgb_statistics); the
device input feeds it from the uint8 array cache. Both sample the same pixels of the same first images, so a
fixed-size dataset gets the same numbers either way, and both share one JSON cache file per (dataset, split).
"""

import dataclasses
import hashlib
import json
import os
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from cnn_jax.data.augment_spec import IMAGENET_EIGVALS, IMAGENET_EIGVECS
from cnn_jax.errors import UserError

# Per-channel mean / std of the training pixels in [0, 1] units (config.normalize = 'auto').
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MEAN_STD = {
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# Subsets of ImageNet share its published PCA lighting constants.
IMAGENET_LIKE = ("imagenet2012", "imagenette", "imagewang", "imagenet_resized")

# What rgb_statistics samples: the first MAX_IMAGES images of the split, about PIXELS_PER_IMAGE of each.
MAX_IMAGES = 2000
PIXELS_PER_IMAGE = 1024


@dataclasses.dataclass(frozen=True)
class RgbStatistics:
  """Pixel statistics of a training split in [0, 1] units: mean [3], std [3], and the eigen decomposition
  of the 3x3 RGB covariance (eigvals [3] descending, >= 0; eigvecs [3, 3] with eigvecs[:, i] the i-th)."""
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  eigvals: Tuple[float, float, float]
  eigvecs: Tuple[Tuple[float, float, float], ...]
  num_images: int


def sample_pixels(image: np.ndarray, pixels_per_image: int = PIXELS_PER_IMAGE) -> np.ndarray:
  """uint8 [H, W, 3] -> float64 [n, 3] in [0, 1]: every stride-th pixel in raster order, stride =
  max(H*W // pixels_per_image, 1) (the host pipeline samples the same pixels with tf ops)."""
  pixels = image.reshape(-1, 3)
  stride = max(len(pixels) // pixels_per_image, 1)
  return pixels[::stride].astype(np.float64) / 255.0


def accumulate(pixel_batches: Iterable[np.ndarray], what: str) -> RgbStatistics:
  """Statistics from an iterable of float64 [n, 3] pixel samples (one per image); UserError if empty."""
  total, outer, count, num_images = np.zeros(3), np.zeros((3, 3)), 0, 0
  for pixels in pixel_batches:
    total += pixels.sum(0)
    outer += pixels.T @ pixels
    count += len(pixels)
    num_images += 1
  if not count:
    raise UserError(f"{what} is empty; cannot compute its colour statistics")
  mean = total / count
  cov = outer / count - np.outer(mean, mean)
  eigvals, eigvecs = np.linalg.eigh(cov)
  order = np.argsort(eigvals)[::-1]
  eigvals = np.clip(eigvals[order], 0.0, None)  # rank-deficient (grayscale) -> tiny negatives
  eigvecs = eigvecs[:, order]
  eigvecs = eigvecs * np.where(eigvecs.sum(0) < 0, -1.0, 1.0)  # a fixed sign, whatever LAPACK returns
  return RgbStatistics(tuple(map(float, mean)), tuple(map(float, np.sqrt(np.clip(np.diag(cov), 0, None)))),
                       tuple(map(float, eigvals)), tuple(tuple(map(float, r)) for r in eigvecs), num_images)


def cache_path(cache_dir: str, source_name: str, base: str, split: str, max_images: int) -> str:
  """<cache_dir>/rgb_stats_<base>_<hash of (source, split, max_images)>.json."""
  key = hashlib.sha256(f"{source_name}|{split}|{max_images}".encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f"rgb_stats_{base}_{key}.json")


_MEMO: Dict[Tuple[str, str, int], RgbStatistics] = {}


def cached(source_name: str, base: str, split: str, cache_dir: Optional[str], compute,
           max_images: int = MAX_IMAGES) -> RgbStatistics:
  """The statistics of (source, split): from memory, else the JSON in `cache_dir`, else `compute()` (then
  written there). Several processes may share `cache_dir`: each writes its own file, then renames."""
  memo_key = (source_name, split, max_images)
  if memo_key in _MEMO:
    return _MEMO[memo_key]
  path = cache_path(cache_dir, source_name, base, split, max_images) if cache_dir else None
  if path and os.path.exists(path):
    with open(path) as f:
      d = json.load(f)
    stats = RgbStatistics(tuple(d["mean"]), tuple(d["std"]), tuple(d["eigvals"]),
                          tuple(tuple(r) for r in d["eigvecs"]), d["num_images"])
  else:
    stats = compute()
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(stats), f, indent=1)
      os.replace(tmp, path)
  _MEMO[memo_key] = stats
  return stats


def lighting_eigen(base: str, stats_fn) -> Tuple[np.ndarray, np.ndarray]:
  """(eigvals [3], eigvecs [3, 3]) for PCA lighting: ImageNet's published values for ImageNet and its
  subsets, else `stats_fn()`'s (the training split's)."""
  if base in IMAGENET_LIKE:
    return IMAGENET_EIGVALS, IMAGENET_EIGVECS
  stats = stats_fn()
  return np.array(stats.eigvals, np.float32), np.array(stats.eigvecs, np.float32)


def mean_std(spec, base: str, stats_fn) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
  """Normalisation constants of `config.normalize` = spec, or None for no normalisation.

  'auto' (default): known per-dataset values, else ImageNet's; 'imagenet'; 'dataset' (`stats_fn()`, the
  train split's statistics); 'none'; or {'mean': [...], 'std': [...]} (also written
  'mean=0.5,0.5,0.5;std=0.25,0.25,0.25' on the command line) in [0, 1] units.
  """
  if spec is None or spec == "none":
    return None
  if isinstance(spec, str) and spec.replace(" ", "").startswith("mean="):
    spec = _parse_mean_std(spec)
  if spec == "auto":
    return MEAN_STD.get(base, IMAGENET_MEAN_STD)
  if spec == "imagenet":
    return IMAGENET_MEAN_STD
  if spec == "dataset":
    stats = stats_fn()
    return stats.mean, stats.std
  if hasattr(spec, "get") and spec.get("mean") is not None and spec.get("std") is not None:
    mean, std = tuple(float(v) for v in spec.get("mean")), tuple(float(v) for v in spec.get("std"))
    if len(mean) not in (1, 3) or len(std) != len(mean) or min(std) <= 0:
      raise UserError(f"--config.normalize needs mean and std of 1 or 3 values with std > 0, got {spec}")
    return mean, std
  raise UserError(f"--config.normalize={spec!r} must be 'auto', 'imagenet', 'dataset', 'none' or "
                  f"{{'mean': [...], 'std': [...]}}")


def _parse_mean_std(spec: str) -> Dict[str, Tuple[float, ...]]:
  """'mean=0.5,0.4,0.3;std=0.2,0.2,0.2' -> {'mean': (0.5, 0.4, 0.3), 'std': (0.2, 0.2, 0.2)}."""
  out = {}
  try:
    for part in spec.replace(" ", "").split(";"):
      key, values = part.split("=", 1)
      out[key] = tuple(float(v) for v in values.split(","))
  except ValueError as e:
    raise UserError(f"--config.normalize={spec!r}: write it as 'mean=R,G,B;std=R,G,B' (numbers in [0, 1] "
                    "units)") from e
  return out
