"""Interactive multi-turn chat in the Llama 2 format (Touvron et al., 2023, section 3; Meta's `chat_completion`).

  python -m l2jax.chat --ckpt DIR [--system TEXT] [--max-new-tokens N] [--temperature T] [--top-p P]

Reads one user message per line from stdin (a terminal or a pipe); `/exit` or end of input quits, `/reset`
clears the history. Each turn re-encodes the whole dialog with `encode_chat` and samples the answer. When the
dialog no longer leaves room for an answer in the context window, the oldest exchanges are dropped (never the
system prompt) and a notice saying so is printed on stderr.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from l2jax.data.tokenizer import Tokenizer, encode_chat

USER_PROMPT, ANSWER_PREFIX = "user> ", "assistant> "


def build_dialog(system: str | None, history: Sequence[tuple[str, str]], user: str) -> list[dict]:
  """Messages for `encode_chat`: optional system, the completed (user, answer) exchanges, then the new user message."""
  dialog = [{"role": "system", "content": system}] if system else []
  for u, a in history:
    dialog += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
  return dialog + [{"role": "user", "content": user}]


def fit_dialog(tok: Tokenizer, system: str | None, history: Sequence[tuple[str, str]], user: str,
               budget: int) -> tuple[list[int], int]:
  """(prompt ids, number of oldest exchanges dropped) so that len(ids) <= budget where possible.

  Drops whole exchanges from the oldest; the system prompt and the new user message are always kept, so the
  result can still exceed `budget` when they alone do (the caller decides what to do then).
  """
  dropped = 0
  ids = encode_chat(tok, build_dialog(system, history, user))
  while len(ids) > budget and dropped < len(history):
    dropped += 1
    ids = encode_chat(tok, build_dialog(system, history[dropped:], user))
  return ids, dropped


def read_line(stdin, what: str) -> str:
  """The next line of `stdin` ("" at the end); ValueError naming `what` and the byte when it is not UTF-8.

  Decodes each line's bytes itself where it can (a text stream decodes whole chunks ahead, so its error could
  not name the line; and a surrogateescape stream, as in the C locale, would pass the bad bytes on).
  """
  from l2jax.sample import check_text
  buf = getattr(stdin, "buffer", None)
  if buf is None:
    return check_text(stdin.readline(), what)
  raw = buf.readline()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{what}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start})") from None


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.chat", description="Chat with a checkpoint (Llama 2 format).")
  ap.add_argument("--ckpt", required=True, help="l2jax checkpoint directory (params/, config.json, tokenizer.model)")
  ap.add_argument("--system", default=None, help="system prompt, kept for the whole conversation")
  ap.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per turn")
  ap.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
  ap.add_argument("--top-p", type=float, default=0.9)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
  args = ap.parse_args(argv)

  from l2jax.sample import check_sampling, check_text, load_sampler
  try:  # the arguments first, before minutes of loading
    check_sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    if args.system is not None:
      check_text(args.system, "--system")
    sampler = load_sampler(args.ckpt, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tok, ctx = sampler.tokenizer, sampler.cfg.max_seq_len
  budget = ctx - min(args.max_new_tokens, ctx // 2)  # leave room for the answer
  interactive = sys.stdin.isatty()
  history: list[tuple[str, str]] = []
  turn = lineno = 0
  while True:
    if interactive:
      print(USER_PROMPT, end="", flush=True)
    lineno += 1
    try:
      line = read_line(sys.stdin, f"stdin line {lineno}")
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if not line or line.strip() == "/exit":
      break
    user = line.strip()
    if not user:
      continue
    if user == "/reset":
      history = []
      print("[history cleared]", file=sys.stderr, flush=True)
      continue
    ids, dropped = fit_dialog(tok, args.system, history, user, budget)
    if dropped:
      history = history[dropped:]
      print(f"[history truncated: dropped the {dropped} oldest exchange(s) to fit the {ctx}-token context; "
            f"the system prompt is kept]", file=sys.stderr, flush=True)
    if len(ids) >= ctx:
      print(f"[message not sent: with the system prompt it is {len(ids)} tokens, the context holds {ctx}]",
            file=sys.stderr, flush=True)
      continue
    out = sampler.generate([ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed + turn)
    answer = tok.decode([t for t in out.tokens[0, :out.lengths[0]] if t != tok.eos_id]).strip()
    print(ANSWER_PREFIX + answer, flush=True)
    history.append((user, answer))
    turn += 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
