"""What the user's terminal shows: the project's own lines, never a dead terminal, no library chatter.

  quiet_libraries()              # first thing in an entry point's main (before TensorFlow is imported)
  say("compiling the train step")            # '[00:12] compiling the train step' (process 0 only)
  progress = Progress(total_steps, start_step)
  progress.update(step, loss=0.41, img_per_s=812.0)
  progress.evaluated(step, epoch, {'top1': 0.84, 'top5': 0.99})
  progress.close()

Progress is a tqdm bar on a terminal (tqdm owns the cursor, so a shorter update never leaves stale
characters) and one plain line per update when the output is a pipe or a log file. Status lines carry the
time since the process started, so a long set-up step (preparing data, compiling) is visible as such.

This module imports no TensorFlow or JAX at import time: `quiet_libraries` must run before they load.
"""

import logging
import os
import re
import sys
import time
from typing import Any, Dict, Optional

_T0 = time.time()  # this module is imported by the entry points first thing: ~ process start
_VERBOSE = False

# Python loggers of libraries whose INFO/WARNING lines are chatter for a user (shown with --verbosity).
_CHATTY_LOGGERS = ("jax._src.xla_bridge", "jax._src.dispatch", "orbax", "absl", "tensorflow",
                   "tensorflow_datasets", "urllib3", "etils")


# Library source folders whose absl-logged warnings are chatter too (e.g. tfds's "Variant folder ... has
# no dataset_info.json" before preparing, Orbax's "Metadata file does not exist"): only errors pass.
_CHATTY_PATHS = tuple(f"{os.sep}{name}{os.sep}" for name in ("tensorflow_datasets", "orbax", "etils"))


class _LibraryWarnings(logging.Filter):
  """Drops records below ERROR logged (through absl) from the libraries in _CHATTY_PATHS."""

  def filter(self, record):
    return record.levelno >= logging.ERROR or not any(p in (record.pathname or "") for p in _CHATTY_PATHS)


def quiet_libraries(verbose: Optional[bool] = None) -> bool:
  """Hides library chatter unless `verbose`; returns whether it is shown.

  verbose=None: shown iff absl's --verbosity flag was given on the command line (every entry point here
  is an absl app, so `--verbosity=0` brings back the INFO lines of TensorFlow, tfds, Orbax and JAX).
  Quiet means: TensorFlow's C++ start-up lines and runtime warnings (TF_CPP_MIN_LOG_LEVEL=2; effective
  only before TensorFlow is imported), absl/Python logging of the libraries above WARNING only (ERROR
  for TensorFlow's Python side), and tfds's download/extraction progress bars (see `verbose()`).
  """
  global _VERBOSE
  if verbose is None:
    verbose = _verbosity_flag_given()
  _VERBOSE = bool(verbose)
  if _VERBOSE:
    return True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # see cnn_jax/data/tf_runtime.py
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass
  for name in _CHATTY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _LibraryWarnings) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryWarnings())
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  return False


def quiet_tensorflow_startup(argv=None) -> None:
  """Sets TF_CPP_MIN_LOG_LEVEL=2 (unless already set) when `argv` (sys.argv) asks for no library output.

  Runs at `import cnn_jax`, before flags are parsed, so it reads the command line itself: --verbosity/-v
  keeps TensorFlow's start-up lines.
  """
  argv = sys.argv[1:] if argv is None else argv
  if not any(a.startswith(("--verbosity", "-v=", "--v=")) or a == "-v" for a in argv):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def verbose() -> bool:
  """True when library output is wanted (--verbosity given); e.g. whether tfds may show its bars."""
  return _VERBOSE


def _verbosity_flag_given() -> bool:
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present > 0
  except (ImportError, KeyError):
    return False


def _is_main_process() -> bool:
  """Process 0 of a multi-process run, or any process before JAX's backends start.

  Never starts the backends itself: that would happen before jax.distributed.initialize and break it.
  """
  jax = sys.modules.get("jax")
  if jax is None:
    return True
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if not xla_bridge.backends_are_initialized():
      return True
    return jax.process_index() == 0
  except Exception:  # pylint: disable=broad-except  (an older/newer JAX without that check)
    return True


