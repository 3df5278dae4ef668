"""Image augmentations as pure TensorFlow ops on one image and an explicit stateless seed.

One shared definition for every model. Conventions:
  * an image is a `[H, W, C]` tensor; the colour ops want float32 in [0, 1] with C = 3;
  * every random op takes `seed`, an int32/int64 tensor of shape [2] (as `tf.random.stateless_*` does),
    so the same seed always gives the same result, whatever thread or process runs it;
  * crops are split in two: `*_window` samples `(offset_y, offset_x, height, width)` from the image
    *shape* only, and `crop_and_resize` applies it. The pipeline can then decode only the window of a
    JPEG (`tf.image.decode_and_crop_jpeg`) and get the same result as cropping the decoded image.

Compose them with `AugmentSettings` (the `config.augment` fields) and `train_crop_window` /
`train_color_ops`, or call the ops directly.
"""

from typing import Optional, Sequence, Tuple

from cnn_jax.data.tf_runtime import tf

# The settings, their checks and the constants are shared with the JAX implementation (augment_jax.py).
from cnn_jax.data.augment_spec import (  # pylint: disable=unused-import
    CROPS, EVAL_CROPS, IMAGENET_EIGVALS, IMAGENET_EIGVECS, LUMA as _LUMA, RANDOM_RESIZED_ATTEMPTS,
    AugmentSettings)

Window = Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]


# --- Crop windows (from a shape and a seed) -------------------------------------------------------

def _hw(image_shape) -> Tuple[tf.Tensor, tf.Tensor]:
  image_shape = tf.convert_to_tensor(image_shape)
  return tf.cast(image_shape[0], tf.int32), tf.cast(image_shape[1], tf.int32)


def random_resized_crop_window(image_shape, seed, area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                               max_attempts: int = RANDOM_RESIZED_ATTEMPTS) -> Window:
  """Inception-style window: area in `area_range` x H*W, width/height in `aspect_range`.

  image_shape: [3] int (H, W, C). Returns int32 scalars (offset_y, offset_x, height, width) inside the image;
  after `max_attempts` failed draws it falls back to the whole image (as tf.image's sampler does).
  """
  image_shape = tf.cast(tf.convert_to_tensor(image_shape), tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=aspect_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def random_crop_window(image_shape, seed, side) -> Window:
  """A `side` x `side` window at a uniformly random position (side <= min(H, W)); int32 scalars."""
  height, width = _hw(image_shape)
  side = tf.minimum(tf.cast(side, tf.int32), tf.minimum(height, width))
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  offset_y = tf.random.stateless_uniform([], seed_y, 0, height - side + 1, dtype=tf.int32)
  offset_x = tf.random.stateless_uniform([], seed_x, 0, width - side + 1, dtype=tf.int32)
  return offset_y, offset_x, side, side


def resize_random_crop_window(image_shape, seed, resize_ratio: float) -> Window:
  """AlexNet's "resize shorter side to ratio*S, random S x S crop", as a window of the raw image.

  The square side is min(H, W) / resize_ratio: cropping it and resizing to S equals resizing the shorter
  side to resize_ratio * S first and cropping S (up to resampling), but only resamples the crop.
  """
  height, width = _hw(image_shape)
  side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) / resize_ratio), tf.int32)
  return random_crop_window(image_shape, seed, tf.maximum(side, 1))


def center_crop_window(image_shape, resize_ratio: float = 1.0) -> Window:
  """Centred square of side min(H, W) / resize_ratio: "resize shorter side to ratio*S, centre crop S"."""
  height, width = _hw(image_shape)
  side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) / resize_ratio), tf.int32)
  side = tf.maximum(side, 1)
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def full_window(image_shape) -> Window:
  """The whole image as a window."""
  height, width = _hw(image_shape)
  return tf.constant(0), tf.constant(0), height, width


def train_crop_window(settings: AugmentSettings, image_shape, seed) -> Optional[Window]:
  """The training crop window of `settings.crop` (None for 'pad_random_crop', which crops outside)."""
  if settings.crop == "random_resized":
    return random_resized_crop_window(image_shape, seed, settings.area_range, settings.aspect_range)
  if settings.crop == "resize_random_crop":
    return resize_random_crop_window(image_shape, seed, settings.resize_ratio)
  if settings.crop == "none":
    return full_window(image_shape)
  return None


# --- Applying crops --------------------------------------------------------------------------------

def crop(image: tf.Tensor, window: Window) -> tf.Tensor:
  """image[y:y+h, x:x+w] for window (y, x, h, w); any dtype, [H, W, C] -> [h, w, C]."""
  offset_y, offset_x, height, width = window
  return image[offset_y:offset_y + height, offset_x:offset_x + width]


