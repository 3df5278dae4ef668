"""The training augmentation and eval preprocessing as JAX ops, for batches already on the device.

The twin of `augment.py` (TensorFlow, host pipeline): the same `AugmentSettings` (augment_spec.py), the same
meanings and the same distributions, written as per-example functions of a uint8 image of a FIXED raw size
(the array cache stores a split as one [N, H, W, C] array) and a JAX PRNG key, vmapped over the batch and
compiled into the train step. `tests/test_augment_jax.py` checks them against the TensorFlow ops: equal pixels
for equal windows and factors, equal distributions of windows, flips and factors over many draws.

Conventions: an image is [H, W, C] (C = 1 or 3); crops are windows (offset_y, offset_x, height, width) of
int32 scalars sampled from the static raw size and a key; `crop_and_resize` is TF's "crop, then bilinear
resize with half-pixel centres and edge clamping" written as two small interpolation matrices, so only the
window's pixels contribute (what `tf.image.resize(image[y:y+h, x:x+w])` computes). Colour ops take float32
[S, S, 3] in [0, 1]. dm-pix provides the hue rotation; brightness, contrast and saturation keep the
torchvision meanings the host pipeline uses (dm-pix's brightness is additive), so they are written here.
"""

from typing import Sequence, Tuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data.augment_spec import (IMAGENET_EIGVALS, IMAGENET_EIGVECS, LUMA,
                                       RANDOM_RESIZED_ATTEMPTS, AugmentSettings)

Window = Tuple[jax.Array, jax.Array, jax.Array, jax.Array]


# --- Crop windows (from the static raw size and a key) ---------------------------------------------

