"""Model zoo: AlexNet, VGG-11/13/16/19 (+ ``_bn``), NiN and LeNet-5 as Flax linen modules.

  model = get_model('alexnet', num_classes=10, geometry='small', width=0.25)
  variables = model.init(jax.random.key(0), images)            # images: float [N, H, W, 3]
  logits = model.apply(variables, images, train=False)         # float32 [N, num_classes]
  logits, updates = model.apply(variables, images, train=True, rngs={'dropout': key},
                                mutable=['batch_stats'])

Common kwargs: ``activation``, ``dropout_rate``, ``width``, ``geometry`` ('native' | 'small'),
``dtype``; a kwarg given as None takes the family's default. What the paper fixes for an architecture is
that default: LeNet has no dropout, AlexNet and VGG drop 0.5 in the FC head, NiN 0.5 before its last
block (``architecture(name)`` lists them, with the weight init, for run records). Family kwargs: alexnet ``lrn``, ``groups``; nin ``use_1x1``, ``head``. Each family's
module docstring tables its layers and its ``small`` geometry.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple, Union

import flax.linen as nn

from cnn_jax.errors import UserError
from cnn_jax.models import layers
from cnn_jax.models.alexnet import AlexNet
from cnn_jax.models.lenet import LeNet
from cnn_jax.models.nin import NiN
from cnn_jax.models.vgg import VGG

_CONSTRUCTORS: Dict[str, Callable[..., layers.ImageClassifier]] = {
    'lenet': LeNet,
    'alexnet': AlexNet,
    **{f'vgg{depth}': functools.partial(VGG, depth=depth) for depth in (11, 13, 16, 19)},
    **{f'vgg{depth}_bn': functools.partial(VGG, depth=depth, batch_norm=True)
       for depth in (11, 13, 16, 19)},
    'nin': NiN,
}
MODELS: Tuple[str, ...] = tuple(_CONSTRUCTORS)

_NATIVE_RESOLUTION = {'lenet': 28, 'alexnet': 227, 'nin': 224}


def _check_name(name: str) -> None:
  if name not in _CONSTRUCTORS:
    raise UserError(f'Unknown model {name!r}; choose one of: {", ".join(MODELS)}.')


def model_kwargs(name: str) -> Tuple[str, ...]:
  """Keyword arguments ``get_model(name, ...)`` accepts besides ``num_classes``."""
  _check_name(name)
  constructor = _CONSTRUCTORS[name]
  fixed = set(getattr(constructor, 'keywords', {}))  # e.g. depth=16 for 'vgg16'.
  cls = getattr(constructor, 'func', constructor)
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in {'parent', 'name', 'num_classes'} | fixed)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds model ``name`` (one of ``MODELS``) with ``num_classes`` logits.

  Args:
    name: registry name, e.g. 'alexnet', 'vgg11_bn', 'nin', 'lenet'.
    num_classes: number of output logits.
    **kwargs: see ``model_kwargs(name)``, e.g. geometry='small', width=0.25, dtype=jnp.bfloat16; None
      values are dropped, so the family's (paper's) default applies.

  Returns:
    A linen module; ``apply(variables, x [N, H, W, C], train)`` gives float32 [N, num_classes].

  Raises:
    UserError: unknown name or kwarg, or a bad kwarg value.
  """
  valid = model_kwargs(name)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise UserError(f'Unknown kwarg(s) {", ".join(unknown)} for model {name!r}; valid: '
                    f'{", ".join(valid)}.')
  return _CONSTRUCTORS[name](num_classes=num_classes, **kwargs)


def architecture(name: str, **kwargs: Any) -> Dict[str, Any]:
  """Every architecture field of model ``name`` as built with ``kwargs``: the family's defaults filled in.

  {'model': name, <each ``model_kwargs(name)`` field>: value, 'init': description of the weight init}; the
  compute dtype is left out (a recipe field). JSON-friendly values; what a run records as its architecture.
  """
  model = get_model(name, num_classes=1, **{k: v for k, v in kwargs.items() if k != 'dtype'})
  out = {'model': name}
  for field in model_kwargs(name):
    if field != 'dtype':
      value = getattr(model, field)
      out[field] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
  out['init'] = model.INIT
  return out


def native_resolution(name: str) -> int:
  """Input side (px) of the paper: 227 AlexNet, 224 VGG and NiN, 28 LeNet."""
  _check_name(name)
  return _NATIVE_RESOLUTION.get(name, 224)


def min_input_size(name: str, geometry: str = 'native', **kwargs: Any) -> int:
  """Smallest square input side (px) that leaves every feature map of ``name`` >= 1 px."""
  model = get_model(name, num_classes=1, geometry=geometry, **kwargs)
  return layers.min_input_size(model.windows())


def check_input_size(name: str, size: Union[int, Tuple[int, int]], geometry: str = 'native',
                     **kwargs: Any) -> None:
  """Raises UserError naming the minimum size if ``size`` (px, or (H, W)) is too small."""
  height, width = (size, size) if isinstance(size, int) else size
  model = get_model(name, num_classes=1, geometry=geometry, **kwargs)
  layers.check_input_size(name, geometry, height, width, model.windows())
