"""The JAX augmentation (device input, cnn_jax/data/augment_jax.py) against the TensorFlow one (host pipeline).

Deterministic ops (crop + resize of a given window, ten crops, centre crop, colour ops with given factors)
must give the same pixels; random draws (crop windows, flips, colour factors, lighting) must follow the same
distributions, compared over thousands of draws of each implementation.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from cnn_jax.data import augment
from cnn_jax.data import augment_jax
from cnn_jax.data import pipeline
from cnn_jax.data.augment_spec import AugmentSettings

N_DRAWS = 3000


def _tf_draws(fn, n=N_DRAWS):
  """fn(seed [2] int64) -> tuple of scalars, drawn for seeds (i, 7) i < n through tf.data (fast)."""
  ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([i, tf.constant(7, tf.int64)])))
  return np.stack([np.asarray(c, np.float64) for c in next(ds.batch(n).as_numpy_iterator())], 1)


def _jax_draws(fn, n=N_DRAWS, seed=3):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  out = jax.jit(jax.vmap(fn))(keys)
  return np.stack([np.asarray(c, np.float64) for c in out], 1)


def _assert_same_distribution(a, b, names, rel_std=0.12):
  """Column-wise: means within 4.5 standard errors, standard deviations (of non-binary columns) within
  `rel_std`."""
  for i, name in enumerate(names):
    x, y = a[:, i], b[:, i]
    se = np.sqrt(x.var() / len(x) + y.var() / len(y)) + 1e-9
    assert abs(x.mean() - y.mean()) < 4.5 * se, (name, x.mean(), y.mean(), se)
    binary = set(np.unique(x)) | set(np.unique(y)) <= {0.0, 1.0}
    if not binary and (x.std() > 1e-6 or y.std() > 1e-6):
      assert abs(x.std() - y.std()) <= rel_std * max(x.std(), y.std()), (name, x.std(), y.std())


# --- Deterministic ops: equal pixels --------------------------------------------------------------

@pytest.mark.parametrize("window,size", [((0, 0, 28, 28), 32), ((3, 5, 17, 11), 24), ((10, 0, 9, 40), 7),
                                          ((0, 0, 28, 28), 224), ((7, 9, 1, 1), 5)])
def test_crop_and_resize_equals_tf(window, size):
  image = np.random.default_rng(0).integers(0, 256, (28, 40, 3)).astype(np.uint8)
  ours = np.asarray(augment_jax.crop_and_resize(jnp.asarray(image), window, size))
  theirs = augment.crop_and_resize(tf.constant(image), tuple(tf.constant(v) for v in window), size).numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-3)  # [0, 255] units


@pytest.mark.parametrize("shape,ratio", [((28, 28, 1), 256 / 224), ((40, 56, 3), 1.15), ((33, 30, 3), 1.0)])
def test_ten_crop_equals_tf(shape, ratio):
  image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
  ours = np.asarray(augment_jax.ten_crop(jnp.asarray(image), 24, ratio))
  theirs = augment.ten_crop(tf.constant(image), 24, ratio).numpy()
  assert ours.shape == theirs.shape == (10, 24, 24, shape[-1])
  np.testing.assert_allclose(ours, theirs, atol=2e-3)


@pytest.mark.parametrize("eval_crop", ["center", "resize", "ten_crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_eval_preprocessing_equals_the_host_pipeline(eval_crop, channels):
  """The device's eval preprocessing of a raw uint8 image = the host's of the same image PNG-encoded."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (30, 44, channels)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(buf, format="PNG")
  mean_std = ((0.3, 0.4, 0.5), (0.2, 0.25, 0.3))
  host = pipeline.eval_preprocess_fn(eval_crop, 1.15, 28, channels, mean_std)(tf.constant(buf.getvalue()))
  device = augment_jax.eval_example(jnp.asarray(image), eval_crop, 1.15, 28, mean_std)
  np.testing.assert_allclose(np.asarray(device), host.numpy(), atol=1e-4)


