"""Reward over-optimisation against a known gold: best-of-n KL and expectation, the scaling-law fits, figure, table.

Gao, Schulman & Hilton (2022), "Scaling Laws for Reward Model Overoptimization": a policy optimised against a
proxy reward model is scored by the gold reward (l2jax.gold) as a function of d = sqrt(KL(pi || pi_init)).

Best-of-n (section 2, after Stiennon et al. 2020): the KL of best-of-n sampling from the base policy is
  KL_bon(n) = log n - (n - 1) / n,
and the expected gold of the best-of-n sample is computed without resampling from K >= n samples per prompt:
with a prompt's samples sorted by proxy score, the i-th (1-based) is the maximum of a uniform n-subset with
probability C(i - 1, n - 1) / C(K, n) (the order-statistics estimator of l2jax.rl.best_of_n, Llama 2 Figure 7).

Functional forms (section 3), with R = gold - gold of the starting policy:
  best-of-n  R_bon(d) = d (alpha_bon - beta_bon d)
  RL         R_RL(d)  = d (alpha_RL - beta_RL log d)
both linear in (alpha, beta), so fitted by least squares. The gold peaks at d* = alpha / (2 beta) (bon) and
d* = exp(alpha / beta - 1) (RL); the proxy keeps rising past it: Goodhart's law (Figure 1).

Curves (the input of table_rows / plot / write) are dicts {"method": "best-of-n" | "ppo" | "rejection" | ...,
"proxy": label (e.g. "256 pairs"), "kl": [...], "gold": [...], "proxy_score": [...], optional "wall_s": [...]},
points in order of increasing optimisation, the first one the starting policy (KL 0). KL estimates below 0
(sampling noise of a KL estimator) are clipped to 0 before the square root.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from l2jax.rl.best_of_n import _plt, _weights

__all__ = ["bon_kl", "bon_expectation", "fit_bon", "fit_rl", "predict_bon", "predict_rl", "peak", "table_rows",
           "table_markdown", "plot", "write", "BON"]

BON = "best-of-n"


def bon_kl(n) -> np.ndarray | float:
  """KL(best-of-n || base) = log n - (n - 1) / n nats (Gao et al. section 2); vectorised over n >= 1."""
  n_arr = np.asarray(n, np.float64)
  if np.any(~(n_arr >= 1)):
    raise ValueError(f"bon_kl: expected n >= 1, found {n}")
  out = np.log(n_arr) - (n_arr - 1.0) / n_arr
  return float(out) if out.ndim == 0 else out


def bon_expectation(proxy_pk: np.ndarray, value_pk: np.ndarray, n: int) -> float:
  """E[value of the highest-proxy sample of a uniform n-subset of each prompt's K samples], mean over prompts.

  Exact (no resampling): sort each prompt's samples by proxy ascending; the i-th is the subset's max with
  probability C(i - 1, n - 1) / C(K, n) (best_of_n._weights: exact integers, one division, stable for any K).
  Ties in proxy go to the lower sample index (as np.argmax), so n = K gives value at argmax proxy and n = 1 the
  mean of value.
  """
  proxy, value = np.asarray(proxy_pk, np.float64), np.asarray(value_pk, np.float64)
  if proxy.ndim != 2 or proxy.shape != value.shape or proxy.shape[1] == 0:
    raise ValueError(f"bon_expectation: expected proxy and value of one shape [P, K >= 1], found {proxy.shape} "
                     f"and {value.shape}")
  if not (np.isfinite(proxy).all() and np.isfinite(value).all()):
    raise ValueError("bon_expectation: expected finite proxy and value scores, found non-finite values")
  k = proxy.shape[1]
  if not 1 <= n <= k:
    raise ValueError(f"bon_expectation: expected 1 <= n <= K = {k}, found n = {n}")
  tie_break_pk = np.broadcast_to(-np.arange(k), proxy.shape)   # equal proxy: the lower index sorts last (wins)
  order_pk = np.lexsort((tie_break_pk, proxy), axis=-1)
  value_sorted_pk = np.take_along_axis(value, order_pk, axis=1)
  return float((value_sorted_pk @ _weights(k, n, n)).mean())


# ----------------------------------------------------------------------------------------------- fits

def _fit(d, r, where: str, column) -> tuple[float, float]:
  d, r = np.asarray(d, np.float64).ravel(), np.asarray(r, np.float64).ravel()
  if d.shape != r.shape:
    raise ValueError(f"{where}: expected d and r of one length, found {d.size} and {r.size}")
  ok = np.isfinite(d) & np.isfinite(r) & (d > 0)
  if np.unique(d[ok]).size < 2:
    raise ValueError(f"{where}: expected at least 2 points with distinct finite sqrt(KL) > 0, found "
                     f"{np.unique(d[ok]).size} (of {d.size} points)")
  a = np.stack([d[ok], -column(d[ok])], axis=1)   # [points, 2]: R = alpha d - beta column(d)
  (alpha, beta), *_ = np.linalg.lstsq(a, r[ok], rcond=None)
  return float(alpha), float(beta)


def fit_bon(d, r) -> tuple[float, float]:
  """(alpha, beta) of R_bon(d) = d (alpha - beta d) by least squares over the points with d > 0 (section 3)."""
  return _fit(d, r, "fit_bon", lambda x: x * x)


def fit_rl(d, r) -> tuple[float, float]:
  """(alpha, beta) of R_RL(d) = d (alpha - beta log d) by least squares over the points with d > 0 (section 3)."""
  return _fit(d, r, "fit_rl", lambda x: x * np.log(x))


def predict_bon(d, alpha: float, beta: float) -> np.ndarray:
  """R_bon(d) = d (alpha - beta d)."""
  d = np.asarray(d, np.float64)
  return d * (alpha - beta * d)


def predict_rl(d, alpha: float, beta: float) -> np.ndarray:
  """R_RL(d) = d (alpha - beta log d), 0 at d = 0 (its limit)."""
  d = np.asarray(d, np.float64)
  log_d = np.log(np.where(d > 0, d, 1.0))
  return np.where(d > 0, d * (alpha - beta * log_d), 0.0)


def peak(kl, gold) -> tuple[float, float]:
  """(peak gold, KL at the peak): the highest finite gold (the first on ties) and its KL."""
  kl, gold = np.asarray(kl, np.float64), np.asarray(gold, np.float64)
  if kl.shape != gold.shape or not np.isfinite(gold).any():
    raise ValueError(f"peak: expected kl and gold of one length with a finite gold, found {kl.size} and "
                     f"{gold.size} points")
  i = int(np.argmax(np.where(np.isfinite(gold), gold, -np.inf)))
  return float(gold[i]), float(kl[i])


# ----------------------------------------------------------------------------------------------- table

def _arrays(c: dict, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """kl, gold, proxy_score of curve i as float64 arrays of one length >= 1."""
  where = f"curves[{i}] ({c.get('method')!r}, {c.get('proxy')!r})"
  missing = [k for k in ("method", "proxy", "kl", "gold", "proxy_score") if k not in c]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}; expected method, proxy, kl, gold, proxy_score")
  kl, gold, proxy = (np.asarray(c[k], np.float64) for k in ("kl", "gold", "proxy_score"))
  if not (kl.ndim == gold.ndim == proxy.ndim == 1) or not (len(kl) == len(gold) == len(proxy) >= 1):
    raise ValueError(f"{where}: expected kl, gold, proxy_score of one length >= 1, found {kl.shape}, "
                     f"{gold.shape}, {proxy.shape}")
  return kl, gold, proxy


def _fit_curve(method: str, kl: np.ndarray, gold: np.ndarray):
  """("bon" | "rl", alpha, beta) of one curve, alpha and beta None when the fit is impossible."""
  form, fit = ("bon", fit_bon) if method == BON else ("rl", fit_rl)
  try:
    alpha, beta = fit(np.sqrt(np.maximum(kl, 0.0)), gold - gold[0])
  except ValueError:
    alpha = beta = None
  return form, alpha, beta


def table_rows(curves: Sequence[dict]) -> list[dict]:
  """One row per curve: {"method", "proxy", "points", "peak_gold", "kl_at_peak", "final_gold", "final_kl",
  "form" ("bon" for best-of-n, else "rl"), "alpha", "beta" (None when fewer than 2 points have KL > 0),
  "seconds_to_peak" (the curve's wall_s at its peak: training seconds to reach it; None when not timed)}."""
  rows = []
  for i, c in enumerate(curves):
    kl, gold, _ = _arrays(c, i)
    peak_gold, kl_at_peak = peak(kl, gold)
    form, alpha, beta = _fit_curve(c["method"], kl, gold)
    wall = c.get("wall_s") or [None] * len(kl)
    at = int(np.argmax(gold))
    rows.append({"method": c["method"], "proxy": c["proxy"], "points": len(kl), "peak_gold": peak_gold,
                 "kl_at_peak": kl_at_peak, "final_gold": float(gold[-1]), "final_kl": float(kl[-1]),
                 "form": form, "alpha": alpha, "beta": beta,
                 "seconds_to_peak": None if wall[at] is None else float(wall[at])})
  return rows


def _fmt(x) -> str:
  return "—" if x is None else f"{x:.4g}"


def table_markdown(rows: Sequence[dict]) -> str:
  """A markdown table of table_rows (alpha, beta: R_bon = d (alpha - beta d) or R_RL = d (alpha - beta log d))."""
  lines = ["| method | proxy | points | peak gold | KL at peak | final gold | final KL | fit | alpha | beta | "
           "s to peak |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['proxy']} | {r['points']} | {_fmt(r['peak_gold'])} | "
                 f"{_fmt(r['kl_at_peak'])} | {_fmt(r['final_gold'])} | {_fmt(r['final_kl'])} | {r['form']} | "
                 f"{_fmt(r['alpha'])} | {_fmt(r['beta'])} | {_fmt(r.get('seconds_to_peak'))} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figure

def plot(curves: Sequence[dict], path, title: str = "") -> Path:
  """Gao et al. Figure 1: one panel per method, x = sqrt(KL); gold solid with markers, proxy dashed, the fitted
  gold form dotted; one colour per proxy label. Gold and proxy are on different scales, so both are drawn as
  the change from their value at the first point (the starting policy)."""
  from l2jax.eval import save_figure
  plt = _plt()
  methods = list(dict.fromkeys(c["method"] for c in curves)) or ["(no curves)"]
  proxies = list(dict.fromkeys(c["proxy"] for c in curves))
  colour = {p: plt.get_cmap("tab10")(j % 10) for j, p in enumerate(proxies)}
  timed = [c for c in curves if c.get("wall_s") and all(w is not None for w in c["wall_s"])]
  fig, axes = plt.subplots(2 if timed else 1, len(methods), figsize=(4.5 * len(methods), 7.6 if timed else 3.8),
                           squeeze=False)
  if timed:   # second row: gold and proxy against training wall-clock minutes (the timed methods)
    for ax, m in zip(axes[1], methods):
      for c in timed:
        if c["method"] == m:
          i = curves.index(c)
          _, gold, proxy = _arrays(c, i)
          t = np.asarray(c["wall_s"], float) / 60.0
          ax.plot(t, gold - gold[0], "-o", ms=3, color=colour[c["proxy"]], label=c["proxy"])
          ax.plot(t, proxy - proxy[0], "--", color=colour[c["proxy"]])
      ax.axhline(0.0, color="gray", lw=0.6)
      ax.set_xlabel("training wall-clock (minutes)")
      ax.set_title(f"{m} (against time)" if any(c["method"] == m for c in timed) else f"{m}: not timed")
  for ax, m in zip(axes[0], methods):
    for i, c in enumerate(curves):
      if c["method"] != m:
        continue
      kl, gold, proxy = _arrays(c, i)
      d = np.sqrt(np.maximum(kl, 0.0))
      ax.plot(d, gold - gold[0], "-o", ms=3, color=colour[c["proxy"]], label=c["proxy"])
      ax.plot(d, proxy - proxy[0], "--", color=colour[c["proxy"]])
      form, alpha, beta = _fit_curve(m, kl, gold)
      if alpha is not None:
        grid = np.linspace(0.0, float(d.max()), 100)
        fitted = (predict_bon if form == "bon" else predict_rl)(grid, alpha, beta)
        ax.plot(grid, fitted, ":", lw=1, color=colour[c["proxy"]])
    ax.axhline(0.0, color="gray", lw=0.6)
    ax.set_title(m)
    ax.set_xlabel("sqrt(KL) (nats^0.5)")
    ax.set_ylabel("change from the starting policy\n(gold solid, proxy dashed, fit dotted)", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, title="proxy", title_fontsize=7)
  return save_figure(fig, path, title or "reward over-optimisation against a known gold (Gao et al. Fig. 1)")


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"curves.json: cannot write a {type(x).__name__}")


def write(curves: Sequence[dict], out_dir) -> list[dict]:
  """Write curves.json, table.md and overoptimization.png into out_dir (each to a temporary file, then
  os.replace: a reader never sees half a file); returns table_rows(curves)."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rows = table_rows(curves)
  for name, text in (("curves.json", json.dumps(list(curves), indent=1, default=_json_default)),
                     ("table.md", table_markdown(rows))):
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
  tmp = out / ".overoptimization.tmp.png"
  plot(curves, tmp)
  os.replace(tmp, out / "overoptimization.png")
  return rows
