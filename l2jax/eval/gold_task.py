"""The known-gold task of the over-optimisation benchmark (Gao, Schulman & Hilton 2022; Llama 2 section 3.4.1
on reward hacking): story openings, gold-labelled preference pairs, and the measurement of a policy.

A base language model (llama2.c's stories260K by default) continues story openings; a gold reward function
(l2jax.gold) scores the continuations. Everything here works on token ids the sampler produced, so the proxy
reward models score exactly the rows PPO scores (prompt ids, then the response ids, EOS only where the model
stopped on it: a continuation cut off by the token limit is scored as the unfinished text it is).

  openings(sampler, n, tokens, seed)        n distinct openings sampled from the base model itself (BOS, then
                                             `tokens` tokens at temperature 1, cut back to whole words), so no
                                             prompt is text the model was trained to complete verbatim
  continuations(sampler, texts, k, ...)      k continuations per opening; row r = prompt * k + sample, each row
                                             with its own seed from (seed, row)
  label_pairs(conts, gold, temperature, rng) gold-labelled pairs (Bradley-Terry draw at `temperature`)
  measure(policy, base, proxies, gold, ...)  held-out gold, proxy scores and KL(policy || base) (k1 per
                                             response: sum over the response tokens of log pi - log pi_0 on the
                                             policy's own samples at temperature 1)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax.data.preferences import bucket_len, rows_to_arrays
from l2jax.model import llama

SEED_STRIDE = 1_000_003


def openings(sampler, n: int, tokens: int, seed: int, batch: int = 256) -> list[str]:
  """n distinct story openings sampled from the model (BOS + `tokens` tokens at temperature 1, the last partial
  word dropped, whitespace-normalised); drawn in batches with per-row seeds until n distinct ones exist."""
  tok = sampler.tokenizer
  out, seen, drawn = [], set(), 0
  while len(out) < n:
    if drawn > 50 * n + 1000:
      raise ValueError(f"openings: only {len(out)} distinct openings of {tokens} tokens in {drawn} draws; "
                       f"use more tokens per opening or fewer prompts")
    seeds = [(seed * SEED_STRIDE + drawn + i) & 0xFFFFFFFF for i in range(batch)]
    o = sampler.generate([[tok.bos_id]] * batch, tokens, temperature=1.0, seed=seeds, stop_on_eos=True)
    drawn += batch
    for i in range(batch):
      text = " ".join(tok.decode(o.tokens[i, :o.lengths[i]]).split())
      text = text.rsplit(" ", 1)[0] if o.stop_reasons[i] != "eos" and " " in text else text
      if len(text.split()) >= 3 and text not in seen:
        seen.add(text)
        out.append(text)
        if len(out) == n:
          break
  return out


def write_prompts(path: Path, texts: Sequence[str]) -> None:
  """The openings as an RL prompt file (l2jax.data.prompts "jsonl" format; none is a safety prompt)."""
  lines = [json.dumps({"messages": [{"role": "user", "content": t}], "safety": False}) for t in texts]
  _write(path, lines)


def read_prompts(path: Path) -> list[str]:
  return [json.loads(line)["messages"][-1]["content"] for line in Path(path).read_text().splitlines() if line]


def _write(path: Path, lines: Sequence[str]) -> None:
  tmp = Path(path).with_name(Path(path).name + ".tmp")
  tmp.write_text("".join(f"{x}\n" for x in lines))
  tmp.replace(path)


def continuations(sampler, texts: Sequence[str], k: int, max_new_tokens: int, temperature: float, seed: int,
                  chunk: int = 512) -> dict:
  """k continuations of each text. Returns {"prompt_ids": [list[int]] per row, "tokens": int32 [R, N],
  "lengths": [R], "finished": bool [R], "texts": [str] (the continuation as it reads after its opening)}, with
  R = len(texts) * k and row r = prompt r // k, sample r % k."""
  tok = sampler.tokenizer
  ids = [tok.encode(t, bos=True) for t in texts]   # the "text" chat format of a base model
  rows = [ids[r // k] for r in range(len(texts) * k)]
  toks, lens, fin = [], [], []
  for s in range(0, len(rows), chunk):
    part = rows[s:s + chunk]
    seeds = [(seed * SEED_STRIDE + s + i) & 0xFFFFFFFF for i in range(len(part))]
    o = sampler.generate(part, max_new_tokens, temperature=temperature, seed=seeds)
    toks.append(o.tokens)
    lens.append(o.lengths)
    fin += [r == "eos" for r in o.stop_reasons]
  tokens = np.concatenate(toks)
  lengths = np.concatenate(lens)
  out_texts = [sampler.decode_new(rows[r], tokens[r, :lengths[r]]) for r in range(len(rows))]
  return {"prompt_ids": rows, "tokens": tokens, "lengths": lengths, "finished": np.array(fin, bool),
          "texts": out_texts}


def label_pairs(texts: Sequence[str], conts: dict, gold: Callable, temperature: float,
                rng: np.random.Generator) -> tuple[list[dict], dict]:
  """Preference records (l2jax.data.preferences "jsonl" format plus the gold scores) from 2 continuations per
  opening: each pair labelled by a Bradley-Terry draw on the gold scores at `temperature` (the label noise;
  l2jax.gold.bt_labels). Returns (records, stats {pairs, label_gold_agreement, expected_agreement})."""
  from l2jax import gold as gold_lib
  g = gold(conts["texts"])
  a, b = g[0::2], g[1::2]
  a_wins = gold_lib.bt_labels(a, b, temperature, rng)
  p_a = gold_lib.bt_probability(a, b, temperature)
  recs = []
  for i, text in enumerate(texts):
    ia, ib = (2 * i, 2 * i + 1) if a_wins[i] else (2 * i + 1, 2 * i)
    recs.append({"prompt": text, "chosen": conts["texts"][ia], "rejected": conts["texts"][ib],
                 "chosen_finished": bool(conts["finished"][ia]), "rejected_finished": bool(conts["finished"][ib]),
                 "gold_chosen": float(g[ia]), "gold_rejected": float(g[ib]),
                 "p_chosen": float(p_a[i] if a_wins[i] else 1.0 - p_a[i])})
  differ = a != b
  agree = np.where(a_wins, a > b, b > a)[differ]
  return recs, {"pairs": len(recs), "label_gold_agreement": float(agree.mean()) if agree.size else float("nan"),
                "expected_agreement": gold_lib.expected_agreement(a, b, temperature),
                "tied_gold": int((~differ).sum())}


def write_pairs(path: Path, recs: Sequence[dict]) -> None:
  _write(path, [json.dumps(r) for r in recs])


# ----------------------------------------------------------------------------------------------- scoring

def token_rows(conts: dict) -> list[list[int]]:
  """[prompt ids | response ids] per row; the response keeps its EOS where the model stopped on it."""
  return [list(p) + [int(t) for t in conts["tokens"][r, :conts["lengths"][r]]]
          for r, p in enumerate(conts["prompt_ids"])]


@jax.jit
def _response_logprob_sums(model_gp, tokens_bt, start_b, end_b):
  """sum_t log p(tokens[t] | tokens[:t]) over start <= t < end of each row (float32 [B])."""
  graphdef, params = model_gp
  logits = nnx.merge(graphdef, params)(tokens_bt).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tok_lp = jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1)[..., 0]   # [B, T-1] for positions 1..T-1
  t = jnp.arange(1, tokens_bt.shape[1])[None, :]
  m = (t >= start_b[:, None]) & (t < end_b[:, None])
  return jnp.sum(jnp.where(m, tok_lp, 0.0), axis=1)


class LM:
  """A language model's (graphdef, params) for teacher-forced response log-probabilities."""

  def __init__(self, cfg, params):
    self.graphdef = llama.split(llama.abstract(cfg.replace(dtype="float32")))[0]
    self.params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

  @classmethod
  def load(cls, ckpt_dir) -> "LM":
    from l2jax import checkpoint
    cfg, params = checkpoint.load_model_dir(ckpt_dir)
    return cls(cfg, params)

  def response_logprobs(self, conts: dict, eos_id: int, pad_id: int, batch: int = 256) -> np.ndarray:
    """float64 [R]: log p(response | prompt) of every row under this model."""
    rows = token_rows(conts)
    out = np.zeros(len(rows))
    for s in range(0, len(rows), batch):
      part = rows[s:s + batch]
      T = bucket_len(max(len(r) for r in part), 1 << 30)
      tokens, _ = rows_to_arrays(part + [[pad_id]] * (batch - len(part)), T, pad_id)
      start = np.array([len(p) for p in conts["prompt_ids"][s:s + batch]] + [1] * (batch - len(part)), np.int32)
      end = np.array([len(r) for r in part] + [1] * (batch - len(part)), np.int32)
      out[s:s + len(part)] = np.asarray(_response_logprob_sums((self.graphdef, self.params), tokens, start, end)
                                        )[:len(part)]
    return out


def proxy_scores(rm, conts: dict, eos_id: int) -> np.ndarray:
  """float64 [R]: a reward model's raw score of every row, read at its last token (as PPO reads it)."""
  rows = token_rows(conts)
  out = np.zeros(len(rows))
  bs = rm.batch_size
  for s in range(0, len(rows), bs):
    part = rows[s:s + bs]
    T = bucket_len(max(len(r) for r in part), 1 << 30)
    tokens, mask = rows_to_arrays(part + [[]] * (bs - len(part)), T, rm.tokenizer.pad_id)
    out[s:s + len(part)] = np.asarray(rm.score_tokens(tokens, mask))[:len(part)]
  return out


def measure(sampler, policy: LM, base: LM, proxies: Mapping[str, object], gold: Callable, texts: Sequence[str], *,
            samples_per_prompt: int, max_new_tokens: int, seed: int) -> dict:
  """A policy on held-out openings: {"gold", "proxy": {label: mean raw score}, "kl" (mean k1 per response),
  "kl_se" (its standard error), "response_len", "finished"}; `sampler` samples from the policy at temperature 1."""
  tok = sampler.tokenizer
  conts = continuations(sampler, texts, samples_per_prompt, max_new_tokens, 1.0, seed)
  lp = policy.response_logprobs(conts, tok.eos_id, tok.pad_id)
  lp0 = base.response_logprobs(conts, tok.eos_id, tok.pad_id)
  kl = lp - lp0
  g = np.asarray(gold(conts["texts"]), np.float64)
  return {"gold": float(g.mean()), "gold_se": float(g.std() / np.sqrt(len(g))),
          "proxy": {k: float(proxy_scores(rm, conts, tok.eos_id).mean()) for k, rm in proxies.items()},
          "kl": float(kl.mean()), "kl_se": float(kl.std() / np.sqrt(len(kl))),
          "response_len": float(conts["lengths"].mean()), "finished": float(conts["finished"].mean())}


__all__ = ["openings", "write_prompts", "read_prompts", "continuations", "label_pairs", "write_pairs", "LM",
           "proxy_scores", "measure", "token_rows"]
