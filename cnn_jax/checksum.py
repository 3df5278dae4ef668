"""Checksums of the arrays of a checkpoint: recorded at save, verified at restore.

Each array is read as unsigned 32-bit words (2- and 1-byte types widened, 8-byte types split), laid out as
rows of 1024 words (the last row may be short), and summarised by three sums modulo 2^32:

  plain = sum of all words,   rows = sum_r (2r + 1) * rowsum_r,   cols = sum_j (2j + 1) * colsum_j

A single flipped bit always changes `plain` (by a power of two, never 0 mod 2^32); words that moved change
`rows` or `cols`. Integer sums modulo 2^32 do not depend on the order of addition, so the result is the
same on any device count and the device version (one jitted reduction, used on accelerators) equals the
numpy version (used on the CPU backend, where XLA's integer reductions are slower than numpy's, and for
host arrays in prediction and fine-tuning). A guard against damaged files, not against tampering.
"""

from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_ROW = 1024
_MASK = 0xFFFFFFFF


def flat(tree: Any) -> Dict[str, Any]:
  """{'/'-joined path: leaf} with Orbax's path names (the same for a TrainState and its restored copy)."""
  return ocp.tree.to_flat_dict(tree, sep="/")


# --- numpy ---------------------------------------------------------------------------------------

def _host_words(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    x = x.view(np.uint8)
  size = x.dtype.itemsize
  if size in (4, 8):
    return x.view(np.uint32)
  return x.view(np.uint8 if size == 1 else np.uint16).astype(np.uint32)


def array_checksum(x: np.ndarray) -> List[int]:
  """[plain, rows, cols] of one host array."""
  w = _host_words(np.asarray(x))
  full = w.shape[0] // _ROW * _ROW
  body, tail = w[:full].reshape(-1, _ROW), w[full:]
  # uint64 accumulation wraps modulo 2^64, which keeps every sum right modulo 2^32.
  row_sums = np.concatenate([body.sum(axis=1, dtype=np.uint64), [tail.sum(dtype=np.uint64)]])
  col_sums = body.sum(axis=0, dtype=np.uint64)
  col_sums[:tail.shape[0]] += tail.astype(np.uint64)
  with np.errstate(over="ignore"):
    rows = np.sum(row_sums * (np.arange(row_sums.shape[0], dtype=np.uint64) * 2 + 1), dtype=np.uint64)
    cols = np.sum(col_sums * (np.arange(_ROW, dtype=np.uint64) * 2 + 1), dtype=np.uint64)
    plain = np.sum(row_sums, dtype=np.uint64)
  return [int(plain) & _MASK, int(rows) & _MASK, int(cols) & _MASK]


def host_checksums(tree: Any) -> Dict[str, List[int]]:
  """{path: [plain, rows, cols]} of every array of `tree` (numpy, or jax arrays copied to the host)."""
  return {name: array_checksum(_local_copy(x)) for name, x in flat(tree).items()}


def _local_copy(x):
  if isinstance(x, jax.Array):
    if not x.is_fully_replicated:
      raise ValueError("host checksums need fully replicated arrays")
    return np.asarray(x.addressable_data(0))  # the whole array (zero-copy on the CPU)
  return np.asarray(x)


# --- jax -----------------------------------------------------------------------------------------

def _device_words(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))


def _odd(n: int) -> jax.Array:
  return jax.lax.iota(jnp.uint32, n) * jnp.uint32(2) + jnp.uint32(1)


@jax.jit
def _device_sums(leaves: List[jax.Array]) -> jax.Array:
  out = []
  for x in leaves:
    w = _device_words(x)
    full = w.shape[0] // _ROW * _ROW
    body, tail = w[:full].reshape(-1, _ROW), w[full:]
    row_sums = jnp.concatenate([jnp.sum(body, axis=1, dtype=jnp.uint32),
                                jnp.sum(tail, dtype=jnp.uint32)[None]])
    col_sums = jnp.sum(body, axis=0, dtype=jnp.uint32).at[:tail.shape[0]].add(tail)
    out.append(jnp.stack([jnp.sum(row_sums, dtype=jnp.uint32),
                          jnp.sum(row_sums * _odd(row_sums.shape[0]), dtype=jnp.uint32),
                          jnp.sum(col_sums * _odd(_ROW), dtype=jnp.uint32)]))
  return jnp.stack(out) if out else jnp.zeros((0, 3), jnp.uint32)


def device_checksums(tree: Any) -> Dict[str, List[int]]:
  """The same as `host_checksums`, computed where the (jax) arrays live: nothing is copied to the host."""
  named = flat(tree)
  names = sorted(named)
  sums = np.asarray(jax.device_get(_device_sums([named[n] for n in names])))
  return {n: [int(v) for v in row] for n, row in zip(names, sums)}


def checksums(tree: Any) -> Dict[str, List[int]]:
  """Checksums of a train state's arrays, by the faster route: numpy on the CPU backend, else the device."""
  def on_host(x):
    return not isinstance(x, jax.Array) or (
        x.is_fully_replicated and next(iter(x.devices())).platform == "cpu")

  return host_checksums(tree) if all(map(on_host, jax.tree.leaves(tree))) else device_checksums(tree)


def mismatch(recorded: Dict[str, Any], actual: Dict[str, List[int]]) -> List[str]:
  """Paths whose checksum differs from the recorded one (arrays with no record are not judged)."""
  return sorted(n for n, sums in actual.items() if n in recorded and list(recorded[n]) != list(sums))
