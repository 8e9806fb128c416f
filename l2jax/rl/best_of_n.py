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
At N = 1 it is the mean reward and at N = K the mean best-of-K reward.

Which samples may become a gold target (`usable`): never an empty answer (first token EOS, or whitespace only:
the SFT reader refuses it, and an RM that scores "" highly is being hacked), and by default never an answer cut
off by max_new_tokens (stop_reason != "eos": fine-tuning on it with the EOS the SFT format appends teaches the
model to stop mid-sentence; DESIGN.md section 6b). A prompt with no usable sample gets no pool entry.

Temperature rescaling (section 3.2.3, Figure 8: "the optimal temperature is not constant during the iterative
model updates"): `best_temperature` picks, over Figure 8's grid, the temperature with the highest mean best-of-K
R_c among usable samples (Figure 8's max curve at N = K restricted to what the pool can take); a prompt with no
usable sample at a temperature counts the lowest R_c seen on the whole grid, so leaving prompts without an
answer is penalised, not ignored. Ties go to the lower temperature.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["select_best", "merge_pool", "expected_order_stat", "best_of_n_curves", "distill_keep", "usable",
           "sample_counts", "best_temperature", "is_empty", "is_finished", "choose", "pool_entry", "best_entries",
           "entry_answer", "readable", "build_pool", "rescore"]


def is_empty(text: str) -> bool:
  """An empty answer: nothing but whitespace (a first sampled token EOS decodes to "")."""
  return not str(text).strip()


def is_finished(sample: dict) -> bool:
  """The sampler stopped on EOS (not on max_new_tokens or the context); records without a stop_reason: True."""
  return sample.get("stop_reason", "eos") == "eos"


def usable(sample: dict, keep_truncated: bool = False) -> bool:
  """May this sample become a gold target: non-empty, and finished unless keep_truncated (module docstring)."""
  return not is_empty(sample["text"]) and (keep_truncated or is_finished(sample))


def select_best(rewards_pk: np.ndarray, usable_pk: np.ndarray | None = None) -> np.ndarray:
  """int [P]: per prompt, the index of the highest reward among its usable samples (the first on ties); -1 where
  none of its K samples is usable (usable_pk None: all are)."""
  r = np.asarray(rewards_pk, np.float64)
  if r.ndim != 2 or r.shape[1] == 0:
    raise ValueError(f"rewards: expected [prompts, K >= 1], found shape {r.shape}")
  ok = np.ones(r.shape, bool) if usable_pk is None else np.asarray(usable_pk, bool)
  if ok.shape != r.shape:
    raise ValueError(f"usable: expected shape {r.shape} (as rewards), found {ok.shape}")
  best = np.argmax(np.where(ok, r, -np.inf), axis=1)
  return np.where(ok.any(axis=1), best, -1)


def sample_counts(records: Sequence[dict], keep_truncated: bool = False) -> dict:
  """Statistics of best-of-K records ({"samples": [{"text", "reward", "stop_reason"}]}), from the records alone (so
  a resumed run counts what an uninterrupted one counts): samples, empty, truncated (not stopped by EOS),
  by_stop_reason, usable, prompts, prompts_without_usable (no pool entry), best_unusable (prompts whose highest-R_c
  sample was empty or cut off: what selection without the rule would have chosen)."""
  out = {"prompts": len(records), "samples": 0, "empty": 0, "truncated": 0, "usable": 0, "by_stop_reason": {},
         "prompts_without_usable": 0, "best_unusable": 0, "keep_truncated": keep_truncated}
  for rec in records:
    ss = rec["samples"]
    ok = [usable(s, keep_truncated) for s in ss]
    out["samples"] += len(ss)
    out["empty"] += sum(is_empty(s["text"]) for s in ss)
    out["truncated"] += sum(not is_finished(s) for s in ss)
    out["usable"] += sum(ok)
    for s in ss:
      reason = s.get("stop_reason", "eos")
      out["by_stop_reason"][reason] = out["by_stop_reason"].get(reason, 0) + 1
    out["prompts_without_usable"] += int(not any(ok))
    out["best_unusable"] += int(bool(ss) and not ok[int(np.argmax([s["reward"] for s in ss]))])
  return out


def best_temperature(rewards_by_t: dict, usable_by_t: dict) -> dict:
  """The temperature of Figure 8's grid with the highest mean best-of-K R_c among usable samples.

  rewards_by_t / usable_by_t: {temperature (str or float): float [P, K] / bool [P, K]}. Per temperature:
  best_of_k_usable = mean over prompts of the best usable reward, a prompt with none counting the lowest reward
  seen on the whole grid; coverage = share of prompts with a usable sample. Ties: the lower temperature.
  Returns {"temperature", "quantity", "by_temperature": {T: {"best_of_k_usable", "coverage"}}}.
  """
  if not rewards_by_t:
    raise ValueError("best_temperature: no temperatures (Figure 8's grid is empty)")
  floor = min(float(np.min(r)) for r in rewards_by_t.values() if np.size(r))
  by_t = {}
  for t, r in rewards_by_t.items():
    r, ok = np.asarray(r, np.float64), np.asarray(usable_by_t[t], bool)
    best = np.where(ok, r, -np.inf).max(axis=1)
    best = np.where(ok.any(axis=1), best, floor)
    by_t[f"{float(t):g}"] = {"best_of_k_usable": float(best.mean()), "coverage": float(ok.any(axis=1).mean())}
  top = max(sorted(by_t, key=float), key=lambda t: (by_t[t]["best_of_k_usable"], -float(t)))
  return {"temperature": float(top), "by_temperature": by_t,
          "quantity": "argmax over T of the mean over prompts of the best usable R_c among K samples (usable: "
                      "not empty, not cut off unless keep_truncated; a prompt with none counts the grid's lowest R_c)"}


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


# ----------------------------------------------------------------------------------------------- the pool

def pool_entry(rec: dict, sample: dict, reward: float) -> dict:
  """A pool.jsonl line: messages JSONL for the SFT reader (prompt + the chosen answer) and where it came from."""
  answer = {"role": "assistant", "content": sample["text"]}
  if not is_finished(sample):   # kept with keep_truncated: fine-tuned without a closing EOS (l2jax.data.dialogs)
    answer["finished"] = False
  return {"key": rec["key"], "messages": rec["messages"] + [answer],
          "reward": reward, "helpful": sample["helpful"], "safety": sample["safety"], "is_safety": rec["is_safety"],
          "source": rec.get("source", ""), "iteration": rec["iteration"], "sampler": rec["sampler"],
          "temperature": rec["temperature"], "stop_reason": sample.get("stop_reason", "eos")}


def choose(samples: list[dict], keep_truncated: bool = False) -> int:
  """The index of the best usable sample of one prompt's samples ({"text", "reward", "stop_reason"}); -1: none."""
  ok = [[usable(x, keep_truncated) for x in samples]]
  return int(select_best(np.array([[x["reward"] for x in samples]]), np.array(ok))[0])


def best_entries(records, keep_truncated: bool = False) -> list[dict]:
  """The pool candidates of best-of-K records: each prompt's best usable sample; none for a prompt without one."""
  out = []
  for rec in records:
    j = choose(rec["samples"], keep_truncated)
    if j >= 0:
      out.append(pool_entry(rec, rec["samples"][j], rec["samples"][j]["reward"]))
  return out


def entry_answer(e: dict) -> dict:
  """A pool entry's answer as a sample ({"text", "stop_reason"}) for best_of_n.usable."""
  return {"text": e["messages"][-1]["content"], "stop_reason": e.get("stop_reason", "eos")}


def readable(entries: list[dict]) -> tuple[list[dict], int]:
  """(entries the SFT reader accepts, how many it would refuse): a last guard so that data this stage writes never
  fails its own reader (l2jax.data.dialogs.check_messages, the messages format's rules)."""
  from l2jax.data.dialogs import _Problem, check_messages
  ok = []
  for e in entries:
    try:
      check_messages(e["messages"])
      ok.append(e)
    except _Problem:
      pass
  return ok, len(entries) - len(ok)


def build_pool(previous: list[dict], new: list[dict], keep_truncated: bool = False,
               rescore_fn: Callable[[list[dict]], list[dict]] | None = None) -> tuple[list[dict], dict]:
  """(pool, counts): merge_pool of the usable previous entries (rescored by rescore_fn when given) and the new
  candidates; counts also say how many previous entries were dropped as unusable (an empty or cut-off answer of
  an older run's pool) and how many pool entries the SFT reader would refuse (dropped; 0 unless a bug)."""
  prev = [e for e in previous if usable(entry_answer(e), keep_truncated)]
  prev = rescore_fn(prev) if rescore_fn is not None and prev else prev
  pool, counts = merge_pool(prev, new)
  pool, unreadable = readable(pool)
  return pool, {**counts, "previous_dropped_unusable": len(previous) - len(prev), "dropped_unreadable": unreadable}


def rescore(pool: list[dict], scorer) -> list[dict]:
  """Previous pool answers scored again by the current reward models (scores of different RMs do not compare);
  a cut-off answer (kept with keep_truncated) is scored as cut off, as when it was sampled."""
  if not pool:
    return pool
  h, s, r = scorer.score([e["messages"][:-1] for e in pool], [e["messages"][-1]["content"] for e in pool],
                         [e["is_safety"] for e in pool], [is_finished(entry_answer(e)) for e in pool])
  return [{**e, "helpful": float(h[i]), "safety": float(s[i]), "reward": float(r[i]), "rescored": True}
          for i, e in enumerate(pool)]


# ----------------------------------------------------------------------------------------------- Figure 7

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