def elapsed() -> str:
  """Time since the process started as 'MM:SS' (or 'H:MM:SS')."""
  s = int(time.time() - _T0)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def say(message: str) -> None:
  """Prints '[MM:SS] message' on process 0 (above a progress bar, if one is showing)."""
  if not _is_main_process():
    return
  line = f"[{elapsed()}] {message}"
  if Progress.active is not None:
    Progress.active.write(line)
  else:
    print(line, flush=True)


def warn(message: str) -> None:
  """Prints 'warning: message' on stderr, process 0 only."""
  if _is_main_process():
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- Start-up facts ------------------------------------------------------------------------------

def default_workdir(config_spec: str, root: str = "runs") -> str:
  """The workdir when --workdir is omitted: runs/<config file name>[_<config args>].

  'configs/nin.py' -> 'runs/nin', 'configs/vgg.py:quick' -> 'runs/vgg_quick', an image folder by its
  name ('...:quick,dataset=folder:/data/pets' -> 'runs/vgg_quick_dataset_pets'). The same command always
  gets the same folder, so running it again resumes (a run stopped with Ctrl-C says exactly that).
  """
  path, _, arg = config_spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] or "run"
  if arg:
    arg = re.sub(r"folder:([^,]*)", lambda m: os.path.basename(m.group(1).rstrip("/")) or "folder", arg)
    name += "_" + re.sub(r"[^A-Za-z0-9.+-]+", "_", arg).strip("_")
  return os.path.join(root, name)


