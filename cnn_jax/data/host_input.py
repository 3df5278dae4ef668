"""Host input: the tf.data pipeline (pipeline.py) on the host CPU, global batches put on the mesh.

For data of any size. Each process reads its own part of the split (tfds.even_splits) and augments it in
tf.data threads; `make_array_from_process_local_data` assembles the global batch; two batches are kept in
flight ahead of the step (device_put is asynchronous). The batch is complete when it reaches the step:
`make_batch` is the identity.
"""

from typing import Dict, Iterator, Optional

import jax
import numpy as np

from cnn_jax import sharding as shd
from cnn_jax.data import datasets
from cnn_jax.data import input_api
from cnn_jax.data import pipeline
from cnn_jax.errors import UserError


def prefetch_to_mesh(it: Iterator[Dict[str, np.ndarray]], mesh, size: int = 2):
  """Keeps `size` global batches already transferred (device_put is asynchronous) ahead of the step."""
  queue = []
  for local in it:
    queue.append(shd.make_global_batch(local, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue


class HostInput(input_api.Input):
  """The tf.data pipeline as an `input_api.Input`."""
  mode = "host"

  def __init__(self, config, mesh, announce=lambda line: None):
    self._announce = announce
    self._config = config
    self._mesh = mesh
    self.info = datasets.get_dataset_info(config)
    if self.info.num_eval == 0:
      raise UserError(f"the eval split {config.eval_split!r} of {config.dataset} holds no examples; name a non-empty "
                      "one with --config.eval_split")
    if config.eval_train_split:  # a bad split name fails here, not at the first eval
      pipeline.num_eval_batches(config, jax.process_count(), split=config.eval_train_split)
    source = datasets.get_source(config)
    self.channels = int(source.channels)
    self.mean_std = datasets.mean_std(config, source, datasets.resolve_splits(config, source)[0])
    self.steps_per_epoch = input_api.steps_per_epoch(self.info.num_train // jax.process_count(),
                                                     config.batch_size)
    if self.steps_per_epoch == 0:
      raise UserError(f"the train split has {self.info.num_train} examples, fewer than one batch of "
                      f"{config.batch_size}; lower --config.batch_size")
    self._batches = None
    self._next_step = None

  def describe(self):
    return f"host tf.data pipeline ({self.info.name}, {jax.process_count()} process(es))"

  # --- Train ---------------------------------------------------------------------------------------

  def train_spec(self):
    return input_api.host_train_spec(self._config, self._mesh)

  def train_args(self, step: int):
    if self._batches is None:
      self._announce(f"reading the first batch ({self.info.num_train:,} training images; small datasets are "
                     "decoded into memory during the first epoch)")
      self._batches = prefetch_to_mesh(pipeline.create_train_iter(
          self._config, seed=self._config.seed, start_step=step, process_index=jax.process_index(),
          process_count=jax.process_count()), self._mesh)
      self._next_step = step
    if step != self._next_step:
      raise ValueError(f"the host input yields consecutive steps: asked for {step}, next is {self._next_step}")
    self._next_step += 1
    return next(self._batches)

  def make_batch(self, args, step):
    del step  # the pipeline drew this step's batch
    return args

  # --- Eval ----------------------------------------------------------------------------------------

  def eval_spec(self, split: Optional[str] = None):
    del split  # every eval split's batches have one shape
    return input_api.host_eval_spec(self._config, self._mesh)

  def eval_args(self, split: Optional[str] = None):
    it = pipeline.create_eval_iter(self._config, process_index=jax.process_index(),
                                   process_count=jax.process_count(), split=split)
    return prefetch_to_mesh(it, self._mesh)

  def make_eval_batch(self, args):
    return args
