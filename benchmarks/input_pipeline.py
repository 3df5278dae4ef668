r"""Input pipeline throughput: augmented images per second, per core and per CPU-second.

  python benchmarks/input_pipeline.py --data_dir=/path/to/prepared/tfds     # every case, about a minute
  python benchmarks/input_pipeline.py --manual_dir=/path/to/fashion_mnist   # (a) prepared from the four files
  python benchmarks/input_pipeline.py --cases=jpeg,torch                    # no Fashion-MNIST needed
  python benchmarks/input_pipeline.py --folder=/data/my_images --image_size=224   # your own image folder

(a) Fashion-MNIST resized to 224 with the shared config's training augmentation (decoded images cached
    in memory, as in training), read from --data_dir (default $CNN_JAX_TFDS_DATA_DIR, else tfds's own
    ~/tensorflow_datasets, where train.py prepares it). If it is not prepared there, --manual_dir (default
    $CNN_JAX_FASHION_MNIST_MANUAL_DIR) prepares it into a temporary dir (about 20 s); without either, one
    `error:` line and status 2. Nothing is ever downloaded.
(b) A temporary folder of generated 500x375 JPEGs with the full AlexNet/Inception-style augmentation:
    random-resized crop 224, flip, brightness/contrast/saturation 0.4, PCA lighting 0.1, normalisation.
(c) If torch is installed: a PyTorch DataLoader doing the same as (b) on the same files with PIL, as
    torchvision's transforms do for PIL images, in --workers processes; and the ratio (b) / (c).
(d) With --folder: your image folder (root/<split>/<class>/<images>, README "Folder datasets") through the
    shared recipe's training pipeline at --image_size, decoding every image each time (--cache=false, as
    for a folder too large to keep in memory); also how long listing the folder took. Only (d) runs.

"per core" divides img/s by the cores the pipeline may use (tf.data threads / DataLoader workers);
"per CPU-s" divides images by the CPU time actually spent (all threads, and DataLoader workers), which
stays meaningful when other processes share the machine.
"""

import os
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per case (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first (graph building, cache, buffers).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_NUM_JPEGS = flags.DEFINE_integer("num_jpegs", 512, "Generated JPEGs for (b) and (c).")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "tf.data threads / DataLoader workers.")
_DATA_DIR = flags.DEFINE_string("data_dir", os.environ.get("CNN_JAX_TFDS_DATA_DIR"),
                                "(a) tfds data dir holding the prepared Fashion-MNIST (default: tfds's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", os.environ.get("CNN_JAX_FASHION_MNIST_MANUAL_DIR"),
                                  "(a) Fashion-MNIST's four source files, if it is not prepared in --data_dir.")
