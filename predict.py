r"""Classifies images with a trained run: the top-5 classes and their probabilities per image.

  python predict.py --workdir=runs/nin shoe.png bag.jpg
  python predict.py --checkpoint=runs/nin/checkpoints/4680 --top_k=3 shoe.png
  python predict.py --workdir=runs/nin --which=best shoe.png

Images are preprocessed exactly as the run's eval (crop, resize, normalisation).
"""

import sys

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A run folder (its latest or best checkpoint is used).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint folder: checkpoints/ or checkpoints/<step>.")
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"], "Which checkpoint of a run folder.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the run's dataset metadata lives, if moved.")


def _main(paths):
  from cnn_jax import predict  # pylint: disable=g-import-not-at-top
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not paths:
    raise UserError("no images given: python predict.py --workdir=RUN image.png [...]")
  if _TOP_K.value < 1:
    raise UserError(f"--top_k={_TOP_K.value} must be at least 1")
  for p in paths:  # bad files fail before the model loads
    predict.read_image(p)
  predictor = predict.Predictor.from_run(_WORKDIR.value, _CHECKPOINT.value, _WHICH.value, _DATA_DIR.value)
  print(predictor.checkpoint_line(), file=sys.stderr, flush=True)  # stdout: the predictions alone
  print(predict.format_predictions(predictor.predict_files(paths, k=_TOP_K.value)))
  return 0


def main(argv):
  # Library chatter (TensorFlow, Orbax) only with --verbosity, as in train.py.
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()
  from cnn_jax import cli  # pylint: disable=g-import-not-at-top
  status = cli.run(cli.setup_runtime, distributed="off")
  return status or cli.run(_main, argv[1:])


if __name__ == "__main__":
  sys.exit(app.run(main))