def random_resized_crop_window(key: jax.Array, height: int, width: int, area_range=(0.08, 1.0),
                               aspect_range=(3 / 4, 4 / 3),
                               max_attempts: int = RANDOM_RESIZED_ATTEMPTS) -> Window:
  """Inception-style window drawn exactly as tf.image.stateless_sample_distorted_bounding_box draws it.

  Per attempt: aspect (w/h) uniform in `aspect_range`; height uniform over the integers whose area can lie
  in `area_range` x H*W; width = round(height * aspect); the first attempt that fits is taken, else the whole
  image. Offsets are uniform in [0, H - h) and [0, W - w) (0 when the window spans the side), as in TF.
  Returns int32 scalars (offset_y, offset_x, h, w).
  """
  area = float(height * width)
  min_area, max_area = area_range[0] * area, area_range[1] * area
  k_aspect, k_height, k_y, k_x = jax.random.split(key, 4)
  aspect = jax.random.uniform(k_aspect, (max_attempts,), jnp.float32, aspect_range[0], aspect_range[1])
  h_lo = jnp.round(jnp.sqrt(min_area / aspect)).astype(jnp.int32)
  h_hi = jnp.round(jnp.sqrt(max_area / aspect)).astype(jnp.int32)
  # The largest height whose rounded width still fits.
  too_wide = jnp.round(h_hi * aspect) > width
  h_hi_fit = ((width + 0.5 - 1e-7) / aspect).astype(jnp.int32)
  h_hi_fit = jnp.where(jnp.round(h_hi_fit * aspect) > width, h_hi_fit - 1, h_hi_fit)
  h_hi = jnp.minimum(jnp.where(too_wide, h_hi_fit, h_hi), height)
  h_lo = jnp.minimum(h_lo, h_hi)
  u = jax.random.uniform(k_height, (max_attempts,))
  h = h_lo + jnp.minimum((u * (h_hi - h_lo + 1)).astype(jnp.int32), h_hi - h_lo)
  w = jnp.round(h * aspect).astype(jnp.int32)
  small = (w * h).astype(jnp.float32) < min_area
  h = jnp.where(small, h + 1, h)
  w = jnp.where(small, jnp.round(h * aspect).astype(jnp.int32), w)
  a = (w * h).astype(jnp.float32)
  ok = (a >= min_area) & (a <= max_area) & (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  found = ok[first]
  h = jnp.where(found, h[first], height)
  w = jnp.where(found, w[first], width)
  y = _uniform_int(k_y, height - h)
  x = _uniform_int(k_x, width - w)
  return y, x, h, w


def _uniform_int(key: jax.Array, n: jax.Array) -> jax.Array:
  """An int32 uniform in [0, n), or 0 when n <= 0."""
  n = jnp.maximum(n, 1)
  return jax.random.randint(key, (), 0, n, jnp.int32)


def random_crop_window(key: jax.Array, height: int, width: int, side) -> Window:
  """A side x side window at a uniformly random position (side <= min(H, W))."""
  side = jnp.minimum(jnp.asarray(side, jnp.int32), min(height, width))
  k_y, k_x = jax.random.split(key)
  return (_uniform_int(k_y, height - side + 1), _uniform_int(k_x, width - side + 1), side, side)


def square_side(height: int, width: int, resize_ratio: float) -> int:
  """round(min(H, W) / resize_ratio) (at least 1): the raw-pixel side of "resize the shorter side to
  ratio * S, then take S x S" (AlexNet's 256 -> 224). Half-way values round to even, as tf.round."""
  return max(int(np.round(np.float32(min(height, width)) / np.float32(resize_ratio))), 1)


def resize_random_crop_window(key, height: int, width: int, resize_ratio: float) -> Window:
  """AlexNet's "resize shorter side to ratio*S, random S x S crop", as a window of the raw image."""
  return random_crop_window(key, height, width, square_side(height, width, resize_ratio))


def center_crop_window(height: int, width: int, resize_ratio: float = 1.0) -> Tuple[int, int, int, int]:
  """Centred square of side min(H, W) / resize_ratio (static ints)."""
  side = square_side(height, width, resize_ratio)
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


# --- Applying crops ----------------------------------------------------------------------------------

def _interpolation_matrix(start, length, size: int, extent: int) -> jax.Array:
  """[size, extent] float32 rows of bilinear weights: output i samples the window [start, start+length)
  at half-pixel centre start + (i + 0.5) * length / size - 0.5, clamped to the window (TF's resize of the
  cropped image)."""
  length_f = jnp.asarray(length, jnp.float32)
  start = jnp.asarray(start, jnp.int32)
  pos = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length_f / size) - 0.5
  pos = jnp.clip(pos, 0.0, length_f - 1.0)
  lo = jnp.floor(pos)
  frac = pos - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.asarray(length, jnp.int32) - 1)
  cols = jnp.arange(extent, dtype=jnp.int32)[None, :]
  w_lo = (cols == (start + lo)[:, None]) * (1.0 - frac)[:, None]
  w_hi = (cols == (start + hi)[:, None]) * frac[:, None]
  return (w_lo + w_hi).astype(jnp.float32)


