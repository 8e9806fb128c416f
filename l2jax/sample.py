"""Sampling: prefill + on-device decode loop, temperature / top-k / top-p, per-row stop rules, log-probabilities.

One jitted program per shape does everything: the prompts (right-padded, positions 0..len-1) are prefilled in
one pass into a grouped KV cache [layers, B, S, n_kv, head_dim]; each row's first new token is drawn from the
logits at its own last prompt position; then a `jax.lax.while_loop` decodes one token per row per iteration,
each row writing its cache at its own position, until every row has stopped. No Python runs per token.

A row stops (independently) on:
  "eos"     a stop token (EOS, with `stop_on_eos`, or any id in `stop_ids`); the stop token is kept and counted;
  "length"  `max_new_tokens` new tokens;
  "context" prompt + new tokens == cfg.max_seq_len (the whole sequence always fits the context, so it can be
            scored again with one forward pass, as PPO does).

Sampling distribution (Holtzman et al., 2019 for top-p): logits / T, keep the k largest (top-k), renormalise,
keep the smallest prefix of the sorted tokens whose probability mass reaches p (top-p); ties with the last kept
logit are kept. T = 0 is greedy (argmax; its sampling log-probability is 0, a point mass).

Randomness: row r draws from `fold_in(key(seed), r)` for an int seed, or `fold_in(key(seeds[r]), 0)` for a list,
split once per step; so a row's tokens do not depend on the other rows, and `seed=s` for one prompt equals
`seed=[..., s, ...]` for that prompt inside a batch.

  python -m l2jax.sample --ckpt DIR --prompt "Once upon a time" [--prompt ...] [--max-new-tokens N]
      [--temperature T] [--top-p P] [--top-k K] [--seed S]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax import sharding
from l2jax.model import llama
from l2jax.model.config import LlamaConfig
from l2jax.sharding import constrain


class SampleOutput(NamedTuple):
  """What `Sampler.generate` returns (numpy arrays; B rows, N = max_new_tokens)."""
  tokens: np.ndarray          # [B, N] int32 new tokens; pad_id after each row's length
  lengths: np.ndarray         # [B] int32 new tokens per row, counting the stop token (EOS) when one ended the row
  logprobs: np.ndarray        # [B, N] float32 log p(token) under the sampling distribution (T, top-k, top-p); 0 greedy
  model_logprobs: np.ndarray  # [B, N] float32 log_softmax(raw logits)[token]: the unmodified model (for PPO / KL)
  stop_reasons: list[str]     # per row: "eos", "length" or "context"
  logits: np.ndarray | None = None  # [B, N, V] raw float32 logits of each step (only with return_logits=True)

  def mask(self) -> np.ndarray:
    """[B, N] bool: True on each row's generated tokens."""
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def _bucket(n: int, minimum: int = 1, multiple: int = 1) -> int:
  """The next power of two >= max(n, minimum), rounded up to `multiple` (limits recompiles)."""
  b = 1 << max(0, (max(n, minimum) - 1).bit_length())
  return -(-b // multiple) * multiple


def process_logits(logits_bv: jax.Array, temperature, top_k, top_p, *, use_top_k: bool, use_top_p: bool):
  """The sampling distribution's logits: logits / T, then top-k, then top-p on the renormalised rest; -inf elsewhere.

  temperature > 0; top_k <= 0 keeps all; top_p >= 1 keeps all. Always keeps at least the largest logit.
  """
  x_bv = logits_bv.astype(jnp.float32) / temperature
  if not (use_top_k or use_top_p):
    return x_bv
  V = x_bv.shape[-1]
  sorted_bv = -jnp.sort(-x_bv, axis=-1)  # descending
  idx_v = jnp.arange(V)
  keep_n = jnp.where(top_k > 0, jnp.minimum(top_k, V), V) if use_top_k else jnp.asarray(V)
  keep_n_b = jnp.broadcast_to(keep_n, x_bv.shape[:-1])
  if use_top_p:
    in_k_bv = idx_v < keep_n_b[:, None]
    probs_bv = jax.nn.softmax(jnp.where(in_k_bv, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # probability of the larger tokens
    n_p_b = jnp.sum(in_k_bv & (mass_before_bv < top_p), axis=-1)
    keep_n_b = jnp.where(top_p >= 1.0, keep_n_b, jnp.maximum(n_p_b, 1))
  threshold_b1 = jnp.take_along_axis(sorted_bv, keep_n_b[:, None] - 1, axis=-1)
  return jnp.where(x_bv >= threshold_b1, x_bv, -jnp.inf)


def choose_tokens(keys_b, logits_bv, temperature, top_k, top_p, *, greedy: bool, use_top_k: bool, use_top_p: bool):
  """(tokens [B], sampling log-probs [B], model log-probs [B]) for one step; greedy is argmax with log-prob 0."""
  logits_bv = logits_bv.astype(jnp.float32)
  model_lp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  if greedy:
    tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    lp_b = jnp.zeros(tok_b.shape, jnp.float32)
  else:
    proc_bv = process_logits(logits_bv, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    tok_b = jax.vmap(jax.random.categorical)(keys_b, proc_bv).astype(jnp.int32)
    lp_b = jnp.take_along_axis(jax.nn.log_softmax(proc_bv, axis=-1), tok_b[:, None], axis=-1)[:, 0]
  mlp_b = jnp.take_along_axis(model_lp_bv, tok_b[:, None], axis=-1)[:, 0]
  return tok_b, lp_b, mlp_b


def _head(model: llama.Llama, h_bd: jax.Array) -> jax.Array:
  """float32 logits [B, V] from final-normed hidden states [B, D], as `Llama.__call__` computes them."""
  logits_bv = jnp.einsum("bd,dv->bv", h_bd, model.lm_head[...].astype(h_bd.dtype))
  return constrain(logits_bv, ("batch", "vocab")).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "n_out", "mode", "mesh", "return_logits"))
def _generate(params, tokens_bp, lens_b, limits_b, keys_b, temperature, top_k, top_p, stop_ids_s, pad_id, *,
              graphdef, cache_len: int, n_out: int, mode: tuple[bool, bool, bool], mesh, return_logits: bool):
  """Prefill + decode loop. Weights are an argument (never closed over); shapes are static."""
  greedy, use_top_k, use_top_p = mode
  rules = sharding.use_rules(mesh, sharding.SAMPLE_RULES) if mesh is not None else contextlib.nullcontext()
  with rules:
    model = nnx.merge(graphdef, params)
    cfg: LlamaConfig = model.cfg
    B, P = tokens_bp.shape
    rows_b = jnp.arange(B)
    choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               greedy=greedy, use_top_k=use_top_k, use_top_p=use_top_p)
    split = jax.vmap(lambda k: tuple(jax.random.split(k)))

    def stopped(tok_b, n_b):
      return jnp.any(tok_b[:, None] == stop_ids_s[None, :], axis=-1) | (n_b >= limits_b)

    # Prefill: all prompt tokens in one pass, right-padded; pad slots are overwritten before they are visible.
    cache = llama.KVCache.zeros(cfg, B, cache_len)
    cache = llama.KVCache(*(constrain(c, llama.CACHE_AXES) for c in cache))
    positions_bp = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h_bpd, cache = model.hidden(tokens_bp, positions_bp, None, cache)
    logits_bv = _head(model, h_bpd[rows_b, lens_b - 1])
    keys_b, sub_b = split(keys_b)
    tok_b, lp_b, mlp_b = choose(sub_b, logits_bv)
    out = dict(tokens=jnp.full((B, n_out), pad_id, jnp.int32).at[:, 0].set(tok_b),
               logprobs=jnp.zeros((B, n_out), jnp.float32).at[:, 0].set(lp_b),
               model_logprobs=jnp.zeros((B, n_out), jnp.float32).at[:, 0].set(mlp_b))
    if return_logits:
      out["logits"] = jnp.zeros((B, n_out, cfg.vocab_size), jnp.float32).at[:, 0].set(logits_bv)
    n_b = jnp.ones((B,), jnp.int32)
    state = (jnp.int32(1), cache, tok_b, lens_b, stopped(tok_b, n_b), n_b, keys_b, out)

    def cond(state):
      step, *_, done_b, _, _, _ = state
      return (step < n_out) & ~jnp.all(done_b)

    def body(state):  # feed each live row's last token at its own position, draw the next one
      step, cache, tok_b, pos_b, done_b, n_b, keys_b, out = state
      model = nnx.merge(graphdef, params)
      pos_b = jnp.minimum(pos_b, cache_len - 1)  # finished rows keep running harmlessly in the last slot
      h_b1d, cache = model.hidden(tok_b[:, None], pos_b[:, None], None, cache)
      logits_bv = _head(model, h_b1d[:, 0])
      keys_b, sub_b = split(keys_b)
      new_b, lp_b, mlp_b = choose(sub_b, logits_bv)
      live_b = ~done_b
      col = lambda buf, v: buf.at[:, step].set(jnp.where(live_b.reshape((B,) + (1,) * (v.ndim - 1)), v, buf[:, step]))
      out = dict(out, tokens=col(out["tokens"], new_b), logprobs=col(out["logprobs"], lp_b),
                 model_logprobs=col(out["model_logprobs"], mlp_b))
      if return_logits:
        out["logits"] = col(out["logits"], logits_bv)
      n_b = n_b + live_b.astype(jnp.int32)
      done_b = done_b | stopped(new_b, n_b)
      return step + 1, cache, jnp.where(live_b, new_b, tok_b), pos_b + 1, done_b, n_b, keys_b, out

    state = jax.lax.while_loop(cond, body, state)
    return state[5], state[7]


class Sampler:
  """Batched generation with an l2jax Llama.

  model: an `nnx` Llama, or (graphdef, params) / (graphdef, params, cfg) as `llama.split` gives.
  tokenizer: an `l2jax.data.tokenizer.Tokenizer` (needed for `complete` and the EOS / BOS ids).
  dtype: compute dtype for sampling (default the model config's); weights are cast to it once, so no per-step
         cast happens ("bfloat16" halves the weight traffic of a float32 model).
  mesh: optional Mesh; parameters are placed by their logical axes under SAMPLE_RULES, the batch and cache on
        the "batch" axes, and the program is traced under `use_rules(mesh, SAMPLE_RULES)`.
  """

  def __init__(self, model: Any, tokenizer=None, *, dtype: str | None = None, mesh=None,
               eos_id: int | None = None, pad_id: int | None = None):
    if isinstance(model, tuple):
      graphdef, params = model[0], model[1]
      cfg = model[2] if len(model) > 2 else nnx.merge(graphdef, params).cfg
    else:
      graphdef, params = llama.split(model)
      cfg = model.cfg
    if dtype is not None and dtype != cfg.dtype:
      cfg = cfg.replace(dtype=dtype)
    self.cfg: LlamaConfig = cfg
    abstract_model = llama.abstract(cfg)
    self.graphdef = llama.split(abstract_model)[0]  # static: rebuilt so that it carries the sampling config
    dt = jnp.dtype(cfg.dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dt) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                          else jnp.asarray(a), params)
    self.mesh = mesh
    if mesh is not None:
      shardings = sharding.tree_shardings(llama.logical_axes(abstract_model), mesh, sharding.SAMPLE_RULES, params)
      params = jax.device_put(params, shardings)
    self.params = params
    self.tokenizer = tokenizer
    self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else 2)
    self.bos_id = tokenizer.bos_id if tokenizer is not None else 1
    self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)

  def _batch_multiple(self) -> int:
    if self.mesh is None:
      return 1
    spec = sharding.logical_to_spec(("batch",), sharding.SAMPLE_RULES, self.mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

  def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    cfg = self.cfg
    if isinstance(prompts, (str, bytes)) or not len(prompts):
      raise ValueError(f"prompts: expected a non-empty list of token-id lists, found {type(prompts).__name__} "
                       f"{prompts!r:.60}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens: expected a positive int, found {max_new_tokens!r}")
    out = []
    for i, p in enumerate(prompts):
      p = [int(t) for t in p]
      if not p:
        raise ValueError(f"prompt {i}: empty; a prompt needs at least one token (e.g. BOS)")
      if min(p) < 0 or max(p) >= cfg.vocab_size:
        raise ValueError(f"prompt {i}: token ids must be in [0, {cfg.vocab_size}), found {min(p)}..{max(p)}")
      if len(p) >= cfg.max_seq_len:
        raise ValueError(f"prompt {i}: {len(p)} tokens leave no room to generate in the context of "
                         f"max_seq_len={cfg.max_seq_len} tokens (prompt + new tokens must fit); shorten it")
      out.append(p)
    return out

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0, stop_on_eos: bool = True,
               stop_ids: Sequence[int] = (), return_logits: bool = False) -> SampleOutput:
    """Generate up to `max_new_tokens` tokens after each prompt (token-id lists of different lengths)."""
    cfg = self.cfg
    prompts = self._check(prompts, max_new_tokens)
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
      raise ValueError(f"expected temperature >= 0, 0 < top_p <= 1, top_k >= 0; found "
                       f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    limits = np.minimum(max_new_tokens, cfg.max_seq_len - lens).astype(np.int32)
    Bb = _bucket(B, 1, self._batch_multiple())
    P = min(_bucket(int(lens.max()), 16), cfg.max_seq_len)
    cache_len = min(max(P, _bucket(int((lens + limits).max()), 16)), cfg.max_seq_len)
    n_out = _bucket(max_new_tokens, 16)
    tokens = np.full((Bb, P), self.pad_id, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    lens_b = np.concatenate([lens, np.ones(Bb - B, np.int32)])   # padding rows: one token, stop at once
    limits_b = np.concatenate([limits, np.ones(Bb - B, np.int32)])
    seeds = [seed] * B if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if len(seeds) != B:
      raise ValueError(f"seed: expected an int or one seed per prompt ({B}), found {len(seeds)} seeds")
    row = range(B) if isinstance(seed, (int, np.integer)) else [0] * B
    keys = [jax.random.fold_in(jax.random.key(s), r) for s, r in zip(seeds, row)]
    keys_b = jnp.stack(keys + [jax.random.key(0)] * (Bb - B))
    stops = sorted(set(int(s) for s in stop_ids) | ({self.eos_id} if stop_on_eos else set())) or [-1]
    greedy = temperature == 0
    mode = (greedy, (not greedy) and top_k > 0, (not greedy) and top_p < 1.0)
    args = (tokens, lens_b, limits_b, keys_b)
    if self.mesh is not None:
      batch_sh = lambda x: jax.sharding.NamedSharding(self.mesh, sharding.logical_to_spec(
          ("batch",) + (None,) * (x.ndim - 1), sharding.SAMPLE_RULES, self.mesh))
      args = tuple(jax.device_put(x, batch_sh(x)) for x in args)
    n_b, out = _generate(self.params, *args, jnp.float32(temperature or 1.0), jnp.int32(top_k),
                         jnp.float32(top_p), jnp.asarray(stops, jnp.int32), jnp.int32(self.pad_id),
                         graphdef=self.graphdef, cache_len=cache_len, n_out=n_out, mode=mode, mesh=self.mesh,
                         return_logits=return_logits)
    n_b, out = jax.device_get((n_b, out))
    n_b = np.asarray(n_b[:B], np.int32)
    N = max_new_tokens
    toks = np.asarray(out["tokens"][:B, :N])
    last = toks[np.arange(B), n_b - 1]
    reasons = ["eos" if t in stops else "length" if n >= max_new_tokens else "context" for t, n in zip(last, n_b)]
    return SampleOutput(toks, n_b, np.asarray(out["logprobs"][:B, :N]), np.asarray(out["model_logprobs"][:B, :N]),
                        reasons, np.asarray(out["logits"][:B, :N]) if return_logits else None)

  def complete(self, texts: Sequence[str], max_new_tokens: int = 128, **kw) -> list[str]:
    """Continuations of `texts` (each encoded with BOS first), without the stop token."""
    if self.tokenizer is None:
      raise ValueError("Sampler.complete needs a tokenizer: Sampler(model, tokenizer=Tokenizer(path))")
    if isinstance(texts, str):
      raise ValueError("complete: expected a list of strings, found one string; wrap it in a list")
    prompts = [self.tokenizer.encode(t, bos=True) for t in texts]
    out = self.generate(prompts, max_new_tokens, **kw)
    return [self.decode_new(p, out.tokens[i, :out.lengths[i]]) for i, p in enumerate(prompts)]

  def decode_new(self, prompt: Sequence[int], new: Sequence[int]) -> str:
    """Text of `new` as it continues `prompt` (keeps the leading space SentencePiece drops at a start)."""
    tok = self.tokenizer
    new = [int(t) for t in new if int(t) not in (tok.eos_id, tok.bos_id)]
    head, full = tok.decode(prompt), tok.decode(list(prompt) + new)
    return full[len(head):] if full.startswith(head) else tok.decode(new)


def load_sampler(ckpt: str, dtype: str | None = None, mesh=None) -> Sampler:
  """A Sampler for an l2jax checkpoint directory (model + its tokenizer.model)."""
  from pathlib import Path

  import l2jax
  from l2jax import checkpoint
  from l2jax.data.tokenizer import Tokenizer
  model = l2jax.load(ckpt)
  tok_path = Path(ckpt) / checkpoint.TOKENIZER
  if not tok_path.is_file():
    raise FileNotFoundError(f"{tok_path}: the checkpoint directory has no tokenizer.model")
  return Sampler(model, Tokenizer(tok_path), dtype=dtype, mesh=mesh)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.sample", description="Sample completions from a checkpoint.")
  ap.add_argument("--ckpt", required=True, help="l2jax checkpoint directory (params/, config.json, tokenizer.model)")
  ap.add_argument("--prompt", action="append", required=True,
                  help="prompt text, encoded with BOS first; repeat for a batch")
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
  ap.add_argument("--top-p", type=float, default=0.9)
  ap.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                  help="compute and weight dtype for sampling (default: the checkpoint config's dtype)")
  args = ap.parse_args(argv)
  try:
    sampler = load_sampler(args.ckpt, dtype=args.dtype)
    t0 = time.perf_counter()
    texts = sampler.complete(args.prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f"=== {i}: {args.prompt[i]!r}")
    print(text)
  print(f"[{len(texts)} completion(s) in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
