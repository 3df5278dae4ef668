"""Split specs as numpy slices: the tfds slicing syntax ('train[:10%]+test') and tfds.even_splits' rule for
one process's part, without TensorFlow (the device input and the array cache use them; the host input uses
tfds itself, with the same results)."""

import re
from typing import Dict, List, Tuple

import numpy as np

from cnn_jax.errors import UserError

_SLICE = re.compile(r"^\s*([\w-]+)\s*(?:\[\s*(-?[\d.]*%?)\s*:\s*(-?[\d.]*%?)\s*\])?\s*$")


def parse_split(spec: str) -> List[Tuple[str, str, str]]:
  """'train[:10%]+test' -> [('train', '', '10%'), ('test', '', '')]; UserError if not of that form."""
  parts = []
  for part in spec.split("+"):
    match = _SLICE.match(part)
    if not match:
      raise UserError(f"split {spec!r} is not of the form name, name[a:b] or name[a%:b%] (joined by '+')")
    parts.append((match.group(1), match.group(2) or "", match.group(3) or ""))
  return parts


def _boundary(text: str, n: int, default: int) -> int:
  if not text:
    return default
  if text.endswith("%"):
    value = int(round(float(text[:-1]) * n / 100.0))  # tfds rounds percent boundaries to the closest
  else:
    value = int(text)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def split_indices(spec: str, sizes: Dict[str, int]) -> List[Tuple[str, np.ndarray]]:
  """[(base split, example indices)] selected by `spec` given the base splits' sizes."""
  out = []
  for name, lo, hi in parse_split(spec):
    if name not in sizes:
      raise UserError(f"no split {name!r}; the dataset has {sorted(sizes)}")
    n = sizes[name]
    out.append((name, np.arange(_boundary(lo, n, 0), _boundary(hi, n, n))))
  return out


def process_slice(num_examples: int, process_index: int, process_count: int,
                  drop_remainder: bool) -> Tuple[int, int]:
  """[start, end) of this process's part of `num_examples`: tfds.even_splits' rule (contiguous equal
  parts; the remainder dropped, or spread over the first processes)."""
  per = num_examples // process_count
  start, end = per * process_index, per * (process_index + 1)
  rest = num_examples % process_count
  if rest and not drop_remainder:
    start += min(process_index, rest)
    end += min(process_index + 1, rest)
  return start, end
