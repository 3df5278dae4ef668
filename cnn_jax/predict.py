r"""Classifies image files with a trained run: top-k classes and their probabilities per image.

  predictor = Predictor.from_run(workdir='runs/nin')                   # latest checkpoint
  predictor = Predictor.from_run(checkpoint='runs/nin/checkpoints/4680')
  for path, top in predictor.predict_files(['shoe.png'], k=5):         # [(class name, probability)]
    ...

Images go through the same preprocessing as eval (cnn_jax.data.pipeline.eval_preprocess_fn: decode,
centre crop or ten crops, resize, normalise), and ten-crop logits are averaged as in the eval step.

Self-contained: the training loop records in run_info.json (and in every checkpoint's meta) what prediction
needs, `inference_record`: class names, channels, normalisation mean/std and the eval preprocessing. So a
run predicts after its dataset was moved or deleted; the dataset is never listed or rebuilt. Only runs
written before that record fall back to reading the dataset's metadata (--data_dir if it moved).
A damaged newest checkpoint is skipped with one warning line (checksums verified, cnn_jax.checkpoint).
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cnn_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where one checkpoint lives: <directory>/<step>/{state,meta}; `workdir` holds config.json if known."""
  directory: str
  step: int
  workdir: Optional[str]
  explicit: bool = True  # named by the user (or the best by metrics): not silently replaced if damaged


