"""PNG plots of a comparison: the eval curves, and accuracy against parameters and against FLOPs."""

import os
from typing import Any, Dict, List, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top


def _colours(labels: Sequence[str]) -> Dict[str, Any]:
  """One colour per architecture label, so the seeds of one architecture share it."""
  cmap = plt.get_cmap("tab10")
  return {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(labels))}


def plot_curves(runs, labels: Mapping[str, str], path: str) -> str:
  """Test top-1 vs epoch for every run (metrics.jsonl eval records); seeds of one architecture share a colour."""
  colours = _colours([labels[r.name] for r in runs])
  fig, ax = plt.subplots(figsize=(7, 4.5))
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
  if seen:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _short(x: float) -> str:
  """4,000,000 -> '4.0M', 61,706 -> '61.7k', 0.0123 -> '0.0123'."""
  for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if x >= div:
      return f"{x / div:.1f}{unit}"
  return f"{x:.3g}"


def plot_tradeoff(groups: Sequence[Mapping[str, Any]], x_key: str, x_label: str, path: str) -> str:
  """Final top-1 (mean ± std over seeds) against `x_key` on a log axis, one point per architecture."""
  colours = _colours([g["architecture"] for g in groups])
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for g in groups:
    x, y = g.get(x_key), g.get("final_top1")
    if not x or y is None:
      continue
    ax.errorbar([x], [y], yerr=[g.get("final_top1_std") or 0.0], fmt="o", ms=7, capsize=4,
                color=colours[g["architecture"]], label=f"{g['architecture']} (n={g['runs']})")
    ax.annotate(f"{g['architecture']}\n{_short(x)}", (x, y), textcoords="offset points", xytext=(6, 4),
                fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel(x_label + " (log scale)")
  ax.set_ylabel("final test top-1 (mean ± std over seeds)")
  ax.grid(alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_plots(runs, labels: Mapping[str, str], groups: List[Mapping[str, Any]], out: str) -> Dict[str, str]:
  """Writes the three PNGs into `out`; returns {plot name: path}."""
  return {
      "top1_vs_epoch": plot_curves(runs, labels, os.path.join(out, "top1_vs_epoch.png")),
      "top1_vs_params": plot_tradeoff(groups, "params", "parameters",
                                      os.path.join(out, "top1_vs_params.png")),
      "top1_vs_flops": plot_tradeoff(groups, "gflops_per_image", "GFLOPs per image (forward)",
                                     os.path.join(out, "top1_vs_flops.png")),
  }
