"""Shared fixtures: real Fashion-MNIST prepared once per session, and small generated image folders.

Environment:
  CNN_JAX_TFDS_DATA_DIR             a tfds data dir where fashion_mnist is already prepared (CI prepares
                                    it once and sets this); used as is, never written.
  CNN_JAX_FASHION_MNIST_MANUAL_DIR  the four original Fashion-MNIST .gz files (default:
                                    ../shared/data/fashion_mnist beside the repo); read only.
"""

import contextlib
import importlib
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="session", autouse=True)
def _tensorflow_without_gpus():
  """TensorFlow imported before the first test of each test process, with GPUs hidden from it (it must never
  compete with JAX for one): the product's own import of it, cnn_jax/data/tf_runtime.py."""
  try:
    importlib.import_module("cnn_jax.data.tf_runtime")
  except ImportError:
    pass


def _fashion_mnist_prepared(data_dir: str) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared()


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding the prepared real Fashion-MNIST (60,000 train / 10,000 test)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  prepared = os.environ.get("CNN_JAX_TFDS_DATA_DIR")
  if prepared and _fashion_mnist_prepared(prepared):
    return prepared
  manual_dir = os.environ.get("CNN_JAX_FASHION_MNIST_MANUAL_DIR",
                              os.path.join(REPO, "..", "shared", "data", "fashion_mnist"))
  missing = [f for f in _FASHION_MNIST_FILES if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    pytest.skip(f"Fashion-MNIST source files {missing} not found in {manual_dir}; set "
                f"CNN_JAX_FASHION_MNIST_MANUAL_DIR or CNN_JAX_TFDS_DATA_DIR")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir)))
  return data_dir


@pytest.fixture(scope="session")
def fashion_mnist_arrays(fashion_mnist_dir) -> str:
  """The session's array cache (CNN_JAX_ARRAY_CACHE_DIR, see ../conftest.py) holding Fashion-MNIST train and
  test: written here by the first test process that needs it (TensorFlow is loaded here already), found by the
  others. Tests that launch train.py with the device input use it, so their processes read the cache instead of
  each importing TensorFlow and decoding the 70,000 images itself (several at once, early in a run). Returns the
  cache root."""
  sys.path.insert(0, REPO)
  from configs import lenet  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import arrays  # pylint: disable=g-import-not-at-top
  config = lenet.get_config("smoke")
  config.data_dir = fashion_mnist_dir
  for split in ("train", "test"):
    arrays.get_split(config, split, None, announce=lambda line: None)
  return arrays.cache_root(config)


def make_image_folder(root, splits=(("train", 6), ("test", 3)), classes=("cat", "dog", "bird"),
                      seed: int = 0) -> str:
  """Writes root/<split>/<class>/img_<i>.{png,jpg} of varied sizes and returns root.

  Each image is one flat colour (class-dependent) plus noise; every 3rd file is a JPEG and every 4th is
  grayscale, so the reader sees both formats and both channel counts.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  root = str(root)
  for split, per_class in splits:
    for c, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      os.makedirs(folder, exist_ok=True)
      for i in range(per_class):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        base = np.array([60 + 80 * c, 200 - 60 * c, 40 + 70 * ((c + i) % 3)], np.float64)
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if i % 4 == 3:
          image = image.convert("L")
        ext = "jpg" if i % 3 == 2 else "png"
        image.save(os.path.join(folder, f"img_{i}.{ext}"), quality=90)
  return root


@pytest.fixture(scope="session")
def image_folder_dir(tmp_path_factory) -> str:
  """A read-only generated image folder: {train: 6, test: 3} images per class, classes bird/cat/dog."""
  return make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture
def image_folder_factory(tmp_path):
  """fn(**make_image_folder kwargs) -> root of a fresh folder (for tests that damage it)."""
  return lambda **kwargs: make_image_folder(tmp_path / "images", **kwargs)


@pytest.fixture
def backend_compiles():
  """`with backend_compiles() as names:` collects the function name of every XLA backend compile (cache loads
  included) that happens inside the block, from any thread (jax.monitoring)."""
  import jax  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def record():
    names = []
    listener = lambda event, duration, **kw: names.append(kw.get("fun_name")) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      yield names
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)

  return record


def pytest_collection_modifyitems(items):
  """Tests marked `heavy` first (in their own order; the rest keep theirs). The README's `-n 2` (pytest-xdist)
  hands tests out in this order: both workers start on the long runs and the short tests fill in behind, so
  neither is left running a long test alone at the end. No module-scoped fixture is shared between a heavy
  and a light test, so none is set up twice."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