def _steps(directory: str) -> List[int]:
  """Complete checkpoint steps in `directory` (Orbax writes into a temporary name until committed)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


def inference_record(config, info, channels: int, mean_std) -> Dict[str, Any]:
  """What prediction needs besides the weights, recorded by the training loop in run_info.json.

  {'class_names': [...], 'channels': 1 | 3 (what images are decoded to), 'mean_std': [[mean], [std]] or
  None, 'eval_preprocess': {'eval_crop', 'eval_resize_ratio', 'image_size', 'eval_flip'}}. `info`, `channels` and
  `mean_std` come from the run's input (cnn_jax.data.inputs.Input): no dataset is opened here.
  """
  return {
      "class_names": list(info.class_names or []),
      "channels": int(channels),
      "mean_std": [list(map(float, mean_std[0])), list(map(float, mean_std[1]))] if mean_std else None,
      "eval_preprocess": {"eval_crop": config.eval_crop, "eval_resize_ratio": float(config.eval_resize_ratio),
                          "image_size": int(config.image_size), "eval_flip": bool(config.eval_flip)},
  }


def _best_eval_step(workdir: Optional[str], available: Sequence[int]) -> Optional[int]:
  """The checkpointed step with the highest eval top-1 in metrics.jsonl (the loop saves at every eval)."""
  path = os.path.join(workdir or "", "metrics.jsonl")
  if not workdir or not os.path.exists(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r.get("split") == "eval" and r.get("step") in available:
        if best is None or r["top1"] > best[1]:
          best = (r["step"], r["top1"])
  return best[0] if best else None


def find_checkpoint(workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                    which: str = "latest") -> CheckpointRef:
  """Resolves --workdir / --checkpoint (a workdir, its checkpoints/ or checkpoints/<step>) to one checkpoint.

  which: 'latest', or 'best' (highest eval top-1 among the kept checkpoints).
  """
  if (workdir is None) == (checkpoint is None):
    raise UserError("pass exactly one of --workdir (a run folder) or --checkpoint (a checkpoint folder)")
  if which not in ("latest", "best"):
    raise UserError(f"--which={which!r} must be 'latest' or 'best'")
  path = os.path.abspath(workdir or checkpoint)
  if not os.path.isdir(path):
    raise UserError(f"{workdir or checkpoint!r} is not a folder")
  step = None
  if os.path.isdir(os.path.join(path, "checkpoints")):
    run_dir, directory = path, os.path.join(path, "checkpoints")
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    directory, step = os.path.dirname(path), int(os.path.basename(path))
    run_dir = os.path.dirname(directory)
  else:
    directory, run_dir = path, os.path.dirname(path)
  steps = _steps(directory)
  explicit = step is not None
  if step is None:
    if not steps:
      raise UserError(f"no complete checkpoint in {directory}; has the run saved one yet?")
    step = steps[-1]
    if which == "best":
      best = _best_eval_step(run_dir, steps)
      explicit = best is not None  # the best one is named by the metrics, so a damaged one is reported
      step = best or step
  return CheckpointRef(directory=directory, step=step,
                       workdir=run_dir if os.path.exists(os.path.join(run_dir, "config.json")) else None,
                       explicit=explicit)


def load_variables(ref: CheckpointRef) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
  """({'params': ..., 'batch_stats'?: ...} as numpy, the checkpoint's meta dict, the step read).

  Restored as plain numpy arrays (a checkpoint written on 8 devices loads on one), checksums verified.
  The newest checkpoint of a run folder, when damaged, is skipped for the previous one (one warning
  line); a checkpoint named explicitly is an error naming the earlier ones.
  """
  # Imported on first use: predict.py checks the image files before it pays for Orbax and JAX.
  from cnn_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  flag = "--checkpoint"
  if ref.explicit:
    step, state, meta = ckpt_lib.read_newest_good(ref.directory, ref.step, flag)
  else:
    step, state, meta = ckpt_lib.read_newest_good(ref.directory, None, flag)
  if state.get("ema") is not None:  # the run evaluated its averaged weights: so does prediction
    return dict(state["ema"]), meta, step
  variables = {"params": state["params"]}
  if state.get("batch_stats") is not None:
    variables["batch_stats"] = state["batch_stats"]
  return variables, meta, step


def load_config(ref: CheckpointRef, meta: Dict[str, Any]):
  """The run's resolved config: <workdir>/config.json, else the copy inside the checkpoint's meta."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if ref.workdir:
    with open(os.path.join(ref.workdir, "config.json")) as f:
      return ml_collections.ConfigDict(json.load(f))
  if meta.get("config"):
    raw = meta["config"]
    return ml_collections.ConfigDict(json.loads(raw) if isinstance(raw, str) else raw)
  raise UserError(f"found neither config.json next to {ref.directory} nor a config in its checkpoint meta")


def _run_info(ref: CheckpointRef) -> Dict[str, Any]:
  path = os.path.join(ref.workdir or "", "run_info.json")
  if ref.workdir and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


_RECORD_KEYS = ("class_names", "channels", "mean_std", "eval_preprocess")


def _record_from_dataset(config, data_dir: Optional[str]) -> Dict[str, Any]:
  """The inference record of a run trained before it was recorded: from its dataset's metadata.

  Never prepares or downloads the dataset; if it cannot be read the error names predict.py's own flag.
  """
  from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.manual_dir, config.download = "", False  # read what is there; never rebuild it
    if data_dir:
      config.data_dir = data_dir
  try:
    source = datasets.get_source(config)
    train_split, eval_split = datasets.resolve_splits(config, source)
    mean_std = datasets.mean_std(config, source, train_split)
    class_names = list(source.info(train_split, eval_split).class_names)
  except UserError as e:
    # Not the dataset's own message: it names train.py's flags (--config.manual_dir, ...).
    name = str(config.get("dataset"))
    if name.startswith(datasets.FOLDER_PREFIX):
      where = name[len(datasets.FOLDER_PREFIX):]
      problem, fix = f"the image folder {where} cannot be read", f"put it back at {where}"
    else:
      where = config.get("data_dir") or "the default tfds data dir"
      problem = f"{name} is not prepared in {where}"
      fix = f"pass --data_dir=<the tfds data dir that holds {name}>"
    raise UserError(f"this run predates the inference record in run_info.json, so prediction needs its "
                    f"dataset for class names and normalisation, but {problem}; {fix}") from e
  return {"class_names": class_names, "channels": int(source.channels),
          "mean_std": [list(mean_std[0]), list(mean_std[1])] if mean_std else None,
          "eval_preprocess": {"eval_crop": config.get("eval_crop", "center"),
                              "eval_resize_ratio": float(config.get("eval_resize_ratio", 1.0)),
                              "image_size": int(config.image_size)}}


def decodable(data: bytes, channels: int) -> bytes:
  """`data` as bytes the eval pipeline decodes right: CMYK JPEGs (which TF cannot decode to one channel
  and decodes to wrong colours as three) and anything else TF rejects are converted with PIL to PNG."""
  import io  # pylint: disable=g-import-not-at-top
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      mode = image.mode
  except Exception:  # pylint: disable=broad-except
    mode = None
  if mode != "CMYK":
    try:
      tf.io.decode_image(data, channels=channels, expand_animations=False)
      return data
    except (tf.errors.InvalidArgumentError, ValueError):
      pass
  try:
    with Image.open(io.BytesIO(data)) as image:
      out = io.BytesIO()
      image.convert("L" if channels == 1 else "RGB").save(out, format="PNG")
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"an image could not be decoded ({type(e).__name__}: {e})") from e
  return out.getvalue()


def read_image(path: str) -> bytes:
  """The file's bytes, checked to decode as an image; UserError naming the file otherwise."""
  from cnn_jax.data.tf_runtime import tf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    tf.io.decode_image(data, expand_animations=False)
  except (tf.errors.InvalidArgumentError, ValueError) as e:
    raise UserError(f"{path}: not a readable image (JPEG, PNG, GIF or BMP expected)") from e
  return data


