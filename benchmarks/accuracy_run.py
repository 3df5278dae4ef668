r"""Accuracy runs under one time budget: train.py per model, stopped at a target top-1 or when its time is up.

Each model trains with the shared recipe exactly as its config file sets it (configs/<family>.py, built on
configs/common.py); only where the data lives, the compute dtype, the input mode and anything passed with
--override change. The runs go one after the other: each gets the budget still left divided by the models
still to run (time one run does not use passes to the next). A run is stopped with SIGTERM (train.py then
finishes its step, saves and exits cleanly) as soon as an eval reaches --stop_top1, or when its share of the
budget is up. Reported per model, read back from its workdir with cnn_jax.compare.report:

  the eval curve (epoch, top-1), best and last top-1, epochs and steps run, train img/s, why it stopped,
  and for each --targets value the epoch and the seconds to reach it (`report.time_to_target`: wall time
  from the run's first metrics record, so compilation is excluded; evaluation is included)

plus whether the runs share one pipeline and recipe (`report.check_identical`, the native resolution aside).

  python benchmarks/accuracy_run.py --models=alexnet,vgg11,nin --budget_s=300 --root=/tmp/acc \
      --override=--config.input=device --override=--config.array_cache_dir=.arrays \
      --override=--config.dtype=bfloat16
"""

import json
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['alexnet', 'vgg11', 'nin'], 'Registry names, trained in this order.')
flags.DEFINE_string('root', None, 'Folder for the workdirs (<root>/<model>) and their logs.')
flags.DEFINE_string('config_args', '', 'Config args after the colon, e.g. "smoke" (empty: the recipe as is).')
flags.DEFINE_multi_string('override', [], 'A flag passed to train.py as is, e.g. --config.dtype=bfloat16.')
flags.DEFINE_float('budget_s', 300.0, 'Seconds for all the runs together.')
flags.DEFINE_float('stop_grace_s', 30.0, 'Seconds a stopped run gets to save and exit (taken from its share).')
flags.DEFINE_float('stop_top1', 0.93, 'Stop a run once an eval reaches this top-1 (<= 0: never).')
flags.DEFINE_list('targets', ['0.90', '0.93'], 'Report the epochs and seconds to each of these top-1 values.')
flags.DEFINE_float('poll_s', 1.0, 'Seconds between looks at the metrics.')
flags.DEFINE_string('json_out', None, 'Also write the results as JSON here.')

_CONFIG_FILES = {'alexnet': 'alexnet', 'nin': 'nin', 'lenet': 'lenet'}


def config_flags(model: str):
  """train.py's --config for `model` (plus --config.model for the VGG variants other than vgg11)."""
  if model.startswith('vgg'):
    path, extra = 'configs/vgg.py', ([] if model == 'vgg11' else [f'--config.model={model}'])
  elif model in _CONFIG_FILES:
    path, extra = f'configs/{_CONFIG_FILES[model]}.py', []
  else:
    raise ValueError(f'no config file for model {model!r}')
  arg = f':{FLAGS.config_args}' if FLAGS.config_args else ''
  return [f'--config={path}{arg}'] + extra


def _evals(workdir: str):
  records = []
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue  # a line being written
        if record.get('split') == 'eval':
          records.append(record)
  return records


def _stop(proc, grace_s: float) -> None:
  """SIGTERM (train.py saves and exits with status 0), then SIGKILL after `grace_s`."""
  if proc.poll() is not None:
    return
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def train_one(model: str, share_s: float):
  """Runs train.py for `model` for at most `share_s` seconds; returns (workdir, why it ended, rc, seconds)."""
  workdir = os.path.join(FLAGS.root, model)
  log_path = os.path.join(FLAGS.root, f'{model}.log')
  cmd = [sys.executable, os.path.join(REPO, 'train.py'), *config_flags(model), f'--workdir={workdir}',
         '--config.progress=False', *FLAGS.override]
  print(f'== {model}: {" ".join(cmd[1:])} (at most {share_s:.0f}s)', flush=True)
  start = time.time()
  stop_at = start + max(1.0, share_s - FLAGS.stop_grace_s)
  seen = 0
  why = 'finished'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
      while proc.poll() is None:
        time.sleep(FLAGS.poll_s)
        evals = _evals(workdir)
        for e in evals[seen:]:
          print(f'   {model} epoch {e.get("epoch", 0):6.2f}  step {e["step"]:6d}  top-1 {e["top1"]:.4f}  '
                f'({time.time() - start:5.0f}s since launch)', flush=True)
        seen = len(evals)
        if FLAGS.stop_top1 > 0 and any(e['top1'] >= FLAGS.stop_top1 for e in evals):
          why = f'reached top-1 {FLAGS.stop_top1}'
          _stop(proc, FLAGS.stop_grace_s)
        elif time.time() >= stop_at:
          why = 'time budget'
          _stop(proc, FLAGS.stop_grace_s)
    except BaseException:
      _stop(proc, 5.0)
      raise
  rc = proc.returncode
  if rc != 0 and why == 'finished':
    why = f'failed (exit status {rc})'
    with open(log_path) as f:
      tail = f.read().strip().splitlines()[-5:]
    print('\n'.join(f'   {model} | {line}' for line in tail), flush=True)
  return workdir, why, rc, time.time() - start


