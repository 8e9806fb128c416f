"""Reward distributions per version (Llama 2 Figure 20): how RLHF shifts the reward of held-out answers.

The paper's Figure 20 histograms the reward-model score of each Llama 2-Chat version's answers (SFT, RLHF V1
... V5) on the same prompts; the mass moves right as the versions progress. We histogram, per version, the
score of the reward model that the combined reward selects (`l2jax.rl.rewards.combine`: the safety RM on
safety prompts and wherever sigmoid(Rs) < 0.15, the helpfulness RM elsewhere), as a raw logit, on shared bins.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import numpy as np


def histograms(scores: Mapping[str, np.ndarray], bins: int = 30) -> dict:
  """{"edges": [bins + 1], "counts": {version: [bins]}, "mean": {version: float}} on edges shared by all."""
  arrays = {k: np.asarray(v, np.float64) for k, v in scores.items()}
  both = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(0)])
  lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)
  return {"edges": edges.tolist(), "counts": {k: np.histogram(a, edges)[0].tolist() for k, a in arrays.items()},
          "mean": {k: float(a.mean()) if a.size else None for k, a in arrays.items()}}


def plot(h: dict, path: str | Path, title: str = "") -> Path | None:
  """Figure 20: one histogram per version (stacked panels, shared x-axis), the mean marked."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("distributions: matplotlib is not installed; no PNG written", file=sys.stderr)
    return None
  names = list(h["counts"])
  n = max(len(names), 1)
  fig, axes = plt.subplots(n, 1, figsize=(6, 1.5 + 1.3 * n), sharex=True, squeeze=False)
  edges = np.asarray(h["edges"])
  width = edges[1:] - edges[:-1]
  for i, (ax, name) in enumerate(zip(axes[:, 0], names)):
    ax.bar(edges[:-1], h["counts"][name], width=width, align="edge", color=f"C{i % 10}", alpha=0.7)
    m = h["mean"][name]
    if m is not None:
      ax.axvline(m, color="black", lw=1)
    ax.set_ylabel(name, fontsize=8)
  axes[-1, 0].set_xlabel("reward (raw score of the RM that Rc selects)")
  fig.suptitle(title or "reward distribution per version (line: mean)", fontsize=9)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
