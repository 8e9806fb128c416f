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
import math
import operator
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


def _to_host(tree: Any) -> Any:
  """numpy copies of (possibly multi-host) arrays: every process gets the whole batch."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


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


def _ordered_key(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (negative floats flipped), for exact bisection on values."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _largest_key(key_bv: jax.Array, ok) -> jax.Array:
  """Per row, the largest t [B, 1] with ok(key_bv >= t) true; ok is monotone and true at the row minimum.

  32 bisection steps over uint32 keys find it exactly (it is one of the row's own keys). This replaces a sort of
  the vocabulary, which is slow on CPU and TPU.
  """
  lo_b1 = jnp.min(key_bv, axis=-1, keepdims=True)
  hi_b1 = jnp.max(key_bv, axis=-1, keepdims=True)
  hi_b1 = jnp.where(hi_b1 == jnp.uint32(0xFFFFFFFF), hi_b1, hi_b1 + 1)  # invariant: ok(lo), not ok(hi)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    good = ok(key_bv >= mid)
    return jnp.where(good, mid, lo), jnp.where(good, hi, mid)
  return jax.lax.fori_loop(0, 32, step, (lo_b1, hi_b1))[0]  # a fixed trip count


CANDIDATES = 64  # top-k / top-p look at the 64 largest logits first; the exact full-vocabulary search is the fallback


def _exact_filter(x_bv: jax.Array, k, top_p, use_top_k: bool, use_top_p: bool) -> jax.Array:
  """top-k then top-p by bisection over the whole vocabulary (any k, any nucleus size)."""
  if use_top_k:
    x_key_bv = _ordered_key(x_bv)
    t_b1 = _largest_key(x_key_bv, lambda keep_bv: jnp.sum(keep_bv, axis=-1, keepdims=True) >= k)
    x_bv = jnp.where(x_key_bv >= t_b1, x_bv, -jnp.inf)
  if use_top_p:
    p_bv = jax.nn.softmax(x_bv, axis=-1)
    p_key_bv = _ordered_key(p_bv)
    mass = lambda keep_bv: jnp.sum(jnp.where(keep_bv, p_bv, 0.0), axis=-1, keepdims=True)
    t_b1 = _largest_key(p_key_bv, lambda keep_bv: mass(keep_bv) >= top_p)
    x_bv = jnp.where((p_key_bv >= t_b1) | (top_p >= 1.0), x_bv, -jnp.inf)
  return x_bv


def process_logits(logits_bv: jax.Array, temperature, top_k, top_p, *, use_top_k: bool, use_top_p: bool):
  """The sampling distribution's logits: logits / T, then top-k, then top-p on the renormalised rest; -inf elsewhere.

  top-k keeps every logit >= the k-th largest; top-p keeps the smallest set of most likely tokens whose mass
  reaches p, i.e. every prob >= the largest threshold whose upper set has mass >= p (Holtzman et al., 2019).
  Ties at a threshold are kept. temperature > 0; top_k <= 0 or top_p >= 1 keep all; the argmax is always kept.
  Fast path: both thresholds from the CANDIDATES largest logits (`lax.top_k`), valid when k <= CANDIDATES and
  the nucleus lies within them; otherwise an exact bisection over the vocabulary (no sort: slow on CPU / TPU).
  """
  x_bv = logits_bv.astype(jnp.float32) / temperature
  if not (use_top_k or use_top_p):
    return x_bv
  V = x_bv.shape[-1]
  K = min(CANDIDATES, V)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V) if use_top_k else jnp.int32(V)
  cand_bk = jax.lax.top_k(x_bv, K)[0]  # descending
  t_b1 = jnp.where(k <= K, jnp.take_along_axis(cand_bk, jnp.broadcast_to(jnp.minimum(k, K) - 1, (x_bv.shape[0], 1)),
                                               axis=-1), -jnp.inf)
  valid = (k <= K) | (k >= V)
  if use_top_p:
    log_z_b1 = jax.nn.logsumexp(jnp.where(x_bv >= t_b1, x_bv, -jnp.inf), axis=-1, keepdims=True)
    p_bk = jnp.where(cand_bk >= t_b1, jnp.exp(cand_bk - log_z_b1), 0.0)
    before_bk = jnp.cumsum(p_bk, axis=-1) - p_bk  # mass of the larger candidates
    n_b1 = jnp.maximum(jnp.sum(before_bk < top_p, axis=-1, keepdims=True), 1)
    t_p_b1 = jnp.where(top_p >= 1.0, -jnp.inf, jnp.take_along_axis(cand_bk, n_b1 - 1, axis=-1))
    t_b1 = jnp.maximum(t_b1, t_p_b1)
    valid = valid & ((top_p >= 1.0) | jnp.all(jnp.sum(p_bk, axis=-1) >= top_p))
  return jax.lax.cond(valid, lambda x: jnp.where(x >= t_b1, x, -jnp.inf),
                      lambda x: _exact_filter(x, k, top_p, use_top_k, use_top_p), x_bv)


def draw(keys_b: jax.Array, logits_bv: jax.Array) -> jax.Array:
  """One token per row from softmax(logits) by inverse CDF: one uniform per row, first index with cdf > u.

  Exact up to float32 rounding of the cumulative sum; a -inf logit (probability 0) is never drawn. Cheaper than
  the Gumbel-max trick of `jax.random.categorical` (one random number per row instead of one per token).
  """
  p_bv = jax.nn.softmax(logits_bv, axis=-1)
  cdf_bv = jnp.cumsum(p_bv, axis=-1)
  u_b1 = jax.vmap(jax.random.uniform)(keys_b)[:, None] * cdf_bv[:, -1:]
  hit_bv = (cdf_bv > u_b1) & (p_bv > 0)
  return jnp.where(jnp.any(hit_bv, axis=-1), jnp.argmax(hit_bv, axis=-1),
                   jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)


def choose_tokens(keys_b, logits_bv, temperature, top_k, top_p, *, greedy: bool, use_top_k: bool, use_top_p: bool):
  """(tokens [B], sampling log-probs [B], model log-probs [B]) for one step; greedy is argmax with log-prob 0."""
  logits_bv = logits_bv.astype(jnp.float32)
  model_lp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  if greedy:
    tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    lp_b = jnp.zeros(tok_b.shape, jnp.float32)
  else:
    proc_bv = process_logits(logits_bv, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    tok_b = draw(keys_b, proc_bv)
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
      step, done_b = state[0], state[4]
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


@jax.jit
def _row_keys(seeds_b: jax.Array, index_b: jax.Array) -> jax.Array:
  """Row r's key: fold_in(key(seeds_b[r]), index_b[r])."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_b, index_b)


def check_sampling(temperature: float, top_p: float = 1.0, top_k: int = 0,
                   max_new_tokens: int | None = None) -> None:
  """ValueError naming the first setting that makes no sense: temperature must be finite and >= 0 (0 is
  greedy), top_p in (0, 1], top_k an int >= 0 (0 keeps all), max_new_tokens (when given) an int >= 1.
  One check for Sampler.generate and the sample / chat command lines (which run it before loading a model)."""
  def real(v):  # Python, numpy or 0-d jax numbers; not bools or strings
    if isinstance(v, (bool, str, bytes)):
      return False
    try:
      return not math.isnan(float(v))
    except (TypeError, ValueError):
      return False

  def whole(v):
    if isinstance(v, bool):
      return False
    try:
      operator.index(v)
      return True
    except TypeError:
      return False
  if not (real(temperature) and math.isfinite(float(temperature)) and temperature >= 0):
    raise ValueError(f"temperature: expected a finite number >= 0 (0 is greedy), found {temperature!r}")
  if not (real(top_p) and 0.0 < top_p <= 1.0):  # NaN fails both comparisons
    raise ValueError(f"top_p: expected a number in (0, 1], found {top_p!r}")
  if not (whole(top_k) and top_k >= 0):
    raise ValueError(f"top_k: expected an int >= 0 (0 keeps all tokens), found {top_k!r}")
  if max_new_tokens is not None and not (whole(max_new_tokens) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens: expected a positive int, found {max_new_tokens!r}")


def check_text(text: str, what: str) -> str:
  """`text` if it is valid Unicode; ValueError naming `what` and the first undecodable byte otherwise.

  Command-line arguments and stdin that are not valid UTF-8 reach Python as lone surrogates
  (surrogateescape: byte 0xNN becomes U+DCNN), which the tokenizer cannot encode.
  """
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    ch = ord(text[e.start])
    byte = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"code point U+{ch:04X}"
    raise ValueError(f"{what}: not valid UTF-8 ({byte} at character {e.start})") from None
  return text


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
    cast = lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dt else a
    params = jax.tree.map(lambda a: cast(a if isinstance(a, jax.Array) else np.asarray(a)), params)  # host stays host
    self.mesh = mesh
    if mesh is not None:
      shardings = sharding.tree_shardings(llama.logical_axes(abstract_model), mesh, sharding.SAMPLE_RULES, params)
      params = sharding.put(params, shardings)
    self.params = jax.tree.map(jnp.asarray, params)
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
    check_sampling(temperature, top_p, top_k, max_new_tokens)
    prompts = self._check(prompts, max_new_tokens)
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
    if isinstance(seed, (int, np.integer)):
      seeds_b, index_b = np.full(Bb, seed, np.int64), np.arange(Bb)
    else:
      seeds = [int(s) for s in seed]
      if len(seeds) != B:
        raise ValueError(f"seed: expected an int or one seed per prompt ({B}), found {len(seeds)} seeds")
      seeds_b, index_b = np.array(seeds + [0] * (Bb - B), np.int64), np.zeros(Bb, np.int64)
    keys_b = _row_keys((seeds_b & 0xFFFFFFFF).astype(np.uint32), index_b.astype(np.uint32))
    stops = sorted(set(int(s) for s in stop_ids) | ({self.eos_id} if stop_on_eos else set())) or [-1]
    greedy = temperature == 0
    mode = (greedy, (not greedy) and top_k > 0, (not greedy) and top_p < 1.0)
    args = (tokens, lens_b, limits_b, keys_b)
    if self.mesh is not None:
      batch_sh = lambda x: jax.sharding.NamedSharding(self.mesh, sharding.logical_to_spec(
          ("batch",) + (None,) * (x.ndim - 1), sharding.SAMPLE_RULES, self.mesh))
      args = tuple(sharding.put(x, batch_sh(x)) for x in args)
    n_b, out = _generate(self.params, *args, jnp.float32(temperature or 1.0), jnp.int32(top_k),
                         jnp.float32(top_p), jnp.asarray(stops, jnp.int32), jnp.int32(self.pad_id),
                         graphdef=self.graphdef, cache_len=cache_len, n_out=n_out, mode=mode, mesh=self.mesh,
                         return_logits=return_logits)
    n_b, out = _to_host((n_b, out))
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
    prompts = [self.tokenizer.encode(check_text(t, f"text {i}"), bos=True) for i, t in enumerate(texts)]
    out = self.generate(prompts, max_new_tokens, **kw)
    return [self.decode_new(p, out.tokens[i, :out.lengths[i]]) for i, p in enumerate(prompts)]

  def decode_new(self, prompt: Sequence[int], new: Sequence[int]) -> str:
    """Text of `new` as it continues `prompt` (keeps the leading space SentencePiece drops at a start)."""
    tok = self.tokenizer
    new = [int(t) for t in new if int(t) not in (tok.eos_id, tok.bos_id)]
    head, full = tok.decode(prompt), tok.decode(list(prompt) + new)
    return full[len(head):] if full.startswith(head) else tok.decode(new)


def load_sampler(ckpt: str, dtype: str | None = None, mesh=None) -> Sampler:
  """A Sampler for an l2jax checkpoint directory (params + config.json + tokenizer.model).

  Parameters are read to host memory and cast there to the sampling dtype, then placed (on the mesh if given),
  so a float32 copy never lands on the accelerator.
  """
  from pathlib import Path

  from l2jax import checkpoint
  from l2jax.data.tokenizer import Tokenizer
  cfg, params = checkpoint.load_model_dir(ckpt)
  tok_path = Path(ckpt) / checkpoint.TOKENIZER
  if not tok_path.is_file():
    raise FileNotFoundError(f"{tok_path}: the checkpoint directory has no tokenizer.model")
  graphdef = llama.split(llama.abstract(cfg))[0]
  return Sampler((graphdef, params, cfg), Tokenizer(tok_path), dtype=dtype, mesh=mesh)


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
                  help="compute and weight dtype for sampling (default: the checkpoint config's dtype, which "
                       "converters set to the stored weights' dtype)")
  args = ap.parse_args(argv)
  try:  # the arguments first, before minutes of loading
    check_sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    for i, p in enumerate(args.prompt):
      check_text(p, f"--prompt {i + 1}" if len(args.prompt) > 1 else "--prompt")
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