def test_training_path_without_random_ops_equals_the_host_pipeline():
  settings = AugmentSettings(crop="none", flip=False)
  image = np.random.default_rng(3).integers(0, 256, (28, 28, 1)).astype(np.uint8)
  mean_std = ((0.286,) * 3, (0.353,) * 3)
  host = pipeline.train_preprocess_fn(settings, 32, 1, decoded=True, mean_std=mean_std)(
      tf.constant(image), tf.constant([0, 0], tf.int64)).numpy()
  device = augment_jax.train_example(jnp.asarray(image), jax.random.PRNGKey(0), settings, 32,
                                     mean_std=mean_std)
  np.testing.assert_allclose(np.asarray(device), host, atol=1e-5)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_with_given_factors_equal_tf(op):
  rng = np.random.default_rng(4)
  image = rng.uniform(0, 1, (12, 10, 3)).astype(np.float32)
  for factor in ((0.6, 1.0, 1.4) if op != "hue" else (-0.3, 0.05, 0.4)):
    ours = np.asarray(getattr(augment_jax, f"adjust_{op}")(jnp.asarray(image), factor))
    if op == "hue":
      theirs = tf.clip_by_value(tf.image.adjust_hue(tf.constant(image), factor), 0.0, 1.0).numpy()
    else:
      theirs = getattr(augment, f"adjust_{op}")(tf.constant(image), factor).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, err_msg=f"{op} {factor}")


# --- Random draws: equal distributions -----------------------------------------------------------

@pytest.mark.parametrize("area,aspect", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.6), (0.5, 2.0))])
def test_random_resized_crop_windows_follow_the_tf_sampler(area, aspect):
  height, width = 60, 80
  theirs = _tf_draws(lambda seed: augment.random_resized_crop_window([height, width, 3], seed, area, aspect))
  ours = _jax_draws(lambda key: augment_jax.random_resized_crop_window(key, height, width, area, aspect))
  for draws in (ours, theirs):
    y, x, h, w = draws.T
    assert np.all((y >= 0) & (x >= 0) & (h >= 1) & (w >= 1) & (y + h <= height) & (x + w <= width))

  def features(draws):
    y, x, h, w = draws.T
    return np.stack([h * w / (height * width), w / h, y, x, h, w, (h == height) & (w == width)], 1)

  _assert_same_distribution(features(ours), features(theirs),
                            ["area", "aspect", "offset_y", "offset_x", "height", "width", "fallback"])


def test_resize_random_crop_and_pad_crop_offsets_follow_the_tf_ops():
  theirs = _tf_draws(lambda seed: augment.resize_random_crop_window([100, 150, 3], seed, 256 / 224))
  ours = _jax_draws(lambda key: augment_jax.resize_random_crop_window(key, 100, 150, 256 / 224))
  assert set(ours[:, 2]) == set(theirs[:, 2]) == {87.0}  # round(100 / float32(256/224)) = round(87.49999)
  assert ours[:, 0].max() == theirs[:, 0].max() == 13 and ours[:, 1].max() == theirs[:, 1].max() == 63
  _assert_same_distribution(ours[:, :2], theirs[:, :2], ["offset_y", "offset_x"])

  # pad_random_crop: recover the shift from a coordinate image (offsets uniform in [0, 2 * pad]).
  coords = np.stack(np.meshgrid(np.arange(1, 21), np.arange(1, 21), indexing="ij"), -1).astype(np.float32)

  def shift_tf(seed):
    out = augment.pad_random_crop(tf.constant(coords), seed, 4)
    return out[10, 10, 0] - 11.0, out[10, 10, 1] - 11.0

  def shift_jax(key):
    out = augment_jax.pad_random_crop(jnp.asarray(coords), key, 4)
    return out[10, 10, 0] - 11.0, out[10, 10, 1] - 11.0

  theirs, ours = _tf_draws(shift_tf), _jax_draws(shift_jax)
  assert set(np.unique(ours)) == set(np.unique(theirs)) == set(range(-4, 5))
  _assert_same_distribution(ours, theirs, ["shift_y", "shift_x"])


