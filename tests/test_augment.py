"""Property tests of the augmentation ops (cnn_jax/data/augment.py) on small synthetic images."""

import io
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from cnn_jax.data import augment
from cnn_jax.data import pipeline
from cnn_jax.errors import UserError


def _seed(i):
  return tf.constant([i, 1234], tf.int64)


def _coordinate_image(height, width):
  """float32 [H, W, 3]: channel 0 = row index, channel 1 = column index, channel 2 = 1."""
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return tf.constant(np.stack([ys, xs, np.ones_like(ys)], -1).astype(np.float32))


def _random_image(height=24, width=32, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(0, 1, (height, width, 3)).astype(np.float32))


# --- Crop windows -------------------------------------------------------------------------------

def test_random_resized_crop_window_stays_inside_with_area_and_aspect_in_range():
  height, width = 60, 80
  areas = []
  for i in range(60):
    y, x, h, w = [int(v) for v in augment.random_resized_crop_window(
        [height, width, 3], _seed(i), area_range=(0.2, 0.6), aspect_range=(0.75, 1.333))]
    assert 0 <= y and 0 <= x and h >= 1 and w >= 1 and y + h <= height and x + w <= width
    if (h, w) == (height, width):
      continue  # the documented fallback after max_attempts
    areas.append(h * w / (height * width))
    assert 0.2 - 0.03 <= areas[-1] <= 0.6 + 0.03
    assert 0.75 - 0.05 <= w / h <= 1.333 + 0.05
  assert len(areas) > 40 and np.std(areas) > 0.05  # really random, not one window


def test_resize_random_crop_window_is_a_square_of_shorter_side_over_ratio_anywhere_in_the_image():
  positions = set()
  for i in range(40):
    y, x, h, w = [int(v) for v in augment.resize_random_crop_window([100, 150, 3], _seed(i), 256 / 224)]
    assert h == w and abs(h - 100 * 224 / 256) <= 0.5
    assert 0 <= y <= 100 - h and 0 <= x <= 150 - w
    positions.add((y, x))
  assert len(positions) > 30


def test_center_crop_window_is_centred():
  y, x, h, w = [int(v) for v in augment.center_crop_window([100, 150, 3], 2.0)]
  assert (h, w) == (50, 50) and (y, x) == (25, 50)
  assert [int(v) for v in augment.center_crop_window([31, 31, 1], 1.0)] == [0, 0, 31, 31]


def test_crop_and_resize_samples_only_inside_the_window():
  image = _coordinate_image(40, 50)
  for i in range(10):
    window = augment.random_resized_crop_window([40, 50, 3], _seed(i))
    y, x, h, w = [int(v) for v in window]
    out = augment.crop_and_resize(image, window, 16).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert y - 1e-4 <= out[..., 0].min() and out[..., 0].max() <= y + h - 1 + 1e-4
    assert x - 1e-4 <= out[..., 1].min() and out[..., 1].max() <= x + w - 1 + 1e-4
    # Rows increase down the output, columns to the right: not flipped or transposed.
    assert np.all(np.diff(out[:, 0, 0]) >= 0) and np.all(np.diff(out[0, :, 1]) >= 0)


def test_pad_random_crop_is_a_shift_with_zero_fill():
  image = _coordinate_image(12, 12) + 1.0  # all values >= 1, so padding (0) is recognisable
  shifts = set()
  for i in range(30):
    out = augment.pad_random_crop(image, _seed(i), pad=3).numpy()
    assert out.shape == (12, 12, 3)
    inside = out[..., 2] > 0
    dy = set((out[..., 0][inside] - np.nonzero(inside)[0]).round().astype(int).tolist())
    dx = set((out[..., 1][inside] - np.nonzero(inside)[1]).round().astype(int).tolist())
    assert len(dy) == 1 and len(dx) == 1  # one rigid shift
    (sy,), (sx,) = dy, dx
    assert -3 <= sy - 1 <= 3 and -3 <= sx - 1 <= 3
    assert np.all(out[~inside] == 0)
    shifts.add((sy, sx))
  assert len(shifts) > 10


