r"""Writes a PNG grid: training images (left column) next to augmented views of each.

  python -m cnn_jax.data.show_augment --config=configs/nin.py --out=grid.png \
      --config.manual_dir=/path/to/fashion_mnist
  python -m cnn_jax.data.show_augment --dataset=folder:/data/pets --image_size=224 \
      --crop=random_resized --flip --brightness=0.4 --pca_lighting=0.1 --out=grid.png

Without --config, the plain flags describe the pipeline; with it, plain flags given explicitly override it.
The views are the training pipeline's own per-image function (before normalisation), so what is shown
is what the model sees, with seeds (--seed, view, image).
"""

import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:args]); optional.")
flags.DEFINE_string("out", "augment_grid.png", "PNG file to write.")
flags.DEFINE_integer("num_images", 6, "Rows: the first training images in the split's order.")
flags.DEFINE_integer("num_views", 6, "Augmented views per image.")
flags.DEFINE_integer("seed", 0, "Augmentation seed.")
flags.DEFINE_integer("min_cell", 112, "Cells smaller than this many pixels are enlarged (nearest).")
# Plain flags (used without --config, or to override it when given explicitly).
flags.DEFINE_string("dataset", "fashion_mnist", "tfds name or folder:/path.")
flags.DEFINE_string("data_dir", None, "tfds data dir.")
flags.DEFINE_string("manual_dir", None, "Source files for offline preparation.")
flags.DEFINE_string("train_split", "train", "Split to show.")
flags.DEFINE_integer("image_size", 224, "Training resolution S.")
flags.DEFINE_enum("crop", "random_resized",
                  ["random_resized", "resize_random_crop", "pad_random_crop", "none"], "Training crop.")
flags.DEFINE_float("resize_ratio", 256 / 224, "resize_random_crop: shorter side = ratio * S before cropping.")
flags.DEFINE_integer("pad", 4, "pad_random_crop: pixels of padding.")
flags.DEFINE_bool("flip", True, "Random horizontal flips.")
flags.DEFINE_float("brightness", 0.0, "Brightness jitter.")
flags.DEFINE_float("contrast", 0.0, "Contrast jitter.")
flags.DEFINE_float("saturation", 0.0, "Saturation jitter.")
flags.DEFINE_float("hue", 0.0, "Hue jitter (<= 0.5).")
flags.DEFINE_float("pca_lighting", 0.0, "AlexNet PCA lighting sigma.")
flags.DEFINE_string("cache_dir", None, "Where PCA statistics are cached.")

_TOP_LEVEL = ("dataset", "data_dir", "manual_dir", "train_split", "image_size", "cache_dir")
_AUGMENT = ("crop", "resize_ratio", "pad", "flip", "brightness", "contrast", "saturation", "hue",
            "pca_lighting")


def config_from_flags() -> ml_collections.ConfigDict:
  """--config (if given) with explicitly passed plain flags applied, else a config of the plain flags."""
  if FLAGS.config is not None:
    config = ml_collections.ConfigDict(FLAGS.config.to_dict())
    chosen = lambda name: FLAGS[name].present
  else:
    config = ml_collections.ConfigDict({"augment": {}})
    chosen = lambda name: True
  for name in _TOP_LEVEL:
    if chosen(name):
      config[name] = FLAGS[name].value
  if "augment" not in config or config.augment is None:
    config.augment = ml_collections.ConfigDict()
  for name in _AUGMENT:
    if chosen(name):
      config.augment[name] = FLAGS[name].value
  return config


def augment_grid(config, num_images: int, num_views: int, seed: int, min_cell: int = 112):
  """uint8 [rows * cell, (1 + num_views) * cell, 3] grid and the rows' class names.

  Column 0 is the image resized to S x S; the others are training views (clipped to [0, 1] for display).
  """
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import augment, datasets, pipeline  # pylint: disable=g-import-not-at-top

  source = datasets.get_source(config)
  split, _ = datasets.resolve_splits(config, source)
  settings = augment.AugmentSettings.from_config(config.augment)
  size = pipeline.image_size(config)
  eigen = (datasets.lighting_eigen(source, split, config.cache_dir) if settings.pca_lighting
           else (augment.IMAGENET_EIGVALS, augment.IMAGENET_EIGVECS))
  view_fn = tf.function(pipeline.train_preprocess_fn(settings, size, source.channels, decoded=False,
                                                     eigen=eigen))
  original_fn = tf.function(pipeline.eval_preprocess_fn("resize", 1.0, size, source.channels))
  info = source.info(*datasets.resolve_splits(config, source))

  rows, names = [], []
  for index, example in enumerate(source.read(split).take(num_images)):
    cells = [original_fn(example["image"])]
    for view in range(num_views):
      cells.append(view_fn(example["image"], tf.constant([seed, view * 1_000_003 + index], tf.int64)))
    rows.append(np.concatenate([np.clip(c.numpy(), 0, 1) for c in cells], axis=1))
    names.append(info.class_names[int(example["label"])])
  grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
  scale = max(1, -(-min_cell // size))  # ceil: small images (28 px) get big enough to see
  return np.kron(grid, np.ones((scale, scale, 1), np.uint8)), names


def write_grid(path: str, grid: np.ndarray, names, cell: int):
  """Saves the grid as PNG with each row's class name in its first cell."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(grid)
  draw = ImageDraw.Draw(image)
  for row, name in enumerate(names):
    draw.rectangle([0, row * cell, 8 + 7 * len(name), row * cell + 14], fill=(0, 0, 0))
    draw.text((3, row * cell + 2), name, fill=(255, 255, 0))
  image.save(path)


def show(config, out: str, num_images: int, num_views: int, seed: int, min_cell: int) -> int:
  grid, names = augment_grid(config, num_images, num_views, seed, min_cell)
  write_grid(out, grid, names, grid.shape[0] // max(len(names), 1))
  print(f"wrote {out}: {len(names)} images x (original + {num_views} views), "
        f"{grid.shape[1]}x{grid.shape[0]} px")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return cli.run(show, config_from_flags(), FLAGS.out, FLAGS.num_images, FLAGS.num_views, FLAGS.seed,
                 FLAGS.min_cell)


if __name__ == "__main__":
  sys.exit(app.run(main))