def resize(image: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
  """Bilinear resize to size x size; [H, W, C] any dtype -> float32 [size, size, C] in the input's units."""
  image = tf.image.resize(image, [size, size], method="bilinear", antialias=antialias)
  image.set_shape([size, size, image.shape[-1]])
  return image


def crop_and_resize(image: tf.Tensor, window: Window, size: int, antialias: bool = False) -> tf.Tensor:
  """Crops `window` and resizes it to size x size: [H, W, C] -> float32 [size, size, C]."""
  return resize(crop(image, window), size, antialias)


def pad_random_crop(image: tf.Tensor, seed, pad: int) -> tf.Tensor:
  """CIFAR-style: zero-pad `pad` pixels on each side, crop a random window of the original size.

  [H, W, C] any dtype -> same shape and dtype.
  """
  if pad == 0:
    return image
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  height, width = _hw(tf.shape(image))
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  offset_y = tf.random.stateless_uniform([], seed_y, 0, 2 * pad + 1, dtype=tf.int32)
  offset_x = tf.random.stateless_uniform([], seed_x, 0, 2 * pad + 1, dtype=tf.int32)
  out = padded[offset_y:offset_y + height, offset_x:offset_x + width]
  out.set_shape(image.shape)
  return out


def ten_crop(image: tf.Tensor, size: int, resize_ratio: float = 256 / 224) -> tf.Tensor:
  """AlexNet test-time crops: shorter side resized to resize_ratio * size, then the 4 corner and the
  centre size x size crops and their horizontal flips.

  [H, W, C] -> float32 [10, size, size, C] in the input's units (order: TL, TR, BL, BR, centre, then
  the same five flipped). The eval step averages the logits over axis 1 of the batch.
  """
  height, width = _hw(tf.shape(image))
  short = tf.cast(tf.minimum(height, width), tf.float32)
  target = max(size, int(round(size * resize_ratio)))
  scale = target / short
  new_h = tf.maximum(tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32), size)
  new_w = tf.maximum(tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32), size)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
  bottom, right = new_h - size, new_w - size
  offsets = [(0, 0), (0, right), (bottom, 0), (bottom, right), ((bottom + 1) // 2, (right + 1) // 2)]
  crops = tf.stack([resized[y:y + size, x:x + size] for y, x in offsets])
  crops = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
  crops.set_shape([10, size, size, image.shape[-1]])
  return crops


# --- Photometric ops on float32 [H, W, 3] in [0, 1] -------------------------------------------------

def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """[..., 1] -> [..., 3] by repeating the channel; [..., 3] unchanged (models want RGB)."""
  if image.shape[-1] == 1:
    return tf.concat([image] * 3, axis=-1)
  return image


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
  """Mirrors left-right with probability 1/2; [H, W, C] -> same."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(image * tf.constant(_LUMA, image.dtype), axis=-1, keepdims=True)


def _jitter_factor(seed, amount: float) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, max(0.0, 1.0 - amount), 1.0 + amount)


def adjust_brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """image * factor, clipped to [0, 1] (torchvision's brightness: multiplicative)."""
  return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with the image's mean grey level: (x - m) * factor + m, clipped to [0, 1]."""
  mean = tf.reduce_mean(_grayscale(image))
  return tf.clip_by_value((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with the per-pixel grey value: g + (x - g) * factor, clipped to [0, 1]."""
  gray = _grayscale(image)
  return tf.clip_by_value(gray + (image - gray) * factor, 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> tf.Tensor:
  """Random brightness, contrast, saturation, hue, in this fixed order (0 = op off).

  image: float32 [H, W, 3] in [0, 1] -> same, still in [0, 1]. Factors are drawn from
  [max(0, 1 - a), 1 + a]; the hue shift from [-hue, hue] (fraction of the colour circle).
  """
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  if brightness:
    image = adjust_brightness(image, _jitter_factor(seeds[0], brightness))
  if contrast:
    image = adjust_contrast(image, _jitter_factor(seeds[1], contrast))
  if saturation:
    image = adjust_saturation(image, _jitter_factor(seeds[2], saturation))
  if hue:
    delta = tf.random.stateless_uniform([], seeds[3], -hue, hue)
    image = tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)
  return image


def pca_lighting(image: tf.Tensor, seed, sigma: float, eigvals=IMAGENET_EIGVALS,
                 eigvecs=IMAGENET_EIGVECS) -> tf.Tensor:
  """AlexNet's PCA lighting: adds sum_i alpha_i * eigvals[i] * eigvecs[:, i], alpha_i ~ N(0, sigma).

  image: float32 [H, W, 3] in [0, 1]; eigvals [3], eigvecs [3, 3] (columns = eigenvectors of the RGB
  covariance, [0, 1] units). The same RGB offset is added to every pixel, not clipped (as in the paper),
  so values may leave [0, 1] by a few hundredths. sigma = 0 returns the image unchanged.
  """
  if not sigma:
    return image
  alpha = tf.random.stateless_normal([3], seed, stddev=sigma)
  eigvals = tf.constant(eigvals, tf.float32)
  eigvecs = tf.constant(eigvecs, tf.float32)
  offset = tf.linalg.matvec(eigvecs, alpha * eigvals)
  return image + offset


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(image - mean) / std per channel; mean/std in the image's units ([0, 1]), length 1 or C."""
  return (image - tf.constant(mean, image.dtype)) / tf.constant(std, image.dtype)


def train_color_ops(image: tf.Tensor, seed, settings: AugmentSettings, eigvals=IMAGENET_EIGVALS,
                    eigvecs=IMAGENET_EIGVECS) -> tf.Tensor:
  """Flip, colour jitter and PCA lighting of `settings` on float32 [H, W, 3] in [0, 1]."""
  flip_seed, jitter_seed, lighting_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if settings.flip:
    image = random_flip(image, flip_seed)
  image = color_jitter(image, jitter_seed, settings.brightness, settings.contrast, settings.saturation,
                       settings.hue)
  return pca_lighting(image, lighting_seed, settings.pca_lighting, eigvals, eigvecs)
