r"""Train-step throughput: cnn_jax ops impls side by side, and the same net in PyTorch (CPU or CUDA).

For each model: an optax SGD(momentum 0.9) + weight decay train step under ``jax.jit`` with donated
state, once per ``cnn_jax.ops`` impl (--impls; 'cpu' = CPU-tuned kernels, 'xla' = plain XLA), and,
when torch is importable, the PyTorch twin (benchmarks/torch_models.py) with torch.optim.SGD on the same
batch. The variants run interleaved (--block steps of each in turn, each block timed to completion), so
load from other processes hits all alike; img/s is from the median block after --warmup blocks ('best'
from the fastest: on a shared machine the closest to an unloaded one). Ratios compare medians.

PyTorch runs where JAX runs: on the CPU (eager by default, CPU autocast for bf16) or, when JAX's backend
is a GPU, on CUDA in its best ordinary configuration: bf16 autocast, channels_last model and input,
``cudnn.benchmark``, TF32 matmuls, fused SGD, and ``torch.compile`` (--torch_compile; compilation gets
--torch_compile_budget_s seconds, else the run falls back to eager and says so). CUDA timings synchronise
the device around each block.

FLOPs per step come from XLA's cost analysis of the plain-XLA step (the network's own FLOPs; the
tuned kernels compute a few more, e.g. the zero taps of a space-to-depth stem; on a GPU counted on the
host CPU), so FLOP/s and MFU (vs ``cnn_jax.perf.peak_flops``) are comparable across variants.

  python benchmarks/train_step.py                                  # alexnet 227, vgg11 224, nin 224
  python benchmarks/train_step.py --models=alexnet,nin --res=32 --geometry=small
  python benchmarks/train_step.py --dtype=bfloat16 --batch=256 --impls=auto --block=5 --steps=6  # on a GPU
  python benchmarks/train_step.py ... --profile_steps=3   # + where our step's time goes (profile_step.py)
"""

import json
import os
import signal
import statistics
import sys
import tempfile
import time

# JAX takes 75% of a GPU's memory at start-up by default; leave room for the PyTorch twin in this process.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cnn_jax import models  # pylint: disable=g-import-not-at-top
from cnn_jax import ops
from cnn_jax import perf

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['alexnet', 'vgg11', 'nin'], 'Registry names to benchmark.')
flags.DEFINE_integer('batch', 32, 'Batch size.')
flags.DEFINE_integer('res', 0, 'Input side in px; 0 = the model\'s native resolution.')
flags.DEFINE_enum('geometry', 'native', ['native', 'small'], 'Model geometry.')
flags.DEFINE_integer('steps', 3, 'Timed blocks per variant (median reported).')
flags.DEFINE_integer('warmup', 1, 'Untimed blocks per variant after compilation.')
flags.DEFINE_integer('block', 1, 'Steps per timed block (dispatched back to back, then one sync): >1 lets a '
                     'GPU queue steps ahead as a training loop does.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (params stay fp32).')
flags.DEFINE_list('impls', ['auto', 'xla'],
                  'Variants to compare: a cnn_jax.ops impl (auto, cpu, xla), jitted with '
                  'ops.compiler_options() (none for xla); suffix "+noynn" forces the XLA:CPU '
                  'option xla_cpu_experimental_ynn_fusion_type="", "+ynn" forces no options.')
flags.DEFINE_boolean('torch', True, 'Also time the PyTorch twin when torch is importable.')
flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'on', 'off'],
                  'torch.compile the twin: auto = on CUDA only (the CPU comparison stays eager).')
flags.DEFINE_float('torch_compile_budget_s', 180.0,
                   'Seconds torch.compile (and its first steps) may take before falling back to eager.')
flags.DEFINE_integer('profile_steps', 0, 'If > 0, also trace this many steps of each JAX variant and print '
                     'where the time goes (benchmarks/profile_step.py).')
flags.DEFINE_string('trace_dir', None, 'Where --profile_steps keeps its traces (default: a temp dir).')
flags.DEFINE_string('json_out', None, 'Also write the results as JSON here.')
flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
flags.DEFINE_float('width', 1.0, 'Channel width multiplier.')


