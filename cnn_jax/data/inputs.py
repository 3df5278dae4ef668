"""The choice of input mode: `create(config, mesh)` gives a HostInput or a DeviceInput (see input_api.py).

config.input: 'host' | 'device' | 'auto' (default). auto picks device when the decoded splits it would keep
resident (train, eval, eval_train_split; this process's part) fit `config.input_memory_share` of one
device's memory (CPU: the host RAM divided among the local CPU devices), else host.
"""

import logging
from typing import Callable

from cnn_jax.data import device_input
from cnn_jax.data import input_api
from cnn_jax.errors import UserError

MODES = ("auto", "device", "host")


def _host(config, mesh, announce) -> input_api.Input:
  # TensorFlow is imported only here: a device-input run never loads it.
  from cnn_jax.data import host_input  # pylint: disable=g-import-not-at-top
  return host_input.HostInput(config, mesh, announce)


def create(config, mesh, announce: Callable[[str], None] = print) -> input_api.Input:
  """The input of `config.input` for `mesh` ('auto': device if it fits, else host); `announce` prints
  progress lines (e.g. writing the array cache)."""
  mode = config.input
  if mode not in MODES:
    raise UserError(f"--config.input={mode!r} is not one of {list(MODES)}")
  if not 0 < config.input_memory_share <= 1:
    raise UserError(f"--config.input_memory_share={config.input_memory_share} must be in (0, 1]")
  if mode == "host":
    return _host(config, mesh, announce)
  plan = device_input.plan(config, mesh)
  budget = input_api.device_memory_bytes(mesh)
  share = config.input_memory_share
  if budget is None or plan.bytes_per_device <= share * budget:
    return device_input.DeviceInput(config, mesh, plan, announce=announce)
  need = (f"{plan.describe()} needs {plan.bytes_per_device / 2**30:.2f} GiB on each device, more than "
          f"input_memory_share={share:g} of its {budget / 2**30:.1f} GiB ({share * budget / 2**30:.2f} GiB)")
  if mode == "device":
    raise UserError(f"--config.input=device: {need}; use --config.input=host (tf.data), a smaller "
                    "--config.array_cache_res or train_split, or raise --config.input_memory_share")
  logging.info("input: host (%s)", need)
  announce(f"Input: host tf.data pipeline ({need}).")
  return _host(config, mesh, announce)
