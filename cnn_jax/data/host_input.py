"""Host input: the tf.data pipeline (pipeline.py) on the host CPU, global batches put on the mesh.

For data of any size. Each process reads its own part of the split (tfds.even_splits) and augments it in
tf.data threads; `make_array_from_process_local_data` assembles the global batch; two batches are kept
in flight ahead of the step (device_put is asynchronous).
"""

from typing import Dict, Iterator, Optional

import jax
import numpy as np

from cnn_jax import sharding as shd
from cnn_jax.data import inputs
from cnn_jax.errors import UserError


def _data_lib():
  # Looked up at call time, so tests can stand in for the pipeline's entry points (monkeypatch).
  from cnn_jax import data  # pylint: disable=g-import-not-at-top
  return data


def prefetch_to_mesh(it: Iterator[Dict[str, np.ndarray]], mesh, size: int = 2):
  """Keeps `size` global batches already transferred (device_put is asynchronous) ahead of the step."""
  queue = []
  for local in it:
    queue.append(shd.make_global_batch(local, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


class _HostTrainStep(inputs.TrainStep):

  def __init__(self, compiled, batches, first, batch_spec):
    self.compiled = compiled
    self.batch_spec = batch_spec
    self._batches = batches
    self._next = first

  def prepare(self, step):
    del step  # the iterator was started at the first step and yields in order
    if self._next is None:
      self._next = next(self._batches)

  def __call__(self, state, step):
    self.prepare(step)
    batch, self._next = self._next, None
    return self.compiled(state, batch)


class HostInput(inputs.Input):
  """The tf.data pipeline as an `inputs.Input`."""
  mode = "host"

  def __init__(self, config, mesh, compiler_options=None, announce=lambda line: None):
    data = _data_lib()
    self._announce = announce
    self._config = config
    self._compiler_options = compiler_options
    self._mesh = mesh
    self.info = data.get_dataset_info(config)
    n_proc = jax.process_count()
    if config.get("eval_train_split"):  # a bad split name fails here, not at the first eval
      data.num_eval_batches(config, n_proc, split=config.eval_train_split)
    from cnn_jax.data import datasets  # pylint: disable=g-import-not-at-top
    source = datasets.get_source(config)
    self.channels = int(source.channels)
    self.mean_std = datasets.mean_std(config, source, datasets.resolve_splits(config, source)[0])
    self.steps_per_epoch = (self.info.num_train // n_proc) // (config.batch_size // n_proc)
    if self.steps_per_epoch == 0:
      raise UserError(f"the train split has {self.info.num_train} examples, fewer than one batch of "
                      f"{config.batch_size}; lower --config.batch_size")
    self._replicated = shd.replicated(mesh)
    self._batch_sharding = shd.batch_sharded(mesh)
    self._eval_fns = {}

  def describe(self):
    return f"host tf.data pipeline ({self.info.name}, {jax.process_count()} process(es))"

  def train_step(self, step_fn, state, start_step):
    data = _data_lib()
    batches = prefetch_to_mesh(data.create_train_iter(
        self._config, seed=self._config.seed, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count()), self._mesh)
    self._announce(f"reading the first batch ({self.info.num_train:,} training images; small datasets are "
                   "decoded into memory during the first epoch)")
    first = next(batches)
    jitted = jax.jit(step_fn, in_shardings=(self._replicated, self._batch_sharding),
                     out_shardings=(self._replicated, self._replicated), donate_argnums=(0,),
                     compiler_options=self._compiler_options)
    compiled = jitted.lower(state, first).compile()
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in first.items()}
    return _HostTrainStep(compiled, batches, first, spec)

  def evaluate(self, eval_fn, state, split: Optional[str] = None):
    key = id(eval_fn)
    if key not in self._eval_fns:
      self._eval_fns[key] = jax.jit(eval_fn, in_shardings=(self._replicated, self._batch_sharding),
                                    out_shardings=self._replicated, compiler_options=self._compiler_options)
    jitted = self._eval_fns[key]
    totals = None
    it = _data_lib().create_eval_iter(self._config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), split=split)
    for batch in prefetch_to_mesh(it, self._mesh):
      sums = jitted(state, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return inputs.finish_eval(totals)
