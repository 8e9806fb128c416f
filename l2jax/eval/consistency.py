"""Multi-turn consistency (Llama 2 Table 30) and attention to the instruction (Figure 10), with and without GAtt.

Held-out dialogs of `turns` user turns each get an instruction with an automatic checker, given in the FIRST
turn only (system prompt by default); every model answers the turns one after another with its own previous
answers in the history (l2jax.data.gatt.converse, mode "first": when the history outgrows the context, exchange 1,
which carries the instruction, is kept and the oldest exchanges after it are dropped). Consistency at turn t is
the share of answers at turn t that satisfy the instruction (l2jax.data.gatt.consistency; per kind too).

Figure 10: on one dialog (the first held-out dialog with the first model's answers, as many turns as fit the
context), the max attention weight from each later token to the instruction's tokens over all layers and heads
(l2jax.eval.attention), binned along the dialog, for every model on the same tokens.

Writes {stem}.json, {stem}.md (the Table 30 layout: turns 2, 4, 6, 20) and {stem}.png (curves), and
attention.json / attention.png.

  python -m l2jax.eval.consistency --ckpt runs/gatt-tiny/final --ckpt runs/sft-tiny/final --label GAtt \
      --label baseline --kinds start_word,capitals,end_sign --max-user-words 8 --out runs/consistency
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from l2jax.data import gatt as gd

TABLE_TURNS = (2, 4, 6, 20)


def check_kinds(kinds: Sequence[str]) -> None:
  """ValueError (one line listing the kinds) when `kinds` is empty or names a kind that does not exist."""
  bad = [k for k in kinds if k not in gd.CHECKERS]
  if bad or not kinds:
    checkable = [k for k, v in gd.CHECKERS.items() if v]
    raise ValueError(f"--kinds: unknown constraint kind {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                     f"{', '.join(gd.KINDS)} (automatic checkers: {', '.join(checkable)})")


def eval_dialogs(users_per_dialog: Sequence[Sequence[str]], n: int, turns: int, kinds: Sequence[str], lists,
                 *, seed: int, max_per_instruction: int = 1, short_prob: float = 0.5,
                 max_user_words: int = 0) -> tuple[list, list]:
  """(instructions, user turns) of `n` evaluation dialogs of `turns` turns from held-out dialogs (cycled), each
  with an instruction drawn from the checkable `kinds` only; follow-ups come from the held-out users."""
  check_kinds(kinds)
  kinds = [k for k in kinds if gd.CHECKERS[k] is not None]
  if not kinds:
    raise ValueError("consistency: none of the constraint kinds has an automatic checker "
                     f"(checkers exist for {[k for k, v in gd.CHECKERS.items() if v]})")
  pool = [u for us in users_per_dialog for u in us]
  if not pool:
    raise ValueError("consistency: no held-out user messages")
  insts, users = [], []
  for j in range(n):
    rng = np.random.default_rng([seed, 7, j])
    insts.append(gd.sample_instruction(rng, lists, kinds, min(max_per_instruction, len(kinds)), short_prob))
    users.append(gd.dialog_users(users_per_dialog[j % len(users_per_dialog)], pool, turns, rng, max_user_words))
  return insts, users


def evaluate(samplers: dict, insts, users, *, turns: int, lists=None, placement: str = "system",
             max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> dict:
  """{label: {"consistency": ..., "answers": [[...]], "stops": [...]}} for each sampler (label -> Sampler or a
  callable returning one, so only one model is loaded at a time)."""
  out = {}
  for label, s in samplers.items():
    sampler = s() if callable(s) else s
    res = gd.converse(sampler, insts, users, mode="first", placement=placement, lists=lists,
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    answers = [r["answers"] for r in res]
    out[label] = {"consistency": gd.consistency(insts, answers, turns, lists), "answers": answers,
                  "stops": [r["stop"] for r in res]}
    print(f"consistency {label}: " + ", ".join(f"turn {t}: {_pct(out[label]['consistency']['all'], t)}"
                                               for t in TABLE_TURNS if t <= turns), file=sys.stderr)
  return out


def _pct(values, t) -> str:
  v = values[t - 1] if t - 1 < len(values) else None
  return "n/a" if v is None else f"{100 * v:.0f}%"


def table(results: dict, turns: int) -> str:
  """Markdown laid out like Table 30: one row per model (and per constraint kind), turns 2, 4, 6, 20."""
  cols = [t for t in TABLE_TURNS if t <= turns]
  lines = ["| model | " + " | ".join(f"turn {t}" for t in cols) + " |", "|---|" + "---:|" * len(cols)]
  for label, r in results.items():
    c = r["consistency"]
    lines.append(f"| {label} | " + " | ".join(_pct(c["all"], t) for t in cols) + " |")
    for kind in sorted(c["by_kind"]):
      lines.append(f"| {label}: {kind} | " + " | ".join(_pct(c["by_kind"][kind], t) for t in cols) + " |")
  return "\n".join(lines) + "\n"


def attention_figure(params_by_label: dict, cfg_by_label: dict, tok, inst, users, answers, *, placement: str,
                     bins: int) -> dict:
  """Figure 10's data for one dialog: per model, binned max attention to the instruction's tokens."""
  from l2jax.data.tokenizer import B_INST, B_SYS, E_SYS, encode_chat_with_mask
  from l2jax.eval import attention
  max_len = min(c.max_seq_len for c in cfg_by_label.values())
  k = len(answers)
  while k > 1 and len(encode_chat_with_mask(tok, gd.placed_messages(inst, users[:k], answers[:k], placement))[0]) > max_len:
    k -= 1
  ids = encode_chat_with_mask(tok, gd.placed_messages(inst, users[:k], answers[:k], placement))[0][:max_len]
  before = f"{B_INST} " + (B_SYS if placement == "system" else "")
  after = (E_SYS if placement == "system" else "\n") + users[0]
  span = attention.token_span(tok, before, inst.text, after)
  turn_starts = [i for i, t in enumerate(ids) if t == tok.bos_id]
  out = {"instruction": inst.text, "span": list(span), "tokens": len(ids), "turns": k, "turn_starts": turn_starts,
         "models": {}}
  for label, params in params_by_label.items():
    m_t = attention.attention_to_span(params, cfg_by_label[label], ids, span)
    x, y = attention.binned(m_t, span[1], bins)
    out["models"][label] = {"bin_centres": x.tolist(), "max_attention": [None if np.isnan(v) else float(v) for v in y]}
  return out


def plot(results: dict, attn: dict | None, out_dir: Path, stem: str) -> list[str]:
  """consistency PNG (share vs turn per model) and attention PNG (Figure 10). [] without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("consistency: matplotlib is not installed; no PNG written", file=sys.stderr)
    return []
  written = []
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, r in results.items():
    c = r["consistency"]
    ax.plot(c["turns"], [np.nan if v is None else 100 * v for v in c["all"]], marker="o", ms=3, label=label)
  ax.set(xlabel="turn", ylabel="answers following the instruction (%)", ylim=(-5, 105),
         title="Multi-turn consistency (Table 30)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_dir / f"{stem}.png", dpi=120)
  plt.close(fig)
  written.append(str(out_dir / f"{stem}.png"))
  if attn:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, m in attn["models"].items():
      ax.plot(m["bin_centres"], [np.nan if v is None else v for v in m["max_attention"]], marker="o", ms=3,
              label=label)
    for s in attn["turn_starts"][1:]:
      ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.axvspan(*attn["span"], color="orange", alpha=0.3, label="instruction")
    ax.set(xlabel="token position (dotted: turn starts)", ylabel="max attention to instruction",
           title="Attention to the instruction (Figure 10)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "attention.png", dpi=120)
    plt.close(fig)
    written.append(str(out_dir / "attention.png"))
  return written


def write_report(results: dict, attn: dict | None, out_dir: str | Path, *, turns: int, meta: dict | None = None,
                 insts=None, users=None, stem: str = "consistency") -> dict:
  """Write {stem}.json, {stem}.md, PNGs and attention.json to out_dir; returns the summary dict."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  md = table(results, turns)
  summary = {"meta": meta or {}, "table_turns": [t for t in TABLE_TURNS if t <= turns],
             "models": {k: v["consistency"] for k, v in results.items()}}
  dialogs = []
  for j in range(len(insts or [])):
    dialogs.append({"instruction": insts[j].to_json(), "users": users[j],
                    **{label: {"answers": r["answers"][j], "stop": r["stops"][j]} for label, r in results.items()}})
  summary["dialogs"] = dialogs
  (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
  (out_dir / f"{stem}.md").write_text(md)
  if attn is not None:
    (out_dir / "attention.json").write_text(json.dumps(attn, indent=1) + "\n")
  summary["png"] = plot(results, attn, out_dir, stem)
  return summary


def run_eval(ckpts: dict, held_out_users, *, out_dir, n: int, turns: int, kinds, lists, placement="system",
             max_per_instruction=1, short_prob=0.5, max_user_words=0, max_new_tokens=128, temperature=0.0, seed=1,
             bins=20, dtype=None, meta=None) -> dict:
  """Evaluate every checkpoint dir (label -> dir) and write the report; the stage and the CLI both call this."""
  from l2jax import checkpoint
  from l2jax.sample import load_sampler
  insts, users = eval_dialogs(held_out_users, n, turns, kinds, lists, seed=seed,
                              max_per_instruction=max_per_instruction, short_prob=short_prob,
                              max_user_words=max_user_words)
  results = evaluate({k: (lambda d=d: load_sampler(str(d), dtype=dtype)) for k, d in ckpts.items()}, insts, users,
                     turns=turns, lists=lists, placement=placement, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed)
  first = next(iter(ckpts))
  loaded = {k: checkpoint.load_model_dir(str(d)) for k, d in ckpts.items()}
  from l2jax.data.tokenizer import Tokenizer
  tok = Tokenizer(Path(ckpts[first]) / checkpoint.TOKENIZER)
  attn = attention_figure({k: v[1] for k, v in loaded.items()}, {k: v[0] for k, v in loaded.items()}, tok,
                          insts[0], users[0], results[first]["answers"][0], placement=placement, bins=bins)
  meta = {**(meta or {}), "checkpoints": {k: str(v) for k, v in ckpts.items()}, "dialogs": n, "turns": turns,
          "kinds": list(kinds), "placement": placement, "temperature": temperature, "seed": seed}
  return write_report(results, attn, out_dir, turns=turns, meta=meta, insts=insts, users=users)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.eval.consistency", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", action="append", required=True, help="l2jax checkpoint directory; repeat per model")
  ap.add_argument("--label", action="append", default=[], help="a name per --ckpt (default: the directory)")
  ap.add_argument("--data", default="data/oasst/en_100_tree.jsonl", help="dialogs whose user turns are used")
  ap.add_argument("--data-kind", default="oasst", choices=("messages", "oasst", "gsm8k"))
  ap.add_argument("--eval-every-nth", type=int, default=10, help="use every n-th dialog (the GAtt stage's held-out)")
  ap.add_argument("--dialogs", type=int, default=50)
  ap.add_argument("--turns", type=int, default=20)
  ap.add_argument("--kinds", default="start_word,capitals,end_sign,language")
  ap.add_argument("--placement", default="system", choices=gd.PLACEMENTS)
  ap.add_argument("--max-user-words", type=int, default=0)
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--bins", type=int, default=20)
  ap.add_argument("--lists-dir", default="data/gatt")
  ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
  ap.add_argument("--out", required=True, help="output directory")
  args = ap.parse_args(argv)
  if args.label and len(args.label) != len(args.ckpt):
    print(f"error: {len(args.label)} --label for {len(args.ckpt)} --ckpt", file=sys.stderr)
    return 2
  kinds = [k for k in args.kinds.split(",") if k]
  try:
    check_kinds(kinds)
    missing = [d for d in args.ckpt if not (Path(d) / "config.json").is_file()]
    if missing:
      raise FileNotFoundError(f"--ckpt {missing[0]}: not an l2jax checkpoint directory (no config.json)")
    from l2jax.data import dialogs as dl
    from l2jax.stages.common import split_documents
    lists = gd.load_lists(args.lists_dir)
    src = dl.open_dialogs(args.data_kind, (args.data,))
    held = split_documents(src, args.eval_every_nth)[1] if args.eval_every_nth > 0 else src
    labels = args.label or [str(c) for c in args.ckpt]
    s = run_eval(dict(zip(labels, args.ckpt)), gd.user_turns(held), out_dir=args.out, n=args.dialogs,
                 turns=args.turns, kinds=kinds, lists=lists, placement=args.placement,
                 max_user_words=args.max_user_words, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, seed=args.seed, bins=args.bins, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table({k: {"consistency": v} for k, v in s["models"].items()}, args.turns), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