def summarize(workdir: str, why: str, rc: int, seconds: float, targets):
  """The result of one run, read back from its workdir (report.load_run, report.time_to_target)."""
  from cnn_jax.compare import report  # pylint: disable=g-import-not-at-top
  from cnn_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  out = {'workdir': workdir, 'stopped_because': why, 'exit_status': rc, 'seconds_since_launch': seconds}
  try:
    run = report.load_run(workdir)
  except UserError as e:
    out['error'] = str(e)
    return out, None
  evals = run.evals
  train = run.train
  info = run.run_info
  rates = [r['img_per_s'] for r in train[1:] if r.get('img_per_s')]
  out.update(
      model=run.model, image_size=info.get('image_size'), device=info.get('device_kind'),
      dtype=info.get('dtype'), input=info.get('input'), fingerprint=info.get('fingerprint'),
      steps_per_epoch=info.get('steps_per_epoch'), total_steps_planned=info.get('total_steps'),
      steps=max([r['step'] for r in train + evals], default=0),
      epochs=max([r.get('epoch', 0) for r in train + evals], default=0),
      curve=[[round(e.get('epoch', 0), 3), e['top1']] for e in evals],
      best_top1=max([e['top1'] for e in evals], default=None),
      last_top1=evals[-1]['top1'] if evals else None,
      train_img_per_s=(len(rates) / sum(1 / r for r in rates)) if rates else None,
      to_target={})
  for target in targets:
    epoch, secs = report.time_to_target(run, target)
    out['to_target'][f'{target:.2f}'] = {'epoch': epoch, 'seconds': secs}
  return out, run


def main(argv):
  del argv
  if not FLAGS.root:
    print('error: pass --root=FOLDER for the workdirs', file=sys.stderr)
    return 2
  os.makedirs(FLAGS.root, exist_ok=True)
  targets = [float(t) for t in FLAGS.targets]
  deadline = time.time() + FLAGS.budget_s
  results, runs = {}, []

  def on_term(signum, frame):
    del signum, frame
    raise SystemExit(143)  # a timeout around this script: stop the run in flight, keep what is done

  signal.signal(signal.SIGTERM, on_term)
  try:
    _run_all(targets, deadline, results, runs)
  finally:
    _write(results, runs)
  return 0


def _run_all(targets, deadline, results, runs):
  for i, model in enumerate(FLAGS.models):
    left = deadline - time.time()
    if left < 2 * FLAGS.stop_grace_s:
      results[model] = {'stopped_because': 'not started: no time left'}
      print(f'== {model}: not started, {left:.0f}s left', flush=True)
      continue
    launched = time.time()
    try:
      workdir, why, rc, seconds = train_one(model, left / (len(FLAGS.models) - i))
    except SystemExit:  # keep what the interrupted run wrote
      results[model], run = summarize(os.path.join(FLAGS.root, model), 'interrupted (SIGTERM)', None,
                                      time.time() - launched, targets)
      if run is not None:
        runs.append(run)
      raise
    results[model], run = summarize(workdir, why, rc, seconds, targets)
    if run is not None:
      runs.append(run)
    r = results[model]
    hits = ', '.join(f'{t}: ' + (f'epoch {v["epoch"]:.2f} / {v["seconds"]:.0f}s' if v['epoch'] is not None
                                 else 'not reached') for t, v in r.get('to_target', {}).items())
    best = r.get('best_top1')
    print(f'{model}: best top-1 {best if best is None else f"{best:.4f}"} after {r.get("epochs", 0):.2f} '
          f'epochs ({r.get("steps", 0)} steps), {why}, {seconds:.0f}s since launch; to target: {hits}',
          flush=True)


def _write(results, runs):
  recipe = None
  if len(runs) > 1:
    from cnn_jax.compare import report  # pylint: disable=g-import-not-at-top
    differing = report.check_identical(runs, allowed=('image_size',), allow_mismatch=True)
    recipe = {'identical': not differing, 'differing_fields': differing}
    print(f'recipe: {"one pipeline and recipe" if not differing else "DIFFERS in " + ", ".join(differing)} '
          f'across {", ".join(r.model for r in runs)} (native resolutions aside)', flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump({'budget_s': FLAGS.budget_s, 'stop_top1': FLAGS.stop_top1, 'overrides': FLAGS.override,
                 'config_args': FLAGS.config_args, 'recipe': recipe, 'models': results}, f, indent=1,
                default=str)


if __name__ == '__main__':
  sys.exit(app.run(main))
