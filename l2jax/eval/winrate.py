"""Win rates of a model against a reference judged by reward models (Llama 2 Figure 11) and their scatter.

For each prompt, the model's answer and the reference's answer are scored by the judge (raw scalar-head
scores, logits); with d = score(model) - score(reference):
  win  if d >  tol
  tie  if |d| <= tol
  loss if d < -tol
TIE_TOL = 0.05 logit by default: a difference of 0.05 in the raw score is a change of at most 1.25 percentage
points of sigmoid(score), below what a reward model resolves (the tiny RMs' held-out accuracy is ~60%); two
identical answers always tie (d = 0). The win rate counts a tie as half a win,
  win_rate = (wins + ties / 2) / n,
so 0.5 is parity (a model against itself scores exactly 0.5) and the number stays comparable when ties are
many. Figure 11 judges helpfulness prompts with the helpfulness RM and safety prompts with the safety RM;
an optional third judge (e.g. an RM trained on open-source data only) scores both sets, as the paper's
GPT-4 judge guards against over-fitting to Meta's own reward models.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import numpy as np

TIE_TOL = 0.05


def outcomes(model_n, reference_n, tol: float = TIE_TOL) -> np.ndarray:
  """int8 [N]: +1 win, 0 tie (|model - reference| <= tol), -1 loss, per prompt."""
  m, r = np.asarray(model_n, np.float64), np.asarray(reference_n, np.float64)
  if m.shape != r.shape or m.ndim != 1:
    raise ValueError(f"outcomes: expected two [N] score arrays of one length, found {m.shape} and {r.shape}")
  if tol < 0:
    raise ValueError(f"outcomes: tol must be >= 0, found {tol}")
  d = m - r
  return np.where(d > tol, 1, np.where(d < -tol, -1, 0)).astype(np.int8)


def win_rate(model_n, reference_n, tol: float = TIE_TOL) -> dict:
  """{"win", "tie", "loss": counts, "n", "win_rate": (win + tie / 2) / n (None if n == 0), "tol"}."""
  o = outcomes(model_n, reference_n, tol)
  n = int(o.size)
  w, t, l = int((o == 1).sum()), int((o == 0).sum()), int((o == -1).sum())
  return {"win": w, "tie": t, "loss": l, "n": n, "win_rate": (w + 0.5 * t) / n if n else None, "tol": tol}


def plot(points: Mapping[str, tuple[float | None, float | None]], path: str | Path, title: str = "",
         xlabel: str = "helpfulness win rate (%)", ylabel: str = "harmlessness win rate (%)") -> Path | None:
  """Figure 11: one point per version at (helpfulness win rate, harmlessness win rate), in %.

  points: {version: (helpful_rate, harmless_rate)}, rates in [0, 1]; a missing rate is drawn at 50 and
  marked "n/a". None (and a note on stderr) without matplotlib.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("winrate: matplotlib is not installed; no PNG written", file=sys.stderr)
    return None
  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  ax.axhline(50, color="gray", lw=0.8, ls="--")
  ax.axvline(50, color="gray", lw=0.8, ls="--")
  xs, ys = [], []
  for i, (name, (h, s)) in enumerate(points.items()):
    x = 50.0 if h is None else 100 * h
    y = 50.0 if s is None else 100 * s
    xs.append(x)
    ys.append(y)
    ax.scatter([x], [y], s=40, color=f"C{i % 10}", zorder=3)
    label = name + ("" if h is not None and s is not None else " (n/a)")
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
  if len(xs) > 1:
    ax.plot(xs, ys, color="gray", lw=0.6, alpha=0.6, zorder=2)
  lo = min([0.0] + xs + ys)
  hi = max([100.0] + xs + ys)
  ax.set_xlim(lo, hi)
  ax.set_ylim(lo, hi)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title or "win rate against the reference (ties count 1/2)", fontsize=9)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
