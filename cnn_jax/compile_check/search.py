"""The largest global batch whose program fits a memory budget, found with few compiles."""

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cnn_jax.compile_check.compiling import GIB, Compile, compile_program

DEFAULT_MAX_COMPILES = 8


@dataclasses.dataclass
class Search:
  """The largest global batch that fits: `largest` fits, `largest + step` does not (or is over `limit`)."""
  largest: Optional[int]     # None: not even `step` fits
  step: int
  limit: Optional[int]       # the program's own bound on the batch (device input: the train split)
  limited: bool              # largest is the limit (or the search bound), not where memory runs out
  capped: bool               # the compile budget ran out first: largest fits, the true answer is below `upper`
  upper: Optional[int]       # the smallest batch found not to fit
  probes: List[Tuple[int, Optional[int]]]  # (batch, need or None if refused), in compile order


def round_down(value: float, step: int) -> int:
  return int(value // step) * step


class _Probes:
  """The compiles of one search: the need at every batch compiled, the probes in order, the budget's count."""

  def __init__(self, build_at: Callable[[int], Any], first: Compile, budget: int, log: Callable[[str], None]):
    self.build_at, self.budget, self.log = build_at, budget, log
    self.known: Dict[int, float] = {first.batch: first.need()}
    self.probes: List[Tuple[int, Optional[int]]] = []

  def fits(self, batch: int) -> bool:
    """Compiles the program at `batch` (one more probe); whether it fits the budget."""
    result = compile_program(self.build_at(batch))
    self.known[batch] = result.need()
    self.probes.append((batch, None if result.memory is None else int(result.need())))
    self.log(f"  batch {batch:,}: " + ("refused by XLA (out of memory)" if result.memory is None else
                                       f"{result.need() / GIB:.2f} GiB per device, "
                                       f"{'fits' if result.need() <= self.budget else 'does not fit'}") +
             f" (compile {result.compile_s:.1f}s)")
    return result.need() <= self.budget

  @property
  def count(self) -> int:
    return len(self.probes)

  def crossing(self, points: Sequence[Tuple[int, float]]) -> Optional[float]:
    """The batch where the line through the last two finite points reaches the budget (None: no line)."""
    finite = [(b, n) for b, n in points if math.isfinite(n)]
    if len(finite) < 2:
      return None
    (b0, n0), (b1, n1) = finite[-2], finite[-1]
    if b1 == b0 or n1 <= n0:
      return None
    return b0 + (self.budget - n0) * (b1 - b0) / (n1 - n0)


def search_batch(build_at: Callable[[int], Any], first: Compile, budget: int, step: int,
                 limit: Optional[int], max_compiles: int = DEFAULT_MAX_COMPILES,
                 log: Callable[[str], None] = lambda line: None) -> Search:
  """The largest multiple of `step` (<= `limit`) whose program fits `budget`, from compiles.

  build_at(batch) -> Program; `first` is the compile at the configured batch. Memory grows about linearly
  with the batch, so each probe goes where the line through the two nearest known points crosses the budget
  (clamped inside the bracket [largest fitting, smallest not fitting], halving it when the line does not help);
  it stops when the bracket is one step wide, at `limit`, or after `max_compiles` compiles.
  """
  p = _Probes(build_at, first, budget, log)
  # A configured batch that fits but is not a multiple of the step: start from the step's own multiples.
  lo = first.batch if first.need() <= budget and first.batch % step == 0 else None
  hi = first.batch if first.need() > budget else None
  bound = round_down(limit if limit is not None else step * 2**24, step)
  # 1. A bracket: a fitting batch below a failing one (or the bound).
  if lo is None and hi is None:
    start = max(step, round_down(first.batch, step))
    lo, hi = (start, None) if p.fits(start) else (None, start)
  while lo is None and p.count < max_compiles:
    if hi <= step:
      return Search(None, step, limit, False, False, hi, p.probes)
    guess = p.crossing(sorted(p.known.items()))
    if guess is None:
      n = p.known[hi]
      guess = hi * budget / n if math.isfinite(n) else hi / 2
    batch = max(step, min(round_down(guess, step), hi - step))
    lo, hi = (batch, hi) if p.fits(batch) else (lo, batch)
  while hi is None and p.count < max_compiles:
    if lo >= bound:
      return Search(lo, step, limit, True, False, None, p.probes)
    guess = p.crossing(sorted((b, n) for b, n in p.known.items() if b <= lo))
    if guess is None:
      guess = lo * budget / max(p.known[lo], 1)
    # Aim just past the line's crossing, so one probe usually brackets the answer.
    batch = min(bound, max(lo + step, round_down(guess, step) + step))
    lo, hi = (batch, hi) if p.fits(batch) else (lo, batch)
  if lo is None or hi is None:
    return Search(lo, step, limit, lo is not None and lo >= bound, True, hi, p.probes)
  # 2. Narrow the bracket to one step.
  slow = 0
  while hi - lo > step and p.count < max_compiles:
    width = hi - lo
    guess = p.crossing([(lo, p.known[lo]), (hi, p.known[hi])]) if slow < 2 else None
    batch = round_down(guess, step) if guess is not None else round_down((lo + hi) / 2, step)
    batch = min(max(batch, lo + step), hi - step)
    lo, hi = (batch, hi) if p.fits(batch) else (lo, batch)
    slow = slow + 1 if (hi - lo) > width / 2 else 0
  return Search(lo, step, limit, False, hi - lo > step, hi, p.probes)
