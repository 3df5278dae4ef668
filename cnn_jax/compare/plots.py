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
  """Writes the PNGs into `out` (train_vs_test and grad_norms only for runs that logged them);
  returns {plot name: path}."""
  paths = {
      "top1_vs_epoch": plot_curves(runs, labels, os.path.join(out, "top1_vs_epoch.png")),
      "top1_vs_params": plot_tradeoff(groups, "params", "parameters",
                                      os.path.join(out, "top1_vs_params.png")),
      "top1_vs_flops": plot_tradeoff(groups, "gflops_per_image", "GFLOPs per image (forward)",
                                     os.path.join(out, "top1_vs_flops.png")),
  }
  if any(r.train_evals for r in runs):
    paths["train_vs_test"] = plot_train_vs_test(runs, labels, os.path.join(out, "train_vs_test.png"))
  if any(grad_norm_layers(r) for r in runs):
    paths["grad_norms"] = plot_grad_norms(runs, labels, os.path.join(out, "grad_norms.png"))
  return paths