_CASES = flags.DEFINE_list("cases", ["fashion_mnist", "jpeg", "torch"], "Which cases to run.")
_FOLDER = flags.DEFINE_string("folder", None, "Time your own image folder (case d) instead of the others.")
_SPLIT = flags.DEFINE_string("split", "train", "(d) The split folder to read.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "(d) Training resolution.")
_CACHE = flags.DEFINE_bool("cache", False, "(d) Keep decoded images in memory (the shared recipe does for "
                           "small datasets); off times the decode of every image.")


def _cpu_seconds() -> float:
  """CPU time of this process (all threads) plus its finished children."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def _report(name, images, wall, cpu, cores):
  rate = images / wall
  per_cpu = images / cpu if cpu > 0 else float("nan")  # os.times() ticks are 10 ms: a tiny run may read 0
  print(f"{name:<44s} {rate:8.1f} img/s  {rate / cores:7.1f} img/s/core  {per_cpu:7.1f} img/CPU-s",
        flush=True)
  return rate


def _time_iterator(it, batch_size):
  for _ in range(_WARMUP.value):
    next(it)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(_BATCHES.value):
    batch = next(it)
  assert batch["image"].shape[0] == batch_size
  return _BATCHES.value * batch_size, time.perf_counter() - wall, _cpu_seconds() - cpu


def _fashion_mnist_data_dir(tmp):
  """--data_dir if Fashion-MNIST is prepared there, else a temporary dir prepared from --manual_dir.

  Never downloads: offline, tfds would retry the download for minutes. UserError (one line) otherwise.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  where = _DATA_DIR.value or "tfds's default data dir"
  if tfds.builder("fashion_mnist", data_dir=_DATA_DIR.value).is_prepared():
    return _DATA_DIR.value
  if not _MANUAL_DIR.value:
    raise UserError(f"(a) needs Fashion-MNIST, which is not prepared in {where}: pass --data_dir=<prepared tfds "
                    "dir> or --manual_dir=<folder with its four .gz files>, or leave it out with --cases=jpeg,torch")
  if not os.path.isdir(_MANUAL_DIR.value):
    raise UserError(f"--manual_dir={_MANUAL_DIR.value} is not a folder; point it at Fashion-MNIST's four .gz files")
  data_dir = os.path.join(tmp, "tfds")
  print(f"preparing Fashion-MNIST into {data_dir} from {_MANUAL_DIR.value} ...", flush=True)
  datasets.TfdsSource("fashion_mnist", data_dir=data_dir, manual_dir=_MANUAL_DIR.value)  # download=False
  return data_dir


def _base_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config()
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = _BATCH.value
  config.data_threads = _WORKERS.value
  return config


def bench_fashion_mnist(tmp):
  from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _base_config()
  config.dataset = "fashion_mnist"
  config.data_dir = _fashion_mnist_data_dir(tmp)
  config.image_size = 224
  config.shuffle_buffer = 4096
  images, wall, cpu = _time_iterator(pipeline.create_train_iter(config, seed=0), _BATCH.value)
  crop = config.augment.crop
  return _report(f"(a) Fashion-MNIST 28->224, {crop}+flip", images, wall, cpu, _WORKERS.value)


def make_jpeg_folder(root, num_images, classes=4, size=(500, 375), seed=0):
  """root/train/class_<k>/<i>.jpg: smooth random photos-like images (compress like real ones)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    folder = os.path.join(root, "train", f"class_{i % classes}")
    os.makedirs(folder, exist_ok=True)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8))
    fine = np.asarray(coarse.resize(size, Image.BICUBIC), np.float32)
    fine = fine + rng.normal(0, 8, fine.shape)
    Image.fromarray(np.clip(fine, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
  return root


_FULL_AUGMENT = dict(crop="random_resized", flip=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0,
                     pca_lighting=0.1)


def bench_jpeg(root):
  from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _base_config()
  config.dataset = "folder:" + root
  config.eval_split = "train"
  config.image_size = 224
  config.cache = False  # ImageNet-sized data is decoded every step
  config.normalize = "imagenet"
  config.augment.update(_FULL_AUGMENT)
  images, wall, cpu = _time_iterator(pipeline.create_train_iter(config, seed=0), _BATCH.value)
  return _report("(b) JPEG 500x375 -> 224, full augmentation", images, wall, cpu, _WORKERS.value)


def bench_folder(root):
  """(d): the shared recipe's training pipeline over a user's folder; returns img/s."""
  from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  config = _base_config()
  config.dataset = "folder:" + os.path.abspath(os.path.expanduser(root))
  config.train_split = config.eval_split = _SPLIT.value
  config.image_size = _IMAGE_SIZE.value
  config.cache = _CACHE.value
  t = time.perf_counter()
  source = datasets.get_source(config)
  listed = time.perf_counter() - t
  print(f"(d) {root}: {len(source.class_names)} classes, {source.num_examples(_SPLIT.value):,} images in "
        f"{_SPLIT.value}/, listed in {listed:.2f} s", flush=True)
  images, wall, cpu = _time_iterator(pipeline.create_train_iter(config, seed=0), _BATCH.value)
  crop = config.augment.crop
  return _report(f"(d) your folder -> {_IMAGE_SIZE.value}, {crop}+flip{', cached' if _CACHE.value else ''}",
                 images, wall, cpu, _WORKERS.value)


class _TorchFolder:
  """(image tensor, label) of root/train/<class>/*.jpg with torchvision's PIL-path transforms.

  torchvision itself is not required (its registry wheels need a CUDA torch): RandomResizedCrop,
  RandomHorizontalFlip and ColorJitter(0.4, 0.4, 0.4) are written with the PIL calls torchvision makes for
  PIL images (crop + bilinear resize, transpose, ImageEnhance), then ToTensor, AlexNet lighting, Normalize.
  """

  def __init__(self, root):
    from cnn_jax.data import augment  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    classes = sorted(os.listdir(root))
    self.files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                  for f in sorted(os.listdir(os.path.join(root, c)))]
    self.eigvals = torch.tensor(augment.IMAGENET_EIGVALS)
    self.eigvecs = torch.tensor(augment.IMAGENET_EIGVECS)
    self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

  def __len__(self):
    return len(self.files)

  @staticmethod
  def _random_resized_crop_box(width, height, rng):
    """torchvision.transforms.RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3))."""
    area = width * height
    for _ in range(10):
      target = area * rng.uniform(0.08, 1.0)
      ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
      if 0 < w <= width and 0 < h <= height:
        x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        return x, y, x + w, y + h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

  def __getitem__(self, index):
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image, ImageEnhance  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng()
    path, label = self.files[index]
    with Image.open(path) as f:
      image = f.convert("RGB")
    image = image.resize((224, 224), Image.BILINEAR, box=self._random_resized_crop_box(*image.size, rng))
    if rng.uniform() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in rng.permutation([ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]):
      image = enhance(image).enhance(rng.uniform(0.6, 1.4))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # ToTensor
    alpha = torch.randn(3) * _FULL_AUGMENT["pca_lighting"]
    x = x + (self.eigvecs @ (alpha * self.eigvals)).view(3, 1, 1)
    return (x - self.mean) / self.std, label


def bench_torch(root):
  """The same augmentation in a PyTorch DataLoader with worker processes; returns img/s."""
  import torch  # pylint: disable=g-import-not-at-top
  loader = torch.utils.data.DataLoader(_TorchFolder(os.path.join(root, "train")), batch_size=_BATCH.value,
                                       shuffle=True, drop_last=True, num_workers=_WORKERS.value,
                                       persistent_workers=False)
  # One untimed epoch (worker start-up, page cache), then whole timed epochs: workers exit at the end of
  # each epoch, so their CPU time is counted in os.times().children_*.
  for _ in loader:
    pass
  epochs = max(1, -(-_BATCHES.value // len(loader)))
  images, wall, cpu = 0, time.perf_counter(), _cpu_seconds()
  for _ in range(epochs):
    for batch, _ in loader:
      images += batch.shape[0]
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  return _report(f"(c) PyTorch DataLoader + PIL ({_WORKERS.value} workers)", images, wall, cpu,
                 _WORKERS.value)


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # before TensorFlow's import: its start-up lines only with --verbosity
  from cnn_jax.data import tf_runtime  # pylint: disable=g-import-not-at-top,unused-import  (GPUs hidden)
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="cnn_jax_bench_")
  try:
    print(f"{os.cpu_count()} CPU cores, batch {_BATCH.value}, {_BATCHES.value} timed batches", flush=True)
    if _FOLDER.value:
      try:
        bench_folder(_FOLDER.value)
      except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      return 0
    try:
      if "fashion_mnist" in _CASES.value:
        bench_fashion_mnist(tmp)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if "jpeg" in _CASES.value or "torch" in _CASES.value:
      root = make_jpeg_folder(os.path.join(tmp, "jpegs"), _NUM_JPEGS.value)
      ours = bench_jpeg(root) if "jpeg" in _CASES.value else None
      if "torch" in _CASES.value:
        try:
          import torch  # pylint: disable=g-import-not-at-top,unused-import
        except ImportError:
          print("(c) skipped: torch is not installed (a CPU build: pip install torch)")
          return 0
        theirs = bench_torch(root)
        if ours:
          print(f"tf.data / PyTorch throughput ratio: {ours / theirs:.2f}x")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  app.run(main)
