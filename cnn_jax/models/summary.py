"""Per-layer summary of a model: output shapes, params, FLOPs (XLA cost analysis) and params bytes.

  python -m cnn_jax.models.summary --model=alexnet --image_size=227 --num_classes=1000
  python -m cnn_jax.models.summary --model=vgg11 --image_size=32 --num_classes=10 \
      --geometry=small --width=0.25

Shapes come from ``jax.eval_shape`` (nothing is allocated, so a 140M-param VGG is cheap); FLOPs from
compiling one forward pass, as XLA counts them: a multiply-add is 2 FLOPs, and conv taps that
fall on SAME padding are not counted (so slightly below the textbook 2 * MACs).
"""

import sys
from typing import Any, Dict, List, Mapping, Tuple

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import models
from cnn_jax.errors import UserError


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of parameters: of ``variables['params']`` if present, else of every leaf.

  Leaves may be arrays or ``jax.ShapeDtypeStruct``s (e.g. from ``jax.eval_shape``).
  """
  params = variables['params'] if 'params' in variables else variables
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _example_input(image_size: int, channels: int, batch_size: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch_size, image_size, image_size, channels), jnp.float32)


def flops_per_example(model: nn.Module, variables: Mapping[str, Any], image_size: int,
                      train: bool = False, channels: int = 3) -> float:
  """FLOPs of one forward pass per image of ``image_size`` x ``image_size`` x ``channels`` px.

  Counted by XLA's cost analysis of the forward lowered for the host CPU at batch size 1 (a multiply-add is 2
  FLOPs), without compiling it: for the inference forward the count equals that of the compiled module for
  every family (LeNet, NiN, VGG-11/16-BN, AlexNet; checked when this changed) and costs 0.1-0.3 s instead of a
  0.8-0.9 s compile, once per run. ``train=True`` counts the training-mode forward (dropout, batch statistics),
  not the backward pass; there XLA's optimisation changes the dropout's elementwise ops, so the lowered count
  differs from a compiled one by < 0.5%. ``variables`` may hold arrays or ``jax.ShapeDtypeStruct``s.
  """

  def forward(variables, images):
    if train:
      return model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(0)},
                         mutable=['batch_stats'])
    return model.apply(variables, images, train=False)

  # Counted on the host CPU: accelerator cost analyses report cuDNN convolutions as 0 FLOPs.
  from cnn_jax import perf  # pylint: disable=g-import-not-at-top
  return perf.host_cpu_flops(jax.jit(forward), variables, _example_input(image_size, channels), compile=False)


def _trace_layers(model: nn.Module, image_size: int,
                  channels: int) -> Tuple[Dict[str, Any], List[Tuple[Tuple[str, ...], Any]]]:
  """Shapes of ``model``'s variables and (module path, output) of every submodule in call order.

  Runs ``init`` under ``jax.eval_shape`` with a method interceptor; the interceptor records calls
  in Python, which keeps the call order that the (key-sorted) pytrees of ``capture_intermediates``
  lose.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name != '__call__' or not context.module.path:
      return next_fun(*args, **kwargs)
    index = len(calls)
    calls.append(None)  # Reserve the slot so a parent is listed before its children.
    output = next_fun(*args, **kwargs)
    calls[index] = (tuple(context.module.path), jax.ShapeDtypeStruct(output.shape, output.dtype))
    return output

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                               _example_input(image_size, channels))
  return variables, calls


def _own_params(params: Mapping[str, Any], path: Tuple[str, ...]) -> int:
  """Parameters held directly by the module at ``path`` (not by its submodules)."""
  for name in path:
    params = params.get(name, {})
  return sum(int(np.prod(leaf.shape)) for leaf in params.values() if not isinstance(leaf, Mapping))


def _megabytes(num_params: int, bytes_per_param: int) -> str:
  return f'{num_params * bytes_per_param / 2**20:,.1f} MiB'


def summarize(name: str, num_classes: int, image_size: int, channels: int = 3,
              **kwargs: Any) -> str:
  """A plain-text table of model ``name`` on ``image_size`` px inputs.

  One row per module (path, output shape for batch 1, own params), then total params, params bytes
  in float32 and bfloat16, and forward GFLOPs per image from XLA. ``kwargs`` go to
  ``models.get_model`` (e.g. geometry='small', width=0.25).
  """
  model = models.get_model(name, num_classes, **kwargs)
  models.check_input_size(name, image_size, **kwargs)
  variables, calls = _trace_layers(model, image_size, channels)
  rows = [('/'.join(path), 'x'.join(str(d) for d in output.shape),
           _own_params(variables['params'], path)) for path, output in calls]
  num_params = count_params(variables)
  flops = flops_per_example(model, variables, image_size, channels=channels)

  path_width = max(len('layer'), *(len(path) for path, _, _ in rows))
  shape_width = max(len('output'), *(len(shape) for _, shape, _ in rows))
  settings = ', '.join(f'{k}={v}' for k, v in kwargs.items())
  lines = [f'{name}({settings}) on 1x{image_size}x{image_size}x{channels}, '
           f'{num_classes} classes',
           f'{"layer":<{path_width}}  {"output":>{shape_width}}  {"params":>12}']
  lines.append('-' * len(lines[-1]))
  for path, shape, own in rows:
    lines.append(f'{path:<{path_width}}  {shape:>{shape_width}}  {own:>12,}')
  lines.append('-' * len(lines[-1]))
  lines.append(f'total params: {num_params:,} ({_megabytes(num_params, 4)} float32, '
               f'{_megabytes(num_params, 2)} bfloat16)')
  lines.append(f'forward FLOPs/image (XLA): {flops / 1e9:.4g} GFLOPs')
  return '\n'.join(lines)


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module (e.g. from the train loop, which
  # has its own flags) adds nothing to absl's global flags.
  flags.DEFINE_enum('model', 'alexnet', models.MODELS, 'Model name.')
  flags.DEFINE_integer('image_size', None, 'Input side in px (default: the native resolution).')
  flags.DEFINE_alias('res', 'image_size')
  flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
  flags.DEFINE_integer('channels', 3, 'Input channels.')
  flags.DEFINE_enum('geometry', 'native', ['native', 'small'], 'Stem/pool geometry.')
  flags.DEFINE_float('width', 1.0, 'Channel multiplier of convs and hidden FC layers.')


def main(argv):
  del argv
  from cnn_jax import console  # pylint: disable=g-import-not-at-top
  console.quiet_libraries()  # JAX's backend-probing INFO lines only with --verbosity
  config = flags.FLAGS
  image_size = config.image_size or models.native_resolution(config.model)
  try:
    print(summarize(config.model, config.num_classes, image_size, channels=config.channels,
                    geometry=config.geometry, width=config.width))
  except UserError as err:
    sys.exit(f'error: {err}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
