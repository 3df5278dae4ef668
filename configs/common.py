r"""THE shared recipe: one input pipeline and one optimiser for every architecture.

Every model config (alexnet.py, vgg.py, nin.py, lenet.py) calls ``get_config`` here and changes only the
model, so two runs of different families differ in the network and nothing else. What a paper fixes for its
architecture (LeNet has no dropout, AlexNet/VGG drop 0.5 in the FC head, NiN 0.5 before the last block; the
weight init) is the model's own default in ``cnn_jax/models``, not part of this recipe: ``model_kwargs``
fields left at None take the family's default. ``cnn_jax/fingerprint.py`` says which fields are recipe
(identical across a comparison) and which are architecture (recorded per run).

Every field the code reads is declared here (tests/test_config_fields.py checks it), so each can be set
from the command line (``--config.FIELD=VALUE``) and is recorded in the run's fingerprint.

Config args (big_vision style, after the colon of ``--config=configs/nin.py:...``), comma-separated:
  dataset=NAME   any tfds image-classification name (fashion_mnist, cifar10, imagenette, imagenet2012, ...)
                 or ``folder:/path/to/root`` with root/{train,test}/<class>/*.{jpg,png}.
  res=N          the square training/eval resolution (default: the family's native resolution).
  small          the small-input geometry at 32 px: the CPU-practical way to train on 28-32 px data.
  quick          the quick start: ``small`` at width 1/4 (LeNet at its own size) for 3 epochs; minutes on a
                 2-core CPU (README, "Quick start").
  smoke          a seconds-long plumbing run (width 1/8, 32 px, a handful of steps).
  epochs=N, batch=N, width=F, lr=F, seed=N   common knobs.
Anything else is a regular override: ``--config.optimizer.learning_rate=0.02``.

Launch (d2l recipe, Fashion-MNIST resized to the native resolution; tfds downloads it, or prepares it
offline from --config.manual_dir=/path/to/fashion_mnist):
  python train.py --config=configs/nin.py --workdir=runs/nin
"""

import ml_collections
from ml_collections import config_dict

# The family's native (paper) input resolution; configs set `native_res` before calling get_config.
_SMALL_RES = 32


def parse_arg(arg):
  """Parses 'a=1,b=x,flag' into {'a': '1', 'b': 'x', 'flag': True}."""
  out = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      key, value = part.split("=", 1)
      out[key.strip()] = value.strip()
    else:
      out[part] = True
  return out


_KNOWN_ARGS = ("dataset", "res", "small", "quick", "smoke", "epochs", "batch", "width", "lr", "seed",
               "geometry")
# Families that `quick` (and the sweeps' width=) leave at full width: LeNet is already tiny (the baseline).
_UNSCALED = ("lenet",)
QUICK_EPOCHS = 3
QUICK_WIDTH = 0.25


