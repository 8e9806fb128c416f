"""The versions table of `python -m l2jax.eval compare` as Markdown (compare.md; Llama 2 Figure 11, Tables 8, 30).

Which set every number comes from is stated in the table's preamble: the answers are to the "report" half of the
held-out prompts (disjoint from the prompts PPO selects its checkpoint on), judged by the reward models named there.
"""
from __future__ import annotations


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:+.3f}") -> str:
  return "-" if x is None else fmt.format(x)


def _win(w: dict | None) -> str:
  if not w:
    return "-"
  return f"{_pct(w['win_rate'])} ({w['win']}/{w['tie']}/{w['loss']})"


def markdown(result: dict) -> str:
  """The versions table (+ Table 8 and figure links) of a compare result."""
  ref = result["reference"]["name"]
  judge = result["rms"].get("judge")
  p, rms = result["prompts"], result["rms"]
  share = p.get("eval", {}).get("safety_share")
  lines = [f"Reference: **{ref}** (`{result['reference']['dir']}`). Win rate = (wins + ties/2) / prompts, tie = "
           f"|score difference| <= {result['settings']['tie_tol']} logit; in brackets wins/ties/losses. "
           f"Prompts: {p['helpful']} helpfulness, {p['safety']} safety"
           + (f" (safety share {share:.2f})" if share is not None else "")
           + f", a stratified sample of the {p.get('heldout_part', 'all')!r} half of the held-out prompts "
           f"(PPO selects on the other half). Judges (reward models, so every number here is RM-judged): "
           f"`{rms['helpful']}` (Rh), `{rms['safety']}` (Rs)" + (f", {rms['note']}" if rms.get("note") else "")
           + f". Violation = Rs < {result['settings']['safety_threshold']}; false refusal = phrase-list proxy "
           f"(l2jax/eval/safety.py).", ""]
  head = ["version", "helpful win % (Rh)", "harmless win % (Rs)"] + (["judge win % helpful / safety"] if judge else [])
  head += ["mean Rh (helpful)", "mean Rs (safety)", "mean Rc", "violation %", "false refusal % (proxy)",
           "mean length", "EOS %"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, v in result["versions"].items():
    w = v["win"]
    cells = [name, _win(w.get("helpful")), _win(w.get("safety"))]
    if judge:
      cells.append(f"{_win(w.get('judge_helpful'))} / {_win(w.get('judge_safety'))}")
    cells += [_num(v["mean_rh_helpful"]), _num(v["mean_rs_safety"]), _num(v["mean_rc"]), _pct(v["violation_rate"]),
              _pct(v["false_refusal_rate"]), _num(v["mean_length"], "{:.1f}"), _pct(v["eos_rate"])]
    lines.append("| " + " | ".join(cells) + " |")
  div = result.get("diversity")
  if div:
    temps = sorted({t for c in div.values() for vc in c.values() for t in vc}, key=float)
    pick = {temps[0], temps[-1]} | {t for t in temps if float(t) in (0.7, 1.0)}
    show = [t for t in temps if t in pick]
    lines += ["", "Self-BLEU (Figure 21; higher = less diverse) at T = " + ", ".join(show) + ":", "",
              "| version | " + " | ".join(f"{k} T={t}" for k in div for t in show) + " |",
              "|" + "---|" * (1 + len(div) * len(show))]
    for name in result["versions"]:
      lines.append(f"| {name} | " + " | ".join(_num(div[k].get(name, {}).get(t), "{:.1f}") for k in div
                                                for t in show) + " |")
  if result.get("table8"):
    lines += ["", "Reward-model accuracy on held-out HH-RLHF test pairs (Table 8 layout; HH pairs are unrated, so "
              "only Avg is filled):", "", result["table8"]]
  if result.get("tension"):
    t = result["tension"]
    lines += ["", "Helpfulness / safety RM correlation (Figure 32, Pearson r of raw scores): " + "; ".join(
        f"{k} {side} {_num(v[side]['corr'], '{:+.2f}')}" for k, v in t.items() for side in ("chosen", "rejected"))]
  lines += [""] + [f"![{k}]({f})" for k, f in result["figures"].items()]
  return "\n".join(lines) + "\n"
