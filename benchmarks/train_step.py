r"""Train-step throughput: cnn_jax ops impls side by side, and the same net in PyTorch eager.

For each model: an optax SGD(momentum 0.9) + weight decay train step under ``jax.jit`` with donated
state, once per ``cnn_jax.ops`` impl (--impls; 'cpu' = CPU-tuned kernels, 'xla' = plain XLA), and,
when torch is importable, the PyTorch twin (benchmarks/torch_models.py) with torch.optim.SGD. The
variants run interleaved (one step of each in turn), so load from other processes hits all alike;
img/s is from the median step time after --warmup steps ('best' from the fastest step: on a shared
machine the closest to an unloaded one). Ratios compare medians.

FLOPs per step come from XLA's cost analysis of the plain-XLA step (the network's own FLOPs; the
tuned kernels compute a few more, e.g. the zero taps of a space-to-depth stem), so FLOP/s and MFU
(vs ``cnn_jax.perf.peak_flops``) are comparable across variants.

  python benchmarks/train_step.py                                  # alexnet 227, vgg11 224, nin 224
  python benchmarks/train_step.py --models=alexnet,nin --res=32 --geometry=small
  python benchmarks/train_step.py --dtype=bfloat16 --batch=256 --torch=false   # on a GPU
"""

import os
import statistics
import sys
import time

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
flags.DEFINE_integer('steps', 3, 'Timed steps per variant (median reported).')
flags.DEFINE_integer('warmup', 1, 'Untimed steps per variant after compilation.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (params stay fp32).')
flags.DEFINE_list('impls', ['auto', 'xla'],
                  'Variants to compare: a cnn_jax.ops impl (auto, cpu, xla), jitted with '
                  'ops.compiler_options() (none for xla); suffix "+noynn" forces the XLA:CPU '
                  'option xla_cpu_experimental_ynn_fusion_type="", "+ynn" forces no options.')
flags.DEFINE_boolean('torch', True, 'Also time the PyTorch eager twin when torch is importable.')
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
      self.flops = perf.compiled_flops(jitted, self.state, self.batch, self.rng)
      self.compiled = jitted.lower(self.state, self.batch, self.rng).compile()

  def step(self):
    start = time.perf_counter()
    self.state, loss = self.compiled(self.state, self.batch, self.rng)
    loss.block_until_ready()
    return time.perf_counter() - start


class TorchVariant:
  """The PyTorch eager twin: SGD(momentum 0.9, weight decay 5e-4) step, timed per call."""

  def __init__(self, name, res, batch_np, dtype):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_models  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    self.label = f'torch {torch.__version__}'
    self.model = torch_models.get_model(name, FLAGS.num_classes, res, FLAGS.geometry, FLAGS.width)
    self.num_params = torch_models.num_params(self.model)
    self.model.train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    self.images = torch.from_numpy(np.ascontiguousarray(batch_np['image'].transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(batch_np['label'].astype(np.int64))
    self.loss_fn = torch.nn.CrossEntropyLoss()
    self.autocast = dtype == jnp.bfloat16

  def step(self):
    start = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    with self.torch.autocast('cpu', dtype=self.torch.bfloat16, enabled=self.autocast):
      loss = self.loss_fn(self.model(self.images), self.labels)
    loss.backward()
    self.opt.step()
    return time.perf_counter() - start


def _torch_available():
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def bench_model(name):
  """Times every variant of ``name``, interleaved; prints one table row per variant."""
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
  if FLAGS.torch and jax.default_backend() == 'cpu' and _torch_available():
    twin = TorchVariant(name, res, batch_np, dtype)
    if twin.num_params != variants[0].num_params:
      print(f'  WARNING: torch twin has {twin.num_params:,} params, jax {variants[0].num_params:,}')
    variants.append(twin)

  times = {v.label: [] for v in variants}
  for i in range(FLAGS.warmup + FLAGS.steps):
    for v in variants:
      t = v.step()
      if i >= FLAGS.warmup:
        times[v.label].append(t)

  devices = jax.devices()[:1]
  medians = {k: statistics.median(ts) for k, ts in times.items()}
  ref = {k: medians[k] for k in medians if k.startswith('torch') or k == 'jax[xla]'}
  ref_best = {k: min(times[k]) for k in ref}
  print(f'{name} {res}px {FLAGS.geometry} {FLAGS.dtype} batch {FLAGS.batch} on '
        f'{devices[0].device_kind} ({jax.default_backend()}); {useful_flops / 1e9:.1f} GFLOP/step '
        f'(XLA cost analysis); peak {(perf.peak_flops(devices[0], dtype) or 0) / 1e9:.0f} GFLOP/s')
  for label, t in medians.items():
    util = perf.mfu(useful_flops, t, devices, dtype)
    ratios = ' '.join(f'{t_ref / t:.2f}x (best {ref_best[k] / min(times[label]):.2f}x) vs {k}'
                      for k, t_ref in ref.items() if k != label)
    best = min(times[label])
    mfu_str = f'{util * 100:5.1f}%' if util is not None else '   n/a'
    print(f'  {label:16s} {FLAGS.batch / t:8.1f} img/s (best {FLAGS.batch / best:8.1f})  '
          f'{t * 1e3:8.1f} ms/step  {useful_flops / t / 1e9:8.1f} GFLOP/s  MFU {mfu_str}  {ratios}',
          flush=True)


def main(argv):
  del argv
  for name in FLAGS.models:
    bench_model(name)


if __name__ == '__main__':
  app.run(main)
