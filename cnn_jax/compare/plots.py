"""PNG plots of a comparison: the eval curves, and accuracy against parameters and against FLOPs."""

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top


def _colours(labels: Sequence[str]) -> Dict[str, Any]:
  """One colour per architecture label, so the seeds of one architecture share it."""
  cmap = plt.get_cmap("tab10")
  return {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(labels))}


def plot_curves(runs, labels: Mapping[str, str], path: str) -> Optional[str]:
  """Test top-1 vs epoch for every run (metrics.jsonl eval records); seeds of one architecture share a colour.

  Returns None (no file) when no run has an eval yet; runs without one are named in a note on the plot.
  """
  if not any(r.evals for r in runs):
    return None
  colours = _colours([labels[r.name] for r in runs])
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  seen = set()
  for r in runs:
    if not r.evals:
      continue
    label = labels[r.name]
    epochs = [e.get("epoch", e["step"]) for e in r.evals]
    ax.plot(epochs, [e["top1"] for e in r.evals], marker="o", ms=3, lw=1.2, color=colours[label],
            label=None if label in seen else label)
    seen.add(label)
  ax.set_xlabel("epoch")
  ax.set_ylabel("test top-1")
  ax.set_title("Test top-1 during training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  without = [r.name for r in runs if not r.evals]
  if without:
    ax.text(0.01, 0.99, f"no eval yet: {', '.join(without[:4])}{' ...' if len(without) > 4 else ''}",
            transform=ax.transAxes, va="top", fontsize=7, color="0.4")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _short(x: float) -> str:
  """4,000,000 -> '4M', 61,706 -> '61.7k', 0.0123 -> '0.0123' (3 significant digits)."""
  for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if x >= div:
      return f"{x / div:.3g}{unit}"
  return f"{x:.3g}"


def _log_axis(ax, values: Sequence[float], margin: float = 1.6) -> None:
  """A log x axis over `values` (x `margin` each side) whose labels do not collide: ticks at 1, 2, 5 x 10^k
  (plain 10^k over wide ranges), written as 100k / 2M / 0.05; minor ticks labelled only when fewer than
  two major ones fall in the range."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  lo, hi = min(values) / margin, max(values) * margin
  subs = (1.0,) if math.log10(hi / lo) > 3 else (1.0, 2.0, 5.0)
  ax.set_xscale("log")
  ax.set_xlim(lo, hi)
  short = ticker.FuncFormatter(lambda v, _: _short(v))
  major = ticker.LogLocator(base=10, subs=subs)
  ax.xaxis.set_major_locator(major)
  ax.xaxis.set_major_formatter(short)
  in_range = [t for t in major.tick_values(lo, hi) if lo <= t <= hi]
  ax.xaxis.set_minor_formatter(short if len(in_range) < 2 else ticker.NullFormatter())


def _place_labels(ax, points: Sequence[Tuple[float, float]], texts: Sequence[str], colours,
                  fontsize: float = 8) -> List[Any]:
  """Writes each point's label beside it so that no label overlaps another label or a point; returns them.

  Points in the right half of the axes get their label in a column left of those points, the others in a
  column right of theirs, so labels stay inside the axes and never run through a marker; a label moved
  off its point's height (or away from it) is joined to it by a thin line in the point's colour.
  """
  from matplotlib.transforms import Bbox  # pylint: disable=g-import-not-at-top
  fig = ax.figure
  fig.set_dpi(120)  # the dpi the file is saved at: spacing is in its pixels
  fig.canvas.draw()  # final limits and layout, so display coordinates are right
  renderer = fig.canvas.get_renderer()
  to_pt = 72 / fig.dpi
  box = ax.get_window_extent(renderer)
  px = [ax.transData.transform(p) for p in points]
  on_left = [x > (box.x0 + box.x1) / 2 for x, _ in px]
  gap = 10
  col = {True: min([x for (x, _), l in zip(px, on_left) if l], default=0) - gap,
         False: max([x for (x, _), l in zip(px, on_left) if not l], default=0) + gap}
  notes = []
  for i, text in enumerate(texts):
    note = ax.annotate(text, xy=points[i], xytext=((col[on_left[i]] - px[i][0]) * to_pt, 0),
                       textcoords="offset points", ha="right" if on_left[i] else "left", va="center",
                       fontsize=fontsize, color="0.15")
    note.set_in_layout(False)  # the labels sit inside the axes; they must not squeeze them
    notes.append(note)
  fig.canvas.draw()
  marker = 6  # px around each point kept free
  taken = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker) for x, y in px]
  shifts = [0.0] * len(notes)
  for i in sorted(range(len(notes)), key=lambda k: px[k][1]):
    bb = notes[i].get_window_extent(renderer).expanded(1.0, 1.15)
    own = taken[i]
    dy = 0.0
    while any(bb.translated(0, dy).overlaps(t) for t in taken if t is not own):
      dy += 2.0
    shifts[i] = dy
    taken.append(bb.translated(0, dy))
  top = max((notes[i].get_window_extent(renderer).y1 + shifts[i] for i in range(len(notes))), default=0)
  bottom = min((notes[i].get_window_extent(renderer).y0 + shifts[i] for i in range(len(notes))), default=0)
  down = min(max(0.0, top - box.y1 + 2), max(0.0, bottom - box.y0 - 2))  # pull the stack back inside
  final = []
  for i, note in enumerate(notes):  # drawn again with their final offsets (and a leader line where moved)
    dx, _ = note.xyann
    dy = shifts[i] - down
    note.remove()
    leader = abs(dy) > 1 or abs(dx) > 1.5 * gap * to_pt
    note = ax.annotate(texts[i], xy=points[i], xytext=(dx, dy * to_pt), textcoords="offset points",
                       ha="right" if on_left[i] else "left", va="center", fontsize=fontsize, color="0.15",
                       arrowprops=dict(arrowstyle="-", color=colours[i], lw=0.7, shrinkA=1, shrinkB=5,
                                       relpos=(1.0, 0.5) if on_left[i] else (0.0, 0.5)) if leader else None)
    note.set_in_layout(False)
    final.append(note)
  notes = final
  return notes


def plot_tradeoff(groups: Sequence[Mapping[str, Any]], x_key: str, x_label: str, path: str) -> Optional[str]:
  """Final top-1 (mean ± std over seeds) against `x_key` on a log axis, one labelled point per architecture.

  Returns None (no file) when no architecture has both numbers yet, e.g. before any eval.
  """
  fig = tradeoff_figure(groups, x_key, x_label)
  if fig is None:
    return None
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def tradeoff_figure(groups: Sequence[Mapping[str, Any]], x_key: str, x_label: str):
  """The figure of plot_tradeoff (open; the caller saves and closes it), or None when there is nothing to plot."""
  groups = [g for g in groups if g.get(x_key) and g.get("final_top1") is not None]
  if not groups:
    return None
  colours = _colours([g["architecture"] for g in groups])
  several = any(g["runs"] > 1 for g in groups)
  fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
  points, texts, point_colours = [], [], []
  for g in groups:
    x, y = g[x_key], g["final_top1"]
    colour = colours[g["architecture"]]
    ax.errorbar([x], [y], yerr=[g.get("final_top1_std") or 0.0], fmt="o", ms=7, capsize=4, color=colour)
    points.append((x, y))
    texts.append(f"{g['architecture']}{' (n=%d)' % g['runs'] if several else ''}"
                 f"  {_short(x)}, {y:.4f}")
    point_colours.append(colour)
  _log_axis(ax, [p[0] for p in points])  # with room for the labels beside the outermost points
  ys = [p[1] for p in points]
  pad = max(0.01, 0.08 * (max(ys) - min(ys)))
  ax.set_ylim(min(ys) - pad, max(ys) + pad)
  ax.set_xlabel(x_label + " (log scale)")
  ax.set_ylabel("final test top-1" + (" (mean ± std over seeds)" if several else ""))
  ax.grid(alpha=0.3, which="major")
  ax.grid(alpha=0.12, which="minor")
  _place_labels(ax, points, texts, point_colours)
  return fig


def plot_train_vs_test(runs, labels: Mapping[str, str], path: str) -> str:
  """Top-1 on the training images (eval preprocessing; dashed) and on the test split (solid) per run."""
  colours = _colours([labels[r.name] for r in runs])
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for r in runs:
    if not r.train_evals:
      continue
    label = labels[r.name]
    ax.plot([e.get("epoch", e["step"]) for e in r.evals], [e["top1"] for e in r.evals], "-o", ms=3,
            color=colours[label], label=f"{label}: test")
    ax.plot([e.get("epoch", e["step"]) for e in r.train_evals], [e["top1"] for e in r.train_evals], "--",
            color=colours[label], label=f"{label}: train")
  ax.set_xlabel("epoch")
  ax.set_ylabel("top-1")
  ax.set_title("Train (dashed, no augmentation) vs test (solid) top-1: the gap is overfitting")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def grad_norm_layers(run) -> List[str]:
  """The 'grad_norm/<layer>' keys a run logged, in network order as the model defines its layers."""
  keys = []
  for record in run.train:
    keys.extend(k for k in record if k.startswith("grad_norm/") and k not in keys)
  order = run.run_info.get("layer_order") or []
  rank = {f"grad_norm/{name}": i for i, name in enumerate(order)}
  return sorted(keys, key=lambda k: (rank.get(k, len(rank)), keys.index(k)))


def plot_grad_norms(runs, labels: Mapping[str, str], path: str) -> str:
  """Per-layer gradient norms vs step, one panel per run (log scale), first layer darkest."""
  runs = [r for r in runs if grad_norm_layers(r)]
  cols = min(2, len(runs))
  rows = (len(runs) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False, sharey=True)
  for ax, r in zip(axes.flat, runs):
    layers = grad_norm_layers(r)
    cmap = plt.get_cmap("viridis")
    for i, key in enumerate(layers):
      points = [(t["step"], t[key]) for t in r.train if key in t and t[key] > 0]
      if points:
        ax.plot(*zip(*points), lw=1.1, color=cmap(i / max(1, len(layers) - 1)), label=key[len("grad_norm/"):])
    ax.set_yscale("log")
    ax.set_title(labels[r.name], fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
  for ax in axes[:, 0]:
    ax.set_ylabel("gradient L2 norm per layer")
  for ax in list(axes.flat)[len(runs):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_plots(runs, labels: Mapping[str, str], groups: List[Mapping[str, Any]], out: str) -> Dict[str, str]:
  """Writes the PNGs into `out` (train_vs_test and grad_norms only for runs that logged them; none that
  would be empty, e.g. accuracy plots before the first eval); returns {plot name: path} of those written."""
  paths = {
      "top1_vs_epoch": plot_curves(runs, labels, os.path.join(out, "top1_vs_epoch.png")),
      "top1_vs_params": plot_tradeoff(groups, "params", "parameters",
                                      os.path.join(out, "top1_vs_params.png")),
      "top1_vs_flops": plot_tradeoff(groups, "gflops_per_image", "GFLOPs per image (forward)",
                                     os.path.join(out, "top1_vs_flops.png")),
  }
  for name, path in list(paths.items()):
    if path is None:  # nothing to plot yet (no eval): no file (report.py removes its own earlier one)
      del paths[name]
  if any(r.train_evals for r in runs):
    paths["train_vs_test"] = plot_train_vs_test(runs, labels, os.path.join(out, "train_vs_test.png"))
  if any(grad_norm_layers(r) for r in runs):
    paths["grad_norms"] = plot_grad_norms(runs, labels, os.path.join(out, "grad_norms.png"))
  return paths