def get_config(arg=None, *, model="nin", native_res=224, model_kwargs=None):
  """Returns the shared config for `model`; `arg` is the big_vision-style config string.

  model_kwargs: the family's own switches, declared so they can be set from the command line (e.g.
  AlexNet's lrn/groups at their paper-faithful defaults); never recipe fields.
  """
  args = parse_arg(arg)
  unknown = sorted(set(args) - set(_KNOWN_ARGS))
  if unknown:
    raise ValueError(f"unknown config arg(s) {unknown}; known: {list(_KNOWN_ARGS)}")

  config = ml_collections.ConfigDict()
  config.seed = 0

  # --- Model -------------------------------------------------------------------------------
  config.model = model
  # None = the family's own default (the paper's): dropout 0.5 in AlexNet/VGG's FC head and before NiN's
  # last block, none in LeNet. Set it to study dropout (configs/sweeps/dropout.py).
  config.model_kwargs = ml_collections.ConfigDict(dict(
      geometry="native", width=1.0, activation="relu",
      dropout_rate=config_dict.placeholder(float)))
  config.model_kwargs.update(model_kwargs or {})
  # Compute dtype: 'float32' or 'bfloat16' (params and optimiser state stay float32).
  config.dtype = "float32"

  # --- Data: the one pipeline --------------------------------------------------------------
  config.dataset = "fashion_mnist"
  config.data_dir = config_dict.placeholder(str)        # tfds data dir; None = tfds default (~/tensorflow_datasets).
  config.manual_dir = config_dict.placeholder(str)      # local copies of the source files, for offline preparation.
  config.download = True        # tfds downloads a missing dataset; offline, --config.manual_dir prepares it
                                # from local files instead (and a failed download says so in one line).
  config.train_split = "train"
  config.eval_split = "auto"    # 'test', or 'validation' where a dataset has no test split.
  config.image_size = native_res
  config.batch_size = 128       # global batch, over all devices of all hosts.
  config.eval_batch_size = 256
  config.shuffle_buffer = 16_384
  config.cache = True           # keep decoded small datasets in memory ...
  config.cache_max_gb = 4.0     # ... when this process's decoded slice is smaller than this.
  config.cache_dir = config_dict.placeholder(str)       # where dataset statistics (PCA lighting) are cached; None = workdir.
  # Input mode: 'device' keeps the decoded uint8 split on the accelerators and augments inside the jitted
  # step (no TensorFlow at run time once the array cache exists); 'host' is the tf.data pipeline;
  # 'auto' = device when the resident splits fit input_memory_share of one device's memory.
  config.input = "auto"
  config.input_memory_share = 0.25
  config.array_cache_dir = config_dict.placeholder(str)  # None = beside the tfds data (folders: ~/.cache/cnn_jax)
  config.array_cache_res = 0    # side of cached images of varying size; 0 = round(image_size * 256 / 224)
  config.augment = ml_collections.ConfigDict(dict(
      crop="resize_random_crop",  # random_resized | resize_random_crop | pad_random_crop | none
      resize_ratio=256 / 224,     # resize_random_crop: shorter side = ratio * image_size (AlexNet: 256 -> 224).
      area_range=(0.08, 1.0),     # random_resized
      aspect_range=(3 / 4, 4 / 3),
      pad=4,                      # pad_random_crop
      flip=True,
      brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
      pca_lighting=0.0,           # AlexNet's sigma = 0.1
  ))
  config.eval_train_split = ""    # e.g. 'train[:10000]': also evaluate that part of the training split
                                  # (eval preprocessing) at every eval -> train-test gap in summary.json.
  # Per-channel input normalisation: 'auto' (known per-dataset values, else ImageNet's), 'imagenet',
  # 'dataset' (computed from the train split, cached), 'none', or 'mean=R,G,B;std=R,G,B' in [0, 1] units.
  config.normalize = "auto"
  config.data_threads = 0         # tf.data's private thread pool; 0 = one per CPU core.
  config.deterministic = True     # order-preserving tf.data maps: identical batches from one seed.
  config.eval_crop = "center"     # center | ten_crop
  config.eval_resize_ratio = 1.0  # eval: resize shorter side to ratio * image_size, then centre crop.
  config.eval_flip = False        # test-time augmentation: average the logits of each image and its mirror

  # --- Optimiser: SGD with momentum, as in the papers ---------------------------------------
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=0.01,           # at batch 128; scaled linearly with the global batch. ONE value for
                                    # every family (the published comparison's), never set per model.
      momentum=0.9,
      nesterov=False,
      weight_decay=5e-4,
      decay_biases=False,           # weight decay on kernels only (BatchNorm scales/biases excluded).
      grad_clip_norm=0.0,           # 0 = off
      label_smoothing=0.0,
      ema_decay=0.0,                # > 0: evaluate an exponential moving average of the weights (0 = off)
  ))
  config.schedule = ml_collections.ConfigDict(dict(
      name="cosine",                # cosine | linear (warmup, then linear to 0) | onecycle | step | constant
      warmup_epochs=1.0,
      step_epochs=(),               # step: epochs at which the LR drops
      step_factor=0.1,
  ))
  config.num_epochs = 10
  config.num_train_steps = -1     # > 0 overrides num_epochs.

  # --- Loop ---------------------------------------------------------------------------------
  config.log_every_steps = 50
  config.eval_every_epochs = 1.0  # also at the end
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3     # the last N, plus the best by eval top-1
  config.checkpoint_async = True  # write checkpoints in a background thread while training goes on
  config.init_from = config_dict.placeholder(str)         # another run's workdir or checkpoint: start from its weights.
  config.restore_step = -1        # resume from this checkpoint step (later ones moved aside); -1 newest, 0 afresh.
  config.allow_config_change = False  # resume even if dataset/train_split/batch_size changed (recorded).
  config.progress = True          # a live progress line on process 0
  config.log_grad_norms = False   # also log 'grad_norm/<layer>' for every layer (train records)

  # --- Config args --------------------------------------------------------------------------
  if "quick" in args:
    args.setdefault("small", True)
    args.setdefault("epochs", str(QUICK_EPOCHS))
    if model not in _UNSCALED:
      args.setdefault("width", str(QUICK_WIDTH))
  if "small" in args or args.get("geometry") == "small":
    config.model_kwargs.geometry = "small"
    config.image_size = _SMALL_RES
    config.augment.crop = "pad_random_crop"
  if "smoke" in args:
    config.model_kwargs.geometry = "small"
    config.model_kwargs.width = 0.125
    config.image_size = _SMALL_RES
    config.augment.crop = "pad_random_crop"
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.checkpoint_every_steps = 10
  if "dataset" in args:
    config.dataset = args["dataset"]
  if "res" in args:
    config.image_size = int(args["res"])
  if "epochs" in args:
    config.num_epochs = int(args["epochs"])
  if "batch" in args:
    config.batch_size = int(args["batch"])
  if "width" in args:
    config.model_kwargs.width = float(args["width"])
  if "lr" in args:
    config.optimizer.learning_rate = float(args["lr"])
  if "seed" in args:
    config.seed = int(args["seed"])
  return config