def make_train_step(model, tx):
  """Returns train_step(state, batch, rng) -> (state, loss); state = (params, batch_stats, opt)."""

  def train_step(state, batch, rng):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': batch_stats}
      logits, updates = model.apply(variables, batch['image'], train=True,
                                    rngs={'dropout': rng}, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return loss, updates.get('batch_stats', batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, batch_stats, opt_state), loss

  return train_step


class JaxVariant:
  """One model + ops impl: compiled step, its state, and ``step()`` timing one call (seconds)."""

  def __init__(self, name, variant, batch_np, dtype):
    self.label = f'jax[{variant}]'
    impl, _, extra = variant.partition('+')
    if extra == 'noynn':
      options = {'xla_cpu_experimental_ynn_fusion_type': ''}
    elif extra == 'ynn':
      options = None
    else:
      with ops.impl(impl):
        options = ops.compiler_options() or None
    model = models.get_model(name, FLAGS.num_classes, geometry=FLAGS.geometry, width=FLAGS.width,
                             dtype=dtype)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    self.batch = jax.tree.map(jnp.asarray, batch_np)
    variables = model.init(jax.random.key(0), self.batch['image'][:1], train=False)
    params = variables['params']
    self.num_params = sum(p.size for p in jax.tree.leaves(params))
    self.state = (params, variables.get('batch_stats', {}), tx.init(params))
    self.rng = jax.random.key(1)
    jitted = jax.jit(make_train_step(model, tx), donate_argnums=0, compiler_options=options)
    with ops.impl(impl):  # The impl is read at trace time.
      self.compiled = jitted.lower(self.state, self.batch, self.rng).compile()
      # One compilation for both: FLOPs from its cost analysis (off the CPU also counted on the host CPU).
      self.flops = perf.step_flops(self.compiled, 1, jitted, self.state, self.batch, self.rng)

  def run(self, n):
    """Runs ``n`` steps back to back, then waits for them; returns the seconds taken."""
    start = time.perf_counter()
    for _ in range(n):
      self.state, loss = self.compiled(self.state, self.batch, self.rng)
    loss.block_until_ready()
    return time.perf_counter() - start


class _CompileTimeout(BaseException):
  """Raised by SIGALRM inside torch.compile's first steps (a BaseException: compilers catch Exception)."""


class TorchVariant:
  """The PyTorch twin: SGD(momentum 0.9, weight decay 5e-4) step on the CPU or on CUDA.

  On CUDA: bf16 autocast (when --dtype=bfloat16), channels_last model and input, cuDNN benchmark mode,
  TF32 matmuls (XLA's default float32 precision on GPUs), fused SGD, and torch.compile when asked and done
  within the budget. ``mode`` says what ran ('compiled' or 'eager'), ``note`` why.
  """

  def __init__(self, name, res, batch_np, dtype, device):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_models  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = torch.device(device)
    self.cuda = self.device.type == 'cuda'
    if self.cuda:
      torch.backends.cudnn.benchmark = True
      torch.set_float32_matmul_precision('high')
    else:
      torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = torch_models.get_model(name, FLAGS.num_classes, res, FLAGS.geometry, FLAGS.width)
    self.num_params = torch_models.num_params(model)
    model = model.to(self.device)
    images = torch.from_numpy(np.ascontiguousarray(batch_np['image'].transpose(0, 3, 1, 2))).to(self.device)
    if self.cuda:
      model = model.to(memory_format=torch.channels_last)
      images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    self.model, self.images = model, images
    self.labels = torch.from_numpy(batch_np['label'].astype(np.int64)).to(self.device)
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
    try:
      self.opt = torch.optim.SGD(model.parameters(), fused=True, **sgd) if self.cuda else None
    except (TypeError, RuntimeError):  # an older torch without fused SGD
      self.opt = None
    self.opt = self.opt or torch.optim.SGD(model.parameters(), **sgd)
    self.loss_fn = torch.nn.CrossEntropyLoss()
    self.autocast = dtype == jnp.bfloat16
    self.forward = model
    self.mode, self.note, self.compile_s = 'eager', '', None
    compile_flag = FLAGS.torch_compile
    if compile_flag == 'on' or (compile_flag == 'auto' and self.cuda):
      self._compile(FLAGS.torch_compile_budget_s)
    self.label = f'torch {torch.__version__.split("+")[0]} {self.mode}'

  def _compile(self, budget_s):
    """torch.compile the model and run its first steps (where compilation happens) within ``budget_s``;
    on failure or timeout the eager model stays and ``note`` says why."""
    torch = self.torch

    def on_alarm(signum, frame):
      del signum, frame
      raise _CompileTimeout()

    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
      self.forward = torch.compile(self.model)
      self.run(2)  # forward and backward graphs compile in the first step; the second checks recompiles
      self.mode = 'compiled'
      self.note = f'torch.compile took {time.perf_counter() - start:.0f}s'
    except _CompileTimeout:
      self.note = f'torch.compile exceeded its {budget_s:.0f}s budget: eager'
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [''])[0][:200]
      self.note = f'torch.compile failed ({type(e).__name__}: {first}): eager'
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, old)
    self.compile_s = time.perf_counter() - start
    if self.mode != 'compiled':
      self.forward = self.model
      try:  # drop the half-built graphs, and stop compile workers that would compete with the timing
        torch._dynamo.reset()  # pylint: disable=protected-access
        from torch._inductor import async_compile  # pylint: disable=g-import-not-at-top
        async_compile.shutdown_compile_workers()
      except Exception:  # pylint: disable=broad-except
        pass
      self.opt.zero_grad(set_to_none=True)

  def _step(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      loss = self.loss_fn(self.forward(self.images), self.labels)
    loss.backward()
    self.opt.step()

  def run(self, n):
    """Runs ``n`` steps back to back, then waits for the device; returns the seconds taken."""
    if self.cuda:
      self.torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
      self._step()
    if self.cuda:
      self.torch.cuda.synchronize()
    return time.perf_counter() - start


def _torch_device():
  """The device for the PyTorch twin ('cpu' / 'cuda'), or (None, why not)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, 'torch is not installed'
  backend = jax.default_backend()
  if backend == 'cpu':
    return 'cpu', ''
  if backend == 'gpu' and torch.cuda.is_available():
    return 'cuda', ''
  return None, f'JAX runs on {backend} and torch {torch.__version__} has no device there'


def bench_model(name):
  """Times every variant of ``name``, interleaved; prints one table row per variant; returns a result dict."""
  res = FLAGS.res or models.native_resolution(name)
  dtype = jnp.dtype(FLAGS.dtype)
  rng = np.random.default_rng(0)
  batch_np = {'image': rng.standard_normal((FLAGS.batch, res, res, 3), dtype=np.float32),
              'label': rng.integers(0, FLAGS.num_classes, FLAGS.batch).astype(np.int32)}
  variants = []
  for impl in FLAGS.impls:
    start = time.perf_counter()
    variants.append(JaxVariant(name, impl, batch_np, dtype))
    print(f'  compiled {name} jax[{impl}] in {time.perf_counter() - start:.1f}s', flush=True)
  useful_flops = next((v.flops for v in variants if v.label == 'jax[xla]'), variants[0].flops)
  twin = None
  if FLAGS.torch:
    device, why_not = _torch_device()
    if device is None:
      print(f'  no PyTorch twin: {why_not}', flush=True)
    else:
      start = time.perf_counter()
      twin = TorchVariant(name, res, batch_np, dtype, device)
      print(f'  built {name} {twin.label} on {device} in {time.perf_counter() - start:.1f}s'
            f'{"; " + twin.note if twin.note else ""}', flush=True)
      if twin.num_params != variants[0].num_params:
        print(f'  WARNING: torch twin has {twin.num_params:,} params, jax {variants[0].num_params:,}')
      variants.append(twin)

  times = {v.label: [] for v in variants}
  for i in range(FLAGS.warmup + FLAGS.steps):
    for v in variants:
      t = v.run(FLAGS.block) / FLAGS.block
      if i >= FLAGS.warmup:
        times[v.label].append(t)

  devices = jax.devices()[:1]
  medians = {k: statistics.median(ts) for k, ts in times.items()}
  ref = {k: medians[k] for k in medians if k.startswith('torch') or k == 'jax[xla]'}
  ref_best = {k: min(times[k]) for k in ref}
  print(f'{name} {res}px {FLAGS.geometry} {FLAGS.dtype} batch {FLAGS.batch} on '
        f'{devices[0].device_kind} ({jax.default_backend()}); {useful_flops / 1e9:.1f} GFLOP/step '
        f'(XLA cost analysis); peak {(perf.peak_flops(devices[0], dtype) or 0) / 1e9:.0f} GFLOP/s; '
        f'{FLAGS.steps} blocks of {FLAGS.block} step(s)')
  result = {'model': name, 'res': res, 'geometry': FLAGS.geometry, 'width': FLAGS.width,
            'batch': FLAGS.batch, 'dtype': FLAGS.dtype, 'flops_per_step': useful_flops, 'variants': {}}
  for label, t in medians.items():
    util = perf.mfu(useful_flops, t, devices, dtype)
    ratios = ' '.join(f'{t_ref / t:.2f}x (best {ref_best[k] / min(times[label]):.2f}x) vs {k}'
                      for k, t_ref in ref.items() if k != label)
    best = min(times[label])
    mfu_str = f'{util * 100:5.1f}%' if util is not None else '   n/a'
    print(f'  {label:22s} {FLAGS.batch / t:8.1f} img/s (best {FLAGS.batch / best:8.1f})  '
          f'{t * 1e3:8.1f} ms/step  {useful_flops / t / 1e9:8.1f} GFLOP/s  MFU {mfu_str}  {ratios}',
          flush=True)
    result['variants'][label] = {'img_per_s': FLAGS.batch / t, 'best_img_per_s': FLAGS.batch / best,
                                 'ms_per_step': t * 1e3, 'mfu': util}
  ours = variants[0].label
  if twin is not None:
    ratio = medians[twin.label] / medians[ours]
    result.update(torch={'label': twin.label, 'device': str(twin.device), 'mode': twin.mode,
                         'note': twin.note, 'compile_s': twin.compile_s},
                  ours_over_torch=ratio)
    print(f'  {name}: ours/PyTorch = {ratio:.2f}x ({ours} {FLAGS.batch / medians[ours]:.0f} img/s vs '
          f'{twin.label} {FLAGS.batch / medians[twin.label]:.0f} img/s, same batch of {FLAGS.batch})',
          flush=True)
  if FLAGS.profile_steps > 0:
    import profile_step  # pylint: disable=g-import-not-at-top
    result['profile'] = {}
    for v in variants:
      if not isinstance(v, JaxVariant):
        continue
      trace_dir = (os.path.join(FLAGS.trace_dir, f'{name}_{v.label}'.replace('[', '_').replace(']', ''))
                   if FLAGS.trace_dir else tempfile.mkdtemp(prefix=f'cnn_jax_profile_{name}_'))
      try:  # the timings above stand even where the profiler cannot run
        prof = profile_step.profile(v.compiled, v.run, FLAGS.profile_steps, trace_dir)
      except Exception as e:  # pylint: disable=broad-except
        print(f'  profile of {name} {v.label} failed: {type(e).__name__}: {e}', flush=True)
        continue
      print(f'  profile of {name} {v.label} ({FLAGS.profile_steps} steps, ops from {prof["source"]}):',
            flush=True)
      print(profile_step.format_breakdown(prof, 12), flush=True)
      result['profile'][v.label] = {**prof, 'ops': prof['ops'][:30]}
  return result


def main(argv):
  del argv
  results = []
  for name in FLAGS.models:
    results.append(bench_model(name))
    if FLAGS.json_out:  # after each model, so a run stopped by a time limit keeps the finished ones
      device = jax.devices()[0]
      with open(FLAGS.json_out + '.tmp', 'w') as f:
        json.dump({'device': device.device_kind, 'backend': jax.default_backend(), 'block': FLAGS.block,
                   'steps': FLAGS.steps, 'impls': FLAGS.impls, 'rows': results}, f, indent=1, default=str)
      os.replace(FLAGS.json_out + '.tmp', FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
