"""PyTorch reference nets with the same layer shapes as ``cnn_jax.models`` (benchmark-only).

Used by benchmarks/train_step.py to time the same network in PyTorch eager on the same cores. Layer
plans follow the module docstrings of cnn_jax/models/{alexnet,vgg,nin}.py; ``train_step.py`` checks
that parameter counts match the Flax model's. PyTorch is NCHW; inputs are [N, 3, H, W].

PyTorch is not a dependency of cnn_jax: install it only to run this benchmark (a CPU wheel is
enough, e.g. ``pip install torch==2.13.0+cpu`` from a local wheel).
"""

from typing import List

import torch
from torch import nn


def _channels(paper: int, width: float) -> int:
  # Same rounding as cnn_jax.models.layers.scale_width.
  return max(1, int(round(paper * width)))


def _same_pad(k: int) -> int:
  return (k - 1) // 2  # Odd kernels only, as in every net here.


def _mlp_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> List[nn.Module]:
  return [nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
          nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
          nn.Linear(hidden, num_classes)]


def _flat_size(features: nn.Module, res: int) -> int:
  with torch.no_grad():
    return int(features(torch.zeros(1, 3, res, res)).numel())


def alexnet(num_classes: int, res: int, geometry: str = 'native', width: float = 1.0,
            groups: int = 1, lrn: bool = False, dropout: float = 0.5) -> nn.Module:
  """AlexNet as cnn_jax.models.alexnet: input [N, 3, res, res] -> logits [N, num_classes]."""
  c = lambda n: _channels(n, width)
  if geometry == 'native':
    stem = nn.Conv2d(3, c(96), 11, stride=4)
  else:
    stem = nn.Conv2d(3, c(96), 3, stride=1, padding=1)
  # cnn_jax's LRN multiplies alpha by the plain sum; PyTorch's divides alpha by size.
  norm = lambda: [nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)] if lrn else []
  layers = [stem, nn.ReLU(inplace=True), *norm(), nn.MaxPool2d(3, 2),
            nn.Conv2d(c(96), c(256), 5, padding=2, groups=groups), nn.ReLU(inplace=True), *norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c(256), c(384), 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c(384), c(384), 3, padding=1, groups=groups), nn.ReLU(inplace=True),
            nn.Conv2d(c(384), c(256), 3, padding=1, groups=groups), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2)]
  features = nn.Sequential(*layers)
  head = _mlp_head(_flat_size(features, res), c(4096), num_classes, dropout)
  return nn.Sequential(features, *head)


_VGG_BLOCKS = {
    11: ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    13: ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    16: ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    19: ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}


def vgg(num_classes: int, res: int, depth: int = 11, batch_norm: bool = False,
        geometry: str = 'native', width: float = 1.0, dropout: float = 0.5) -> nn.Module:
  """VGG-``depth`` as cnn_jax.models.vgg ('small': SAME pools = ceil_mode)."""
  layers, cin = [], 3
  for num_convs, paper in _VGG_BLOCKS[depth]:
    for _ in range(num_convs):
      cout = _channels(paper, width)
      layers.append(nn.Conv2d(cin, cout, 3, padding=1))
      if batch_norm:
        layers.append(nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))
      layers.append(nn.ReLU(inplace=True))
      cin = cout
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=geometry == 'small'))
  features = nn.Sequential(*layers)
  head = _mlp_head(_flat_size(features, res), _channels(4096, width), num_classes, dropout)
  return nn.Sequential(features, *head)


def _nin_block(cin: int, cout: int, k: int, stride: int, padding: int, use_1x1: bool):
  layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.ReLU(inplace=True)]
  if use_1x1:
    layers += [nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True),
               nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True)]
  return layers


def nin(num_classes: int, res: int, geometry: str = 'native', width: float = 1.0,
        use_1x1: bool = True, dropout: float = 0.5) -> nn.Module:
  """NiN as cnn_jax.models.nin with the 'gap' head."""
  del res  # Global average pooling: any input size.
  c = lambda n: _channels(n, width)
  stem = (11, 4, 0) if geometry == 'native' else (3, 1, 1)
  layers = [*_nin_block(3, c(96), *stem, use_1x1), nn.MaxPool2d(3, 2),
            *_nin_block(c(96), c(256), 5, 1, 2, use_1x1), nn.MaxPool2d(3, 2),
            *_nin_block(c(256), c(384), 3, 1, 1, use_1x1), nn.MaxPool2d(3, 2),
            nn.Dropout(dropout),
            *_nin_block(c(384), num_classes, 3, 1, 1, use_1x1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  return nn.Sequential(*layers)


def get_model(name: str, num_classes: int, res: int, geometry: str = 'native',
              width: float = 1.0) -> nn.Module:
  """The PyTorch twin of ``cnn_jax.models.get_model(name, ...)`` for 'alexnet', 'vgg*', 'nin'."""
  if name == 'alexnet':
    return alexnet(num_classes, res, geometry, width)
  if name == 'nin':
    return nin(num_classes, res, geometry, width)
  if name.startswith('vgg'):
    depth = int(name[3:].replace('_bn', ''))
    return vgg(num_classes, res, depth, name.endswith('_bn'), geometry, width)
  raise ValueError(f'No PyTorch twin for model {name!r}; have alexnet, vgg*, nin.')


def num_params(model: nn.Module) -> int:
  """Number of trainable parameters."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)