def backend_line() -> str:
  """'JAX 0.10.2 on cpu: 1 device (cpu)' / '... on gpu: 8 devices (NVIDIA H200), 2 processes'."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  line = (f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} "
          f"device{'s' if len(devices) != 1 else ''} ({', '.join(kinds)})")
  if jax.process_count() > 1:
    line += f", {jax.process_count()} processes"
  return line


# Fraction of the CPU's fp32 peak the native nets reach here (README, "Performance": 75-84% measured).
_CPU_EFFICIENCY = 0.8


def _config_file(model: str) -> str:
  """The configs/ file of a model family: 'vgg11_bn' -> 'configs/vgg.py'."""
  family = next((f for f in ("alexnet", "vgg", "nin", "lenet") if model.startswith(f)), model)
  return f"configs/{family}.py"


def cpu_cost_warning(model: str, geometry: str, image_size: int, total_steps: int, step_flops: float,
                     dtype: str = "float32") -> Optional[str]:
  """On a CPU backend, the warning for a run that will take long: None elsewhere or when it is short.

  The estimate is total_steps x step_flops (XLA's count of the compiled step) at 80% of this CPU's peak
  FLOP/s (cnn_jax.perf), i.e. a lower bound: the small nets reach far less than 80%. A native-geometry
  run is always warned about (without an estimate when the peak is unknown).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from cnn_jax import perf  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return None
  peak = perf.peak_flops(jax.devices()[0], dtype)
  hours = total_steps * step_flops / (peak * _CPU_EFFICIENCY) / 3600 if peak and step_flops else None
  native = geometry == "native" and image_size > 64
  if not native and (hours is None or hours < 0.5):
    return None
  what = f"{model} at native resolution ({image_size} px)" if native else f"this {model} run"
  cost = (f"needs {total_steps * step_flops / 1e15:.1f} PFLOP: at least {hours:.1f} h on this CPU "
          f"(at 80% of its {peak / 1e9:.0f} GFLOP/s peak)" if hours is not None else "takes hours on a CPU")
  return (f"{what} on a CPU {cost}. For minutes instead of hours use the small geometry: "
          f"--config={_config_file(model)}:quick (3 epochs) or :small; native resolution wants a GPU (README, "
          "\"Quick start\")")


# --- Progress ------------------------------------------------------------------------------------

def _fmt_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(step: int, total: int, loss: float, img_per_s: float, eta_s: float,
                  extra: str = "") -> str:
  """'step 120/4680 (2.6%) loss 0.4123 | 812 img/s | ETA 5m32s' (the non-terminal progress line)."""
  return (f"step {step}/{total} ({100 * step / max(total, 1):.1f}%) loss {loss:.4f} | "
          f"{img_per_s:.0f} img/s | ETA {_fmt_duration(eta_s)}{' | ' + extra if extra else ''}")


def eval_line(step: int, epoch: float, metrics: Dict[str, Any], name: str = "eval") -> str:
  """'epoch 3 (step 1404): eval top-1 0.8421, top-5 0.9975, loss 0.4412' (name: the split)."""
  when = f"epoch {epoch:g}" if abs(epoch - round(epoch)) < 1e-6 else f"epoch {epoch:.2f}"
  return (f"{when} (step {step}): {name} top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, "
          f"loss {metrics['loss']:.4f}")


def _terminal_columns(stream) -> Optional[int]:
  """0 if `stream` is no terminal or one that reports 0 columns, its width if it reports one, None if it is a
  terminal of unknown width."""
  if not stream.isatty():
    return 0
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (OSError, ValueError, AttributeError):
    return None


class Progress:
  """The training progress of process 0: a tqdm bar on a terminal, a line per update otherwise.

  update() is called at the loop's log steps (where it fetches metrics anyway), so the bar costs no
  extra device synchronisation; evaluated() prints the eval result as its own line and keeps the latest
  one on the bar, so the last thing above "Done" is the final eval.
  """

  active: Optional["Progress"] = None  # the bar on screen, so say() can print above it

  def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream=None):
    self.total = int(total_steps)
    self.enabled = enabled and _is_main_process()
    self._stream = stream or sys.stdout
    self._bar = None
    self._t_start = time.time()
    self._first = (self._t_start, int(start_step))
    self._fields = {}
    self._eval = ""
    if not self.enabled:
      return
    width = _terminal_columns(self._stream)
    if width != 0:  # a bar; a pseudo-terminal that reports 0 columns gets one line per update, like a pipe
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=self.total, initial=int(start_step), unit="step", desc="train",
                       file=self._stream, dynamic_ncols=width is not None, ncols=100 if width is None else None,
                       smoothing=0.1, leave=True,
                       bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                  "[{elapsed}<{remaining}]{postfix}")
    Progress.active = self

  def write(self, line: str) -> None:
    """A line above the bar (or just a line)."""
    if self._bar is not None:
      self._bar.write(line, file=self._stream)
    else:
      print(line, file=self._stream, flush=True)

  def _postfix(self) -> str:
    parts = [f"loss {self._fields['loss']:.4f}", f"{self._fields['img_per_s']:.0f} img/s"] \
        if self._fields else []
    if self._eval:
      parts.append(self._eval)
    return ", ".join(parts)

  def update(self, step: int, loss: float, img_per_s: float) -> None:
    """The loop reached `step` (training loss and throughput of the last log interval)."""
    if not self.enabled:
      return
    self._fields = {"loss": loss, "img_per_s": img_per_s}
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix(), refresh=False)
      self._bar.update(step - self._bar.n)
      return
    # The average since the bar started, evals included: what the rest of the run will take.
    t_first, step_first = self._first
    eta = (self.total - step) * (time.time() - t_first) / max(step - step_first, 1)
    self.write(progress_line(step, self.total, loss, img_per_s, eta, self._eval))

  def first_step(self, metrics: Any, log_every_steps: int) -> None:
    """Waits for the first step's `metrics` and says how long it took (it includes the first transfers)."""
    if not self.enabled:
      return
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(metrics)
    seconds = time.time() - self._t_start
    apart = seconds * log_every_steps  # the first step is about as slow as any (compiled already)
    say(f"first step done in {seconds:.1f}s; progress every {log_every_steps} steps"
        + (f" (about {_fmt_duration(apart)} apart at this pace)" if apart > 30 else ""))

  def evaluating(self, what: str = "evaluating") -> None:
    """Shows that an evaluation is running (it may take a while at high resolution on a CPU)."""
    if self._bar is not None:
      self._bar.set_postfix_str(", ".join(p for p in (self._postfix(), what + " ...") if p))

  def evaluated(self, step: int, epoch: float, metrics: Dict[str, Any], name: str = "eval") -> None:
    """Prints the eval result as a line and keeps its top-1 on the bar."""
    if not self.enabled:
      return
    if name == "eval":
      self._eval = f"eval top-1 {metrics['top1']:.4f}"
    self.write(eval_line(step, epoch, metrics, name))
    if self._bar is not None:
      self._bar.set_postfix_str(self._postfix())

  def close(self) -> None:
    """Leaves the bar (with the latest numbers) on screen and ends its line."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if Progress.active is self:
      Progress.active = None