def test_ten_crop_corners_centre_and_flips():
  image = _coordinate_image(40, 50)
  crops = augment.ten_crop(image, size=10, resize_ratio=1.5).numpy()  # resized to 15 x 19, crops of 10
  assert crops.shape == (10, 10, 10, 3)
  np.testing.assert_allclose(crops[5:], crops[:5, :, ::-1])
  top_left, top_right, bottom_left, bottom_right, centre = crops[:5]
  assert top_left[..., 0].mean() < bottom_left[..., 0].mean()
  assert top_left[..., 1].mean() < top_right[..., 1].mean()
  np.testing.assert_allclose(bottom_right[..., 0], bottom_left[..., 0])
  assert top_left[..., 1].mean() < centre[..., 1].mean() < top_right[..., 1].mean()
  # A square image at ratio 1: all five crops are the whole image.
  square = augment.ten_crop(_random_image(20, 20), 20, 1.0).numpy()
  for k in range(1, 5):
    np.testing.assert_allclose(square[k], square[0], atol=1e-6)


# --- Photometric ops ----------------------------------------------------------------------------

def test_flip_is_an_involution_and_random():
  image = _random_image()
  outcomes = set()
  for i in range(20):
    once = augment.random_flip(image, _seed(i))
    np.testing.assert_array_equal(augment.random_flip(once, _seed(i)).numpy(), image.numpy())
    flipped = np.array_equal(once.numpy(), image.numpy()[:, ::-1])
    assert flipped or np.array_equal(once.numpy(), image.numpy())
    outcomes.add(flipped)
  assert outcomes == {True, False}


def test_color_jitter_stays_in_range_and_is_deterministic():
  image = _random_image()
  for i in range(10):
    out = augment.color_jitter(image, _seed(i), 0.4, 0.4, 0.4, 0.1).numpy()
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, augment.color_jitter(image, _seed(i), 0.4, 0.4, 0.4, 0.1).numpy())
  np.testing.assert_array_equal(augment.color_jitter(image, _seed(0)).numpy(), image.numpy())


def test_brightness_scales_by_a_factor_in_range():
  image = _random_image() * 0.5  # no clipping at factors <= 2
  ratios = []
  for i in range(20):
    out = augment.color_jitter(image, _seed(i), brightness=0.3).numpy()
    ratio = out / image.numpy()
    assert np.allclose(ratio, ratio.flat[0], atol=1e-4)  # one factor for the whole image
    ratios.append(ratio.flat[0])
  assert 0.7 - 1e-4 <= min(ratios) and max(ratios) <= 1.3 + 1e-4 and np.std(ratios) > 0.05


def test_saturation_and_hue_leave_grey_images_grey():
  grey = tf.tile(_random_image(16, 16)[..., :1], [1, 1, 3])
  for i in range(5):
    out = augment.color_jitter(grey, _seed(i), saturation=0.8, hue=0.3).numpy()
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-5)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-5)
    np.testing.assert_allclose(out, grey.numpy(), atol=1e-5)


def test_contrast_keeps_the_mean_grey_level_when_not_clipping():
  image = 0.4 + 0.2 * _random_image()
  gray_mean = np.mean(image.numpy() @ np.array([0.299, 0.587, 0.114]))
  out = augment.color_jitter(image, _seed(3), contrast=0.5).numpy()
  assert not np.allclose(out, image.numpy())
  assert abs(np.mean(out @ np.array([0.299, 0.587, 0.114])) - gray_mean) < 1e-4


def test_pca_lighting_zero_sigma_is_identity():
  image = _random_image()
  np.testing.assert_array_equal(augment.pca_lighting(image, _seed(0), 0.0).numpy(), image.numpy())


