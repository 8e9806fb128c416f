"""Best-of-K selection, the pooled rejection-sampling dataset, and the statistics of Llama 2 Figures 7, 8 and 16b.

Rejection sampling (Llama 2 section 3.2.3): K answers per prompt from the newest model, each scored with the
combined reward R_c (l2jax.rl.rewards.combine: the raw score of the safety model on safety prompts or when
sigmoid(R_s) < 0.15, else of the helpfulness model); the best becomes the prompt's new gold target. From RLHF V3
on the paper pools "the top performing samples from all prior iterations": `merge_pool` keeps, per prompt, the
best answer over this and every earlier iteration and never drops a prompt.

Figure 7 ("max and median reward among N samples, N in [1, ..., 100], averaged over the training set of
prompts") is computed here without resampling, as the exact expectation over the N-subsets of the K samples
(the unbiased order-statistics estimator): with the K scores of a prompt sorted, s_(1) <= ... <= s_(K),
  E[max of N]        = sum_i s_(i) C(i-1, N-1) / C(K, N)
  E[r-th smallest]   = sum_i s_(i) C(i-1, r-1) C(K-i, N-r) / C(K, N)
and the median of N is the (N+1)/2-th smallest (odd N) or the mean of the N/2-th and N/2+1-th (even N).
E[max of N] is non-decreasing in N, and at N = K it is the max of the K samples.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["select_best", "merge_pool", "expected_order_stat", "best_of_n_curves", "distill_keep"]


def select_best(rewards_pk: np.ndarray) -> np.ndarray:
  """int [P]: per prompt, the index of the highest reward among its K samples (the first on ties)."""
  r = np.asarray(rewards_pk, np.float64)
  if r.ndim != 2 or r.shape[1] == 0:
    raise ValueError(f"rewards: expected [prompts, K >= 1], found shape {r.shape}")
  return np.argmax(r, axis=1)


def merge_pool(previous: Sequence[dict], new: Sequence[dict]) -> tuple[list[dict], dict]:
  """(pool, counts): per prompt key, the record with the highest "reward" of `previous` and `new`.

  Ties keep the previous record. Keys of either side are all kept (previous order first, then new keys in
  their order), so a prompt is never lost. counts: {"kept_previous", "improved", "added"}.
  """
  pool: dict[str, dict] = {}
  for r in previous:
    if r["key"] in pool:
      raise ValueError(f"pool: prompt key {r['key']!r} appears twice in the previous pool")
    pool[r["key"]] = r
  counts = {"kept_previous": 0, "improved": 0, "added": 0}
  for r in new:
    old = pool.get(r["key"])
    if old is None:
      counts["added"] += 1
      pool[r["key"]] = r
    elif float(r["reward"]) > float(old["reward"]):
      counts["improved"] += 1
      pool[r["key"]] = r
    else:
      counts["kept_previous"] += 1
  return list(pool.values()), counts


def _weights(k: int, n: int, r: int) -> np.ndarray:
  """[K]: P(the r-th smallest of a uniform N-subset of K sorted items is item i), i = 1..K."""
  total = math.comb(k, n)
  return np.array([math.comb(i - 1, r - 1) * math.comb(k - i, n - r) / total for i in range(1, k + 1)])


def expected_order_stat(scores_pk: np.ndarray, n: int, r: int) -> np.ndarray:
  """[P]: E[r-th smallest of N samples drawn without replacement from each prompt's K scores] (exact)."""
  s = np.sort(np.asarray(scores_pk, np.float64), axis=1)
  k = s.shape[1]
  if not 1 <= r <= n <= k:
    raise ValueError(f"order statistic r={r} of n={n} among k={k}: need 1 <= r <= n <= k")
  return s @ _weights(k, n, r)


def best_of_n_curves(scores_pk: np.ndarray) -> dict:
  """Figure 7's curves: for N = 1..K, the max and the median reward among N samples, averaged over prompts."""
  s = np.asarray(scores_pk, np.float64)
  k = s.shape[1]
  mx, med = [], []
  for n in range(1, k + 1):
    mx.append(float(expected_order_stat(s, n, n).mean()))
    if n % 2:
      med.append(float(expected_order_stat(s, n, (n + 1) // 2).mean()))
    else:
      med.append(float((expected_order_stat(s, n, n // 2) + expected_order_stat(s, n, n // 2 + 1)).mean() / 2))
  return {"n": list(range(1, k + 1)), "max": mx, "median": med, "prompts": int(s.shape[0]),
          "estimator": "exact expectation over the N-subsets of each prompt's K samples (order statistics)"}


def distill_keep(plain_safety_b: np.ndarray, preprompted_safety_b: np.ndarray) -> np.ndarray:
  """bool [B]: keep the preprompted answer where the safety RM scores it strictly higher than the plain one.

  Llama 2 section 4.2.4, "Rejecting Context Distillation Errors with the Safety Reward Model": "we only keep the
  context distillation output on adversarial prompts if it gets a better reward than the original answer".
  """
  return np.asarray(preprompted_safety_b, np.float64) > np.asarray(plain_safety_b, np.float64)


# ----------------------------------------------------------------------------------------------- figures

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_figure7(curves: dict, path, title: str = "") -> None:
  """Max and median reward among N samples (Figure 7), the gap shaded: the potential gain of rejection sampling."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(curves["n"], curves["max"], label="max of N")
  ax.plot(curves["n"], curves["median"], label="median of N")
  ax.fill_between(curves["n"], curves["median"], curves["max"], alpha=0.2)
  ax.set_xlabel("N samples")
  ax.set_ylabel("reward (R_c logit)")
  ax.set_title(title or "Figure 7: max and median reward among N")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_figure8(per_t: dict, path, title: str = "") -> None:
  """Max reward among N for each temperature (Figure 8). per_t: {temperature: curves}."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for t, curves in sorted(per_t.items(), key=lambda kv: float(kv[0])):
    ax.plot(curves["n"], curves["max"], label=f"T={float(t):g}")
  ax.set_xlabel("N samples")
  ax.set_ylabel("max reward among N")
  ax.set_title(title or "Figure 8: max reward among N by temperature")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_histograms(before: np.ndarray, after: np.ndarray, path, title: str = "") -> None:
  """The held-out reward distribution before and after fine-tuning."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  both = np.concatenate([before, after]) if len(before) + len(after) else np.zeros(1)
  bins = np.linspace(both.min(), both.max() + 1e-6, 25)
  ax.hist(before, bins=bins, alpha=0.5, label=f"before (mean {np.mean(before):.3f})")
  ax.hist(after, bins=bins, alpha=0.5, label=f"after (mean {np.mean(after):.3f})")
  ax.set_xlabel("reward (R_c logit)")
  ax.set_ylabel("held-out prompts")
  ax.set_title(title or "held-out reward before / after fine-tuning")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_figure16b(plain_b: np.ndarray, gain_b: np.ndarray, keep_b: np.ndarray, path) -> None:
  """Figure 16b: the plain answer's safety score against the gain of the preprompted one; kept vs dropped."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  keep_b = np.asarray(keep_b, bool)
  ax.scatter(plain_b[keep_b], gain_b[keep_b], s=10, label=f"kept ({keep_b.sum()})")
  ax.scatter(plain_b[~keep_b], gain_b[~keep_b], s=10, label=f"dropped ({(~keep_b).sum()})")
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xlabel("original safety score")
  ax.set_ylabel("score gain with the safety preprompt")
  ax.set_title(f"Figure 16b: kept {keep_b.mean() if len(keep_b) else 0:.0%}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