class Predictor:
  """A trained network plus the eval preprocessing of its run."""

  def __init__(self, config, variables: Dict[str, Any], class_names: Sequence[str],
               preprocess: Callable[[bytes], np.ndarray], step: int, flip: bool = False,
               checkpoint_path: Optional[str] = None, total_steps: Optional[int] = None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from cnn_jax import models  # pylint: disable=g-import-not-at-top
    from cnn_jax import ops  # pylint: disable=g-import-not-at-top
    from cnn_jax import specs  # pylint: disable=g-import-not-at-top
    self.config = config
    self.class_names = list(class_names)
    self.step = step
    self.flip = flip  # average each image's logits with its mirror image's, as the run's eval did
    self.checkpoint_path = checkpoint_path  # the checkpoint folder the weights came from
    self.total_steps = total_steps  # the run's planned steps (run_info.json), None if unknown
    self._preprocess = preprocess
    dtype = config.get("dtype", "float32")
    if dtype not in specs.DTYPES:
      raise UserError(f"config dtype {dtype!r} is not one of {list(specs.DTYPES)}")
    model = models.get_model(config.model, len(self.class_names), dtype=jnp.dtype(dtype),
                             **config.model_kwargs.to_dict())
    self._variables = variables
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False),
                          compiler_options=ops.compiler_options())

  @classmethod
  def from_run(cls, workdir: Optional[str] = None, checkpoint: Optional[str] = None, which: str = "latest",
               data_dir: Optional[str] = None) -> "Predictor":
    """Loads a run's config, checkpoint and inference record (see `inference_record`).

    `data_dir` only matters for runs trained before the record existed: where their dataset's metadata
    is read (class names, channels, normalisation).
    """
    from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    ref = find_checkpoint(workdir, checkpoint, which)
    variables, meta, step = load_variables(ref)
    config = load_config(ref, meta)
    info = _run_info(ref)
    record = {**(meta.get("inference") or {}), **{k: info[k] for k in _RECORD_KEYS if k in info}}
    if not all(k in record for k in _RECORD_KEYS):
      record = {**_record_from_dataset(config, data_dir), **record}
    class_names, channels, mean_std = record["class_names"], int(record["channels"]), record["mean_std"]
    num_classes = info.get("num_classes", meta.get("num_classes", len(class_names)))
    if len(class_names) != num_classes:
      raise UserError(f"the run has {num_classes} classes but its record lists {len(class_names)} names")
    pre = record["eval_preprocess"]
    fn = pipeline.eval_preprocess_fn(pre["eval_crop"], float(pre["eval_resize_ratio"]),
                                     int(pre["image_size"]), channels, mean_std)
    return cls(config, variables, class_names, lambda data: fn(decodable(data, channels)).numpy(), step,
               flip=bool(pre.get("eval_flip", False)), checkpoint_path=os.path.join(ref.directory, str(step)),
               total_steps=info.get("total_steps"))

  def checkpoint_line(self) -> str:
    """Which checkpoint predicts: 'checkpoint: <path> (step 8 of 8)', saying so when the run is unfinished."""
    of = ""
    if self.total_steps:
      of = f" of {self.total_steps:,}" + (": the run is unfinished" if self.step < self.total_steps else "")
    return f"checkpoint: {self.checkpoint_path} (step {self.step:,}{of})"

  def preprocess(self, data: bytes) -> np.ndarray:
    """Encoded image -> float32 [S, S, 3] (or [10, S, S, 3] with ten-crop eval), exactly as eval does."""
    return self._preprocess(data)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, num_classes] for preprocessed images [N, S, S, 3] or [N, crops, S, S, 3] (averaged)."""
    if images.ndim == 5:
      n, crops = images.shape[:2]
      out = np.asarray(self._apply(self._variables, images.reshape((n * crops,) + images.shape[2:])))
      return out.reshape(n, crops, -1).mean(axis=1).astype(np.float32)
    if self.flip:
      return ((np.asarray(self._apply(self._variables, images), np.float32)
               + np.asarray(self._apply(self._variables, images[:, :, ::-1]), np.float32)) / 2)
    return np.asarray(self._apply(self._variables, images), np.float32)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Softmax of the logits: float32 [N, num_classes], rows summing to 1."""
    z = self.logits(images)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)

  def predict_files(self, paths: Sequence[str], k: int = 5) -> List[Tuple[str, List[Tuple[str, float]]]]:
    """[(path, [(class name, probability)] * k, most likely first)]; every file is checked before any runs."""
    images = np.stack([self.preprocess(read_image(p)) for p in paths])
    probs = self.probabilities(images)
    k = min(k, probs.shape[-1])
    out = []
    for path, p in zip(paths, probs):
      top = np.argsort(-p, kind="stable")[:k]
      out.append((path, [(self.class_names[i], float(p[i])) for i in top]))
    return out


def format_predictions(results: Sequence[Tuple[str, List[Tuple[str, float]]]]) -> str:
  """Plain text: the file name, then one 'rank. class  probability' line per class."""
  lines = []
  for path, top in results:
    lines.append(f"{path}:")
    width = max(len(name) for name, _ in top)
    lines += [f"  {i + 1}. {name:<{width}}  {p:.4f}" for i, (name, p) in enumerate(top)]
  return "\n".join(lines)
