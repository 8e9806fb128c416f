"""Reward-model accuracy overall and by preference rating, laid out like Llama 2 Table 8, and score distributions.

Accuracy of a pair set = mean over pairs of [r(chosen) > r(rejected)], a tie counting one half (so a constant
model scores 0.5). By rating: the same over the pairs of each level (significantly better, better, slightly
better, negligibly better / unsure); "Avg" is over all pairs, unrated ones included (Table 8's last column).
`write_report` writes reward_eval.json, reward_eval.md (the table) and reward_eval.png to a run directory.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

from l2jax.data.preferences import RATING_TITLES, RATINGS, UNRATED
from l2jax.eval import save_figure


def pair_correct(chosen_n: np.ndarray, rejected_n: np.ndarray) -> np.ndarray:
  """1 where the chosen response scores higher, 0.5 on a tie, 0 otherwise; float64 [N]."""
  c, r = np.asarray(chosen_n, np.float64), np.asarray(rejected_n, np.float64)
  return (c > r) + 0.5 * (c == r)


def accuracy_by_rating(chosen_n, rejected_n, rating_n) -> dict:
  """{"avg", level name: accuracy or None (no pairs of that level), "counts": {level: n, "unrated": n, "all": n}}."""
  ok = pair_correct(chosen_n, rejected_n)
  rating_n = np.asarray(rating_n, np.int64)
  out: dict = {}
  counts: dict = {}
  for level, name in enumerate(RATINGS):
    sel = rating_n == level
    counts[name] = int(sel.sum())
    out[name] = float(ok[sel].mean()) if sel.any() else None
  counts["unrated"] = int((rating_n == UNRATED).sum())
  counts["all"] = int(len(ok))
  out["avg"] = float(ok.mean()) if len(ok) else None
  out["counts"] = counts
  return out


def score_distribution(chosen_n, rejected_n, bins: int = 30) -> dict:
  """Histograms of chosen and rejected scores on shared bin edges, their summaries, and the gap r_c - r_r."""
  c, r = np.asarray(chosen_n, np.float64), np.asarray(rejected_n, np.float64)
  both = np.concatenate([c, r])
  lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  edges = np.linspace(lo, hi, bins + 1)

  def summary(x):
    if not len(x):
      return {}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(x.mean()), "std": float(x.std()), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3],
            "q95": q[4]}

  return {"edges": edges.tolist(), "chosen_counts": np.histogram(c, edges)[0].tolist(),
          "rejected_counts": np.histogram(r, edges)[0].tolist(),
          "chosen": {k: float(v) for k, v in summary(c).items()},
          "rejected": {k: float(v) for k, v in summary(r).items()},
          "gap": {k: float(v) for k, v in summary(c - r).items()}}


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def table8(results: Mapping[str, dict]) -> str:
  """A markdown table like Table 8: one row per evaluation set, accuracy (%) by rating level and Avg."""
  head = "| Test set | " + " | ".join(RATING_TITLES) + " | Avg | pairs |"
  lines = [head, "|" + "---|" * (len(RATINGS) + 3)]
  for name, res in results.items():
    acc = res["accuracy"]
    lines.append(f"| {name} | " + " | ".join(_pct(acc[k]) for k in RATINGS) + f" | {_pct(acc['avg'])} | "
                 f"{acc['counts']['all']} |")
  return "\n".join(lines)


def evaluate(scores: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], bins: int = 30) -> dict[str, dict]:
  """{set: {"accuracy": accuracy_by_rating, "scores": score_distribution}} from {set: (chosen, rejected, rating)}."""
  return {name: {"accuracy": accuracy_by_rating(c, r, g), "scores": score_distribution(c, r, bins)}
          for name, (c, r, g) in scores.items()}


def plot(results: Mapping[str, dict], path: str | Path, title: str = "") -> Path | None:
  """PNG: per set, the chosen / rejected score histograms and the accuracy by rating. None without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("reward_accuracy: matplotlib is not installed; no PNG written", file=sys.stderr)
    return None
  n = max(len(results), 1)
  fig, axes = plt.subplots(n, 2, figsize=(11, 3.2 * n), squeeze=False)
  for row, (name, res) in enumerate(results.items()):
    d, acc = res["scores"], res["accuracy"]
    ax = axes[row][0]
    edges = np.asarray(d["edges"])
    width = edges[1:] - edges[:-1]
    ax.bar(edges[:-1], d["chosen_counts"], width=width, align="edge", alpha=0.55, label="chosen")
    ax.bar(edges[:-1], d["rejected_counts"], width=width, align="edge", alpha=0.55, label="rejected")
    ax.set_title(f"{name}: scores ({acc['counts']['all']} pairs)", fontsize=9)
    ax.set_xlabel("reward score")
    ax.legend(fontsize=8)
    ax = axes[row][1]
    labels = [t.replace(" / ", "/\n").replace(" ", "\n", 1) for t in RATING_TITLES] + ["Avg"]
    vals = [acc[k] if acc[k] is not None else math.nan for k in RATINGS] + [acc["avg"]]
    bars = ax.bar(range(len(vals)), [100 * v for v in vals], color=["C2"] * len(RATINGS) + ["C3"])
    for b, v, k in zip(bars, vals, list(RATINGS) + ["all"]):
      x = b.get_x() + b.get_width() / 2
      if math.isnan(v):
        ax.text(x, 2, "no pairs", ha="center", va="bottom", fontsize=7, color="gray")
      else:
        ax.text(x, 100 * v + 1, f"{100 * v:.1f}\n(n={acc['counts'][k]})", ha="center", va="bottom", fontsize=7)
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 115)
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{name}: accuracy by rating", fontsize=9)
  return save_figure(fig, path, title)


def write_report(run_dir: str | Path, results: Mapping[str, dict], meta: dict | None = None,
                 stem: str = "reward_eval") -> dict[str, Path]:
  """Write {stem}.json (meta, table, per-set accuracy and distributions), {stem}.md and {stem}.png to run_dir."""
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  table = table8(results)
  out = {"json": run_dir / f"{stem}.json", "md": run_dir / f"{stem}.md"}
  out["json"].write_text(json.dumps({**(meta or {}), "table": table, "sets": results}, indent=2) + "\n")
  out["md"].write_text(table + "\n")
  png = plot(results, run_dir / f"{stem}.png", title=(meta or {}).get("title", ""))
  if png is not None:
    out["png"] = png
  return out