def test_flip_rate_and_colour_factor_ranges_follow_the_tf_ops():
  """Through the whole colour chain on a constant image: the flip rate, and each factor's range and
  distribution (brightness on a mid-grey image is the factor itself times the grey level)."""
  settings = AugmentSettings(flip=True, brightness=0.4)
  grey = np.full((4, 6, 3), 0.5, np.float32)
  ramp = np.tile(np.linspace(0, 1, 6, dtype=np.float32)[None, :, None], (4, 1, 3))

  def tf_draw(seed):
    flipped = augment.train_color_ops(tf.constant(ramp), seed, AugmentSettings(flip=True))
    bright = augment.train_color_ops(tf.constant(grey), seed, settings)
    return tf.cast(flipped[0, 0, 0] > 0.5, tf.float32), bright[0, 0, 0] / 0.5

  def jax_draw(key):
    k1, k2 = jax.random.split(key)
    flipped = augment_jax.random_flip(jnp.asarray(ramp), k1)
    bright = augment_jax.color_jitter(jnp.asarray(grey), k2, brightness=0.4)
    return (flipped[0, 0, 0] > 0.5).astype(jnp.float32), bright[0, 0, 0] / 0.5

  theirs, ours = _tf_draws(tf_draw), _jax_draws(jax_draw)
  for draws in (ours, theirs):
    assert abs(draws[:, 0].mean() - 0.5) < 0.04  # flip rate 1/2
    assert 0.6 - 1e-5 <= draws[:, 1].min() and draws[:, 1].max() <= 1.4 + 1e-5  # factor in [1-a, 1+a]
  _assert_same_distribution(ours, theirs, ["flip", "brightness factor"])

  def factors(op, amount):
    tf_fn = {"contrast": lambda s: augment.color_jitter(tf.constant(ramp), s, contrast=amount),
             "saturation": lambda s: augment.color_jitter(tf.constant(_colour), s, saturation=amount)}[op]
    jax_fn = {"contrast": lambda k: augment_jax.color_jitter(jnp.asarray(ramp), k, contrast=amount),
              "saturation": lambda k: augment_jax.color_jitter(jnp.asarray(_colour), k, saturation=amount)}[op]
    return (_tf_draws(lambda s: (tf.math.reduce_std(tf_fn(s)),)),
            _jax_draws(lambda k: (jnp.std(jax_fn(k)),)))

  _colour = np.random.default_rng(5).uniform(0.3, 0.7, (4, 6, 3)).astype(np.float32)
  for op in ("contrast", "saturation"):
    theirs, ours = factors(op, 0.5)
    _assert_same_distribution(ours, theirs, [op])


def test_hue_and_pca_lighting_draws_follow_the_tf_ops():
  colour = np.random.default_rng(6).uniform(0.2, 0.8, (4, 4, 3)).astype(np.float32)
  theirs = _tf_draws(lambda s: tuple(tf.unstack(tf.reduce_mean(
      augment.color_jitter(tf.constant(colour), s, hue=0.2), axis=[0, 1]))))
  ours = _jax_draws(lambda k: tuple(jnp.mean(augment_jax.color_jitter(jnp.asarray(colour), k, hue=0.2),
                                             axis=(0, 1))))
  _assert_same_distribution(ours, theirs, ["r", "g", "b"])
  zero = np.zeros((2, 2, 3), np.float32)
  theirs = _tf_draws(lambda s: tuple(tf.unstack(augment.pca_lighting(tf.constant(zero), s, 0.1)[0, 0])))
  ours = _jax_draws(lambda k: tuple(augment_jax.pca_lighting(jnp.asarray(zero), k, 0.1)[0, 0]))
  _assert_same_distribution(ours, theirs, ["r offset", "g offset", "b offset"])


@pytest.mark.parametrize("crop", ["random_resized", "resize_random_crop", "pad_random_crop", "none"])
def test_train_batch_shapes_dtype_determinism(crop):
  settings = AugmentSettings(crop=crop, flip=True, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                             pca_lighting=0.1)
  images = jnp.asarray(np.random.default_rng(7).integers(0, 256, (6, 28, 28, 1)).astype(np.uint8))
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  eigen = (augment.IMAGENET_EIGVALS, augment.IMAGENET_EIGVECS)
  fn = jax.jit(lambda x, k: augment_jax.train_batch(x, k, settings, 24, eigen, None, jnp.bfloat16))
  out = fn(images, keys)
  assert out.shape == (6, 24, 24, 3) and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(fn(images, keys), np.float32))
  other = fn(images, jax.random.split(jax.random.PRNGKey(1), 6))
  assert not np.array_equal(np.asarray(out, np.float32), np.asarray(other, np.float32))