def test_pca_lighting_adds_one_offset_in_the_weighted_eigenvector_span():
  image = _random_image()
  eigvals, eigvecs = augment.IMAGENET_EIGVALS, augment.IMAGENET_EIGVECS
  alphas = []
  for i in range(20):
    diff = (augment.pca_lighting(image, _seed(i), 0.1) - image).numpy()
    offset = diff[0, 0]
    np.testing.assert_allclose(diff, np.broadcast_to(offset, diff.shape), atol=1e-6)
    alpha = np.linalg.solve(eigvecs, offset) / eigvals  # offset = eigvecs @ (alpha * eigvals)
    np.testing.assert_allclose(eigvecs @ (alpha * eigvals), offset, atol=1e-6)
    alphas.append(alpha)
  alphas = np.array(alphas)
  assert 0.03 < alphas.std() < 0.3  # alpha ~ N(0, 0.1)


def test_pca_lighting_with_a_rank_one_covariance_only_changes_brightness():
  # Grayscale data: the covariance is rank 1 along (1, 1, 1).
  eigvecs = np.linalg.qr(np.array([[1, 1, 0], [1, -1, 1], [1, 0, -1]], np.float64))[0].astype(np.float32)
  eigvals = np.array([0.1, 0.0, 0.0], np.float32)
  grey = tf.tile(_random_image()[..., :1], [1, 1, 3])
  out = augment.pca_lighting(grey, _seed(5), 0.5, eigvals, eigvecs).numpy()
  assert not np.allclose(out, grey.numpy())
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)


def test_to_rgb_and_normalize():
  grey = tf.ones([4, 5, 1]) * 0.5
  rgb = augment.to_rgb(grey)
  assert rgb.shape == (4, 5, 3)
  assert augment.to_rgb(rgb) is rgb
  out = augment.normalize(rgb, (0.5, 0.25, 0.0), (0.5, 0.25, 0.5)).numpy()
  np.testing.assert_allclose(out[0, 0], [0.0, 1.0, 1.0])


# --- Settings and the composed per-image functions ----------------------------------------------

def test_settings_from_config_rejects_unknown_and_bad_fields():
  assert augment.AugmentSettings.from_config(None) == augment.AugmentSettings()
  settings = augment.AugmentSettings.from_config({"crop": "random_resized", "area_range": [0.3, 1]})
  assert settings.area_range == (0.3, 1.0)
  with pytest.raises(UserError, match="flipp"):
    augment.AugmentSettings.from_config({"flipp": True})
  with pytest.raises(UserError, match="crop"):
    augment.AugmentSettings.from_config({"crop": "inception"})
  with pytest.raises(UserError, match="hue"):
    augment.AugmentSettings.from_config({"hue": 0.7})


def test_settings_accept_the_shared_config():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  common = pytest.importorskip("configs.common")
  augment.AugmentSettings.from_config(common.get_config().augment)


@pytest.mark.parametrize("crop", augment.CROPS)
def test_train_preprocess_shapes_for_every_crop(crop):
  settings = augment.AugmentSettings(crop=crop, flip=True, brightness=0.4, contrast=0.4, saturation=0.4,
                                     hue=0.1, pca_lighting=0.1)
  fn = pipeline.train_preprocess_fn(settings, 24, channels=1, decoded=True)
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (28, 28, 1)).astype(np.uint8))
  out = fn(image, _seed(0)).numpy()
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert -0.2 < out.min() and out.max() < 1.2  # [0, 1] plus at most the lighting offset
  np.testing.assert_array_equal(out, fn(image, _seed(0)).numpy())
  assert not np.array_equal(out, fn(image, _seed(1)).numpy())


def test_jpeg_window_decoding_matches_decode_then_crop():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, (75, 100, 3)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
  encoded = tf.constant(buf.getvalue())
  settings = augment.AugmentSettings(crop="random_resized")
  from_bytes = pipeline.train_preprocess_fn(settings, 32, 3, decoded=False)
  from_pixels = pipeline.train_preprocess_fn(settings, 32, 3, decoded=True)
  decoded = tf.io.decode_jpeg(encoded, channels=3)
  for i in range(5):
    a, b = from_bytes(encoded, _seed(i)).numpy(), from_pixels(decoded, _seed(i)).numpy()
    # Same window; only chroma upsampling at the window's edge may differ by a little.
    np.testing.assert_allclose(a[2:-2, 2:-2], b[2:-2, 2:-2], atol=1e-5)
    assert np.abs(a - b).mean() < 0.01
