"""The tension between helpfulness and safety: both reward models on the same answers (Llama 2 Figure 32).

Figure 32 (Appendix A.4.1) plots, for responses of the safety test set, the safety RM score on the x-axis
against the helpfulness RM score on the y-axis, as probabilities sigmoid(raw score); a safe but unhelpful
answer sits bottom-right, a helpful but unsafe one top-left. We score the chosen and the rejected answers of
the shipped HH-RLHF test pairs (helpful-base and harmless-base) with both models and draw one panel each for
chosen and rejected, points coloured by set; the Pearson correlation of the raw scores is in the title (the
paper's point: it is low or negative on safety data).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from l2jax.eval import save_figure


def sigmoid(x) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def pearson(x, y) -> float | None:
  """Pearson correlation of two [N] arrays; None when N < 2 or either is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or x.std() == 0 or y.std() == 0:
    return None
  return float(np.corrcoef(x, y)[0, 1])


def summarise(sets: Mapping[str, Mapping[str, Mapping[str, list]]]) -> dict:
  """{set: {"chosen"/"rejected": {"n", "corr", "helpful_mean", "safety_mean"}}} from raw scores
  sets = {set: {"chosen": {"helpful": [...], "safety": [...]}, "rejected": {...}}}."""
  out: dict = {}
  for name, sides in sets.items():
    out[name] = {}
    for side, s in sides.items():
      h, sa = np.asarray(s["helpful"], np.float64), np.asarray(s["safety"], np.float64)
      out[name][side] = {"n": int(h.size), "corr": pearson(sa, h),
                         "helpful_mean": float(h.mean()) if h.size else None,
                         "safety_mean": float(sa.mean()) if sa.size else None}
  return out


def plot(sets: Mapping[str, Mapping[str, Mapping[str, list]]], path: str | Path, title: str = "") -> Path | None:
  """Figure 32: sigmoid(safety score) (x) against sigmoid(helpfulness score) (y), panels chosen / rejected."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("tension: matplotlib is not installed; no PNG written", file=sys.stderr)
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), squeeze=False)
  for ax, side in zip(axes[0], ("chosen", "rejected")):
    corrs = []
    for i, (name, sides) in enumerate(sets.items()):
      if side not in sides:
        continue
      s = sides[side]
      ax.scatter(sigmoid(s["safety"]), sigmoid(s["helpful"]), s=8, alpha=0.5, color=f"C{i % 10}", label=name)
      c = pearson(s["safety"], s["helpful"])
      corrs.append(f"{name}: r={'n/a' if c is None else f'{c:+.2f}'}")
    ax.axvline(0.15, color="gray", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("safety RM score (sigmoid)")
    ax.set_ylabel("helpfulness RM score (sigmoid)")
    ax.set_title(f"{side} answers\n" + "; ".join(corrs), fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
  return save_figure(fig, path, title)
