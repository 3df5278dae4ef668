r"""Classifies image files with a trained run: top-k classes and their probabilities per image.

  predictor = Predictor.from_run(workdir='runs/nin')                   # latest checkpoint
  predictor = Predictor.from_run(checkpoint='runs/nin/checkpoints/4680')
  for path, top in predictor.predict_files(['shoe.png'], k=5):         # [(class name, probability)]
    ...

Images go through the same preprocessing as eval (cnn_jax.data.pipeline.eval_preprocess_fn: decode,
centre crop or ten crops, resize, normalise), and ten-crop logits are averaged as in the eval step.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cnn_jax.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """Where one checkpoint lives: <directory>/<step>/{state,meta}; `workdir` holds config.json if known."""
  directory: str
  step: int
  workdir: Optional[str]


def _steps(directory: str) -> List[int]:
  """Complete checkpoint steps in `directory` (Orbax writes into a temporary name until committed)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state")))


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
  if step is None:
    if not steps:
      raise UserError(f"no complete checkpoint in {directory}; has the run saved one yet?")
    step = steps[-1]
    if which == "best":
      step = _best_eval_step(run_dir, steps) or step
  return CheckpointRef(directory=directory, step=step,
                       workdir=run_dir if os.path.exists(os.path.join(run_dir, "config.json")) else None)


def load_variables(ref: CheckpointRef) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """({'params': ..., 'batch_stats'?: ...} as numpy, the checkpoint's meta dict).

  Restored as plain numpy arrays, so a checkpoint written on 8 devices loads on one.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step_dir = os.path.join(ref.directory, str(ref.step))
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(os.path.join(step_dir, "state")).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(os.path.join(step_dir, "state"),
                                 args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read checkpoint {step_dir} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
  meta = {}
  if os.path.isdir(os.path.join(step_dir, "meta")):
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, "meta")) or {}
  variables = {"params": state["params"]}
  if state.get("batch_stats") is not None:
    variables["batch_stats"] = state["batch_stats"]
  return variables, meta


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


def read_image(path: str) -> bytes:
  """The file's bytes, checked to decode as an image; UserError naming the file otherwise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
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
               preprocess: Callable[[bytes], np.ndarray], step: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from cnn_jax import models
    from cnn_jax import ops  # pylint: disable=g-import-not-at-top
    self.config = config
    self.class_names = list(class_names)
    self.step = step
    self._preprocess = preprocess
    dtype = config.get("dtype", "float32")
    if dtype not in _DTYPES:
      raise UserError(f"config dtype {dtype!r} is not one of {list(_DTYPES)}")
    model = models.get_model(config.model, len(self.class_names), dtype=jnp.dtype(dtype),
                             **config.model_kwargs.to_dict())
    self._variables = variables
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False),
                          compiler_options=ops.compiler_options())

  @classmethod
  def from_run(cls, workdir: Optional[str] = None, checkpoint: Optional[str] = None, which: str = "latest",
               data_dir: Optional[str] = None) -> "Predictor":
    """Loads a run's config and checkpoint; `data_dir` overrides where the dataset's metadata is read."""
    from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
    from cnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    ref = find_checkpoint(workdir, checkpoint, which)
    variables, meta = load_variables(ref)
    config = load_config(ref, meta)
    if data_dir:
      config.data_dir = data_dir
    info = _run_info(ref)
    # Class names, channel count and normalisation come from run_info.json when the loop records them;
    # otherwise from the dataset itself (its metadata only: no image is read).
    class_names, channels, mean_std = info.get("class_names"), info.get("channels"), info.get("mean_std")
    if class_names is None or channels is None or "mean_std" not in info:
      source = datasets.get_source(config)
      train_split, eval_split = datasets.resolve_splits(config, source)
      class_names = class_names or source.info(train_split, eval_split).class_names
      channels = channels or source.channels
      if "mean_std" not in info:
        mean_std = datasets.mean_std(config, source, train_split)
    num_classes = info.get("num_classes", len(class_names))
    if len(class_names) != num_classes:
      raise UserError(f"the run has {num_classes} classes but its dataset lists {len(class_names)} names")
    fn = pipeline.eval_preprocess_fn(config.get("eval_crop", "center"),
                                     float(config.get("eval_resize_ratio", 1.0)), int(config.image_size),
                                     int(channels), mean_std)
    return cls(config, variables, class_names, lambda data: fn(data).numpy(), ref.step)

  def preprocess(self, data: bytes) -> np.ndarray:
    """Encoded image -> float32 [S, S, 3] (or [10, S, S, 3] with ten-crop eval), exactly as eval does."""
    return self._preprocess(data)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """float32 [N, num_classes] for preprocessed images [N, S, S, 3] or [N, crops, S, S, 3] (averaged)."""
    if images.ndim == 5:
      n, crops = images.shape[:2]
      out = np.asarray(self._apply(self._variables, images.reshape((n * crops,) + images.shape[2:])))
      return out.reshape(n, crops, -1).mean(axis=1).astype(np.float32)
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