def crop_and_resize(image: jax.Array, window: Window, size: int) -> jax.Array:
  """Crops `window` of [H, W, C] (any real dtype) and resizes it bilinearly to float32 [size, size, C] in the
  input's units (TF: tf.image.resize(image[y:y+h, x:x+w], [size, size]), no antialiasing)."""
  y, x, h, w = window
  rows = _interpolation_matrix(y, h, size, image.shape[0])
  cols = _interpolation_matrix(x, w, size, image.shape[1])
  image = image.astype(jnp.float32)
  out = jnp.einsum("sh,hwc->swc", rows, image, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("tw,swc->stc", cols, out, precision=jax.lax.Precision.HIGHEST)


def resize(image: jax.Array, size: int) -> jax.Array:
  """The whole image resized to size x size (float32)."""
  return crop_and_resize(image, (0, 0, image.shape[0], image.shape[1]), size)


def pad_random_crop(image: jax.Array, key: jax.Array, pad: int) -> jax.Array:
  """CIFAR-style: zero-pad `pad` pixels on each side, crop a random window of the original size (same
  shape and dtype); offsets uniform in [0, 2 * pad] as in the host op."""
  if pad == 0:
    return image
  height, width = image.shape[:2]
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  k_y, k_x = jax.random.split(key)
  y = jax.random.randint(k_y, (), 0, 2 * pad + 1, jnp.int32)
  x = jax.random.randint(k_x, (), 0, 2 * pad + 1, jnp.int32)
  return jax.lax.dynamic_slice(padded, (y, x, 0), image.shape)


def ten_crop(image: jax.Array, size: int, resize_ratio: float = 256 / 224) -> jax.Array:
  """AlexNet test-time crops of a fixed-size image: [H, W, C] -> float32 [10, size, size, C].

  Shorter side resized to resize_ratio * size, the 4 corner and the centre size x size crops, then their
  mirror images (order TL, TR, BL, BR, centre, flipped ones), as augment.ten_crop.
  """
  height, width = image.shape[:2]
  target = max(size, int(round(size * resize_ratio)))
  scale = np.float32(target) / np.float32(min(height, width))  # float32 as in the TF op
  new_h = max(int(np.round(np.float32(height) * scale)), size)
  new_w = max(int(np.round(np.float32(width) * scale)), size)
  rows = _interpolation_matrix(0, height, new_h, height)
  cols = _interpolation_matrix(0, width, new_w, width)
  resized = jnp.einsum("sh,hwc->swc", rows, image.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  resized = jnp.einsum("tw,swc->stc", cols, resized, precision=jax.lax.Precision.HIGHEST)
  bottom, right = new_h - size, new_w - size
  offsets = [(0, 0), (0, right), (bottom, 0), (bottom, right), ((bottom + 1) // 2, (right + 1) // 2)]
  crops = jnp.stack([resized[y:y + size, x:x + size] for y, x in offsets])
  return jnp.concatenate([crops, crops[:, :, ::-1]], axis=0)


# --- Photometric ops on float32 [H, W, 3] in [0, 1] ------------------------------------------------

# x / 255 for every uint8 value x, rounded as TensorFlow's `image / 255.0` rounds it. (XLA turns a division by
# a scalar into a multiplication by its reciprocal, which rounds 126 of the 256 values differently.)
_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def to_unit(image: jax.Array) -> jax.Array:
  """[0, 255] -> float32 [0, 1]: a uint8 image (not resampled) exactly as the host pipeline scales it."""
  if image.dtype == jnp.uint8:
    return jnp.asarray(_UNIT)[image.astype(jnp.int32)]
  return image / 255.0


def to_rgb(image: jax.Array) -> jax.Array:
  """[..., 1] -> [..., 3] by repeating the channel; [..., 3] unchanged."""
  return jnp.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _grayscale(image: jax.Array) -> jax.Array:
  return jnp.sum(image * jnp.asarray(LUMA, image.dtype), axis=-1, keepdims=True)


def adjust_brightness(image, factor):
  """image * factor, clipped to [0, 1] (torchvision's multiplicative brightness)."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  """(x - m) * factor + m with m the image's mean grey level, clipped to [0, 1]."""
  mean = jnp.mean(_grayscale(image))
  return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  """g + (x - g) * factor with g the per-pixel grey value, clipped to [0, 1]."""
  gray = _grayscale(image)
  return jnp.clip(gray + (image - gray) * factor, 0.0, 1.0)


def adjust_hue(image, delta):
  """Rotates the hue by `delta` of the colour circle (dm-pix, HSV as tf.image.adjust_hue), clipped."""
  return jnp.clip(pix.adjust_hue(image, delta), 0.0, 1.0)


def _jitter_factor(key, amount: float):
  return jax.random.uniform(key, (), jnp.float32, max(0.0, 1.0 - amount), 1.0 + amount)


def color_jitter(image, key, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
  """Random brightness, contrast, saturation, hue in this fixed order (0 = off); same ranges as the host."""
  keys = jax.random.split(key, 4)
  if brightness:
    image = adjust_brightness(image, _jitter_factor(keys[0], brightness))
  if contrast:
    image = adjust_contrast(image, _jitter_factor(keys[1], contrast))
  if saturation:
    image = adjust_saturation(image, _jitter_factor(keys[2], saturation))
  if hue:
    image = adjust_hue(image, jax.random.uniform(keys[3], (), jnp.float32, -hue, hue))
  return image


def pca_lighting(image, key, sigma: float, eigvals=IMAGENET_EIGVALS, eigvecs=IMAGENET_EIGVECS):
  """AlexNet's PCA lighting: + sum_i alpha_i eigvals[i] eigvecs[:, i], alpha ~ N(0, sigma); not clipped."""
  if not sigma:
    return image
  alpha = sigma * jax.random.normal(key, (3,), jnp.float32)
  offset = jnp.asarray(eigvecs, jnp.float32) @ (alpha * jnp.asarray(eigvals, jnp.float32))
  return image + offset


def random_flip(image, key):
  """Mirrors left-right with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def normalize(image, mean: Sequence[float], std: Sequence[float]):
  """(image - mean) / std per channel."""
  return (image - jnp.asarray(mean, image.dtype)) / jnp.asarray(std, image.dtype)


# --- Composed: one example, then a batch -----------------------------------------------------------

def train_crop(image: jax.Array, key: jax.Array, settings: AugmentSettings, size: int) -> jax.Array:
  """The training crop of `settings.crop`: uint8 [H, W, C] -> [size, size, C] in [0, 255]; float32 where it
  resamples, uint8 where it does not (a pad-crop of an image already size x size is a pure shift)."""
  height, width = image.shape[:2]
  if settings.crop == "pad_random_crop":
    shifted = pad_random_crop(image, key, settings.pad)
    return shifted if (height, width) == (size, size) else resize(shifted, size)
  if settings.crop == "random_resized":
    window = random_resized_crop_window(key, height, width, settings.area_range, settings.aspect_range)
  elif settings.crop == "resize_random_crop":
    window = resize_random_crop_window(key, height, width, settings.resize_ratio)
  else:
    if (height, width) == (size, size):
      return image
    window = (0, 0, height, width)
  return crop_and_resize(image, window, size)


def train_example(image: jax.Array, key: jax.Array, settings: AugmentSettings, size: int,
                  eigen=(IMAGENET_EIGVALS, IMAGENET_EIGVECS), mean_std=None) -> jax.Array:
  """One training example: uint8 [H, W, C] -> float32 [size, size, 3], as the host's train_preprocess_fn
  (crop, to [0, 1] RGB, flip, colour jitter, PCA lighting, normalisation)."""
  crop_key, flip_key, jitter_key, light_key = jax.random.split(key, 4)
  image = to_rgb(to_unit(train_crop(image, crop_key, settings, size)))
  if settings.flip:
    image = random_flip(image, flip_key)
  image = color_jitter(image, jitter_key, settings.brightness, settings.contrast, settings.saturation,
                       settings.hue)
  image = pca_lighting(image, light_key, settings.pca_lighting, *eigen)
  return image if mean_std is None else normalize(image, *mean_std)


def eval_example(image: jax.Array, eval_crop: str, resize_ratio: float, size: int, mean_std=None):
  """Eval preprocessing of one uint8 [H, W, C] image -> float32 [size, size, 3] ([10, ...] for ten_crop)."""
  height, width = image.shape[:2]
  if eval_crop == "ten_crop":
    image = ten_crop(image, size, resize_ratio)
  elif (height, width) == (size, size) and (eval_crop == "resize" or square_side(height, width, resize_ratio) == size):
    pass  # the image itself: nothing to crop or resample
  elif eval_crop == "center":
    image = crop_and_resize(image, center_crop_window(height, width, resize_ratio), size)
  else:
    image = resize(image, size)
  image = to_rgb(to_unit(image))
  return image if mean_std is None else normalize(image, *mean_std)


def train_batch(images: jax.Array, keys: jax.Array, settings: AugmentSettings, size: int, eigen,
                mean_std, dtype) -> jax.Array:
  """vmapped train_example: uint8 [B, H, W, C], keys [B] -> `dtype` [B, size, size, 3]."""
  fn = lambda image, key: train_example(image, key, settings, size, eigen, mean_std)
  return jax.vmap(fn)(images, keys).astype(dtype)


def eval_batch(images: jax.Array, eval_crop: str, resize_ratio: float, size: int, mean_std, dtype):
  """vmapped eval_example: uint8 [B, H, W, C] -> `dtype` [B, size, size, 3] (or [B, 10, ...])."""
  fn = lambda image: eval_example(image, eval_crop, resize_ratio, size, mean_std)
  return jax.vmap(fn)(images).astype(dtype)
