"""Attention weights for inspection (Llama 2 Figure 10): a slow debug forward pass that keeps the softmax maps.

The fast path (`l2jax/model/llama.py`) calls `jax.nn.dot_product_attention` and never materialises the weights.
This module recomputes the same network from the parameters with the same pieces (`llama.rms_norm`,
`llama.rope_angles`, `llama.apply_rope`), in float32, with grouped-query attention written out: query head h
reads key/value head h // (n_heads / n_kv_heads), as `jax.nn.dot_product_attention` groups them, and

  P[l, b, h, t, s] = softmax_s(q_t . k_s / sqrt(head_dim) + causal mask),   out_t = sum_s P[.., t, s] v_s.

Tests check that its logits and hidden states equal the model's (so it cannot drift from llama.py) and that
its maps equal softmax(QK^T / sqrt(d) + mask) computed directly. Memory: the maps are [L, B, H, T, T]; with
`span` only the maximum over the span's keys is kept per layer, [L, B, H, T].

Figure 10: for each token t after the instruction, max over layers, heads and the instruction's tokens s of
P[l, h, t, s] (`attention_to_span`), then averaged in bins along the dialog (`binned`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2jax.model import llama


def _layer_attention(cfg, p: dict, x_btd, cos, sin):
  """(q [B,T,H,k], k and v repeated to H heads [B,T,H,k]) of one block, float32, as llama._block computes them."""
  h_btd = llama.rms_norm(x_btd, p["attn_norm"], cfg.norm_eps)
  q = llama.apply_rope(jnp.einsum("btd,dhk->bthk", h_btd, p["wq"]), cos, sin)
  k = llama.apply_rope(jnp.einsum("btd,dhk->bthk", h_btd, p["wk"]), cos, sin)
  v = jnp.einsum("btd,dhk->bthk", h_btd, p["wv"])
  group = cfg.n_heads // cfg.n_kv_heads
  return q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)


@functools.partial(jax.jit, static_argnames=("cfg", "span"))
def _block(p: dict, x_btd, cos, sin, *, cfg, span):
  """One block in float32, keeping its attention maps [B, H, T, T] (or their max over `span`'s keys)."""
  T = x_btd.shape[1]
  q, k, v = _layer_attention(cfg, p, x_btd, cos, sin)
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim)
  probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf), axis=-1)
  x_btd = x_btd + jnp.einsum("bthk,hkd->btd", jnp.einsum("bhts,bshk->bthk", probs, v), p["wo"])
  h_btd = llama.rms_norm(x_btd, p["ffn_norm"], cfg.norm_eps)
  ff = jax.nn.silu(jnp.einsum("btd,df->btf", h_btd, p["w1"])) * jnp.einsum("btd,df->btf", h_btd, p["w3"])
  x_btd = x_btd + jnp.einsum("btf,fd->btd", ff, p["w2"])
  return x_btd, (probs if span is None else jnp.max(probs[..., span[0]:span[1]], axis=-1))


def debug_forward(params: dict, cfg, tokens_bt, span: tuple[int, int] | None = None) -> dict[str, Any]:
  """The model's forward pass in float32, keeping what the fast path does not.

  Returns numpy arrays: logits [B, T, V], hidden [B, T, D] (final-normed), inputs [L, B, T, D] (each block's
  input), and probs [L, B, H, T, T] (attention maps) -- or, with span=(a, b), span_max [L, B, H, T]: the largest
  weight each query gives to keys a..b-1.
  """
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
  B, T = tokens_bt.shape
  cos, sin = llama.rope_angles(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), cfg.head_dim,
                               cfg.rope_theta)
  layers = {k: f32(v) for k, v in params["layers"].items()}
  span = None if span is None else (int(span[0]), int(span[1]))
  x_btd = jnp.take(f32(params["embed"]), tokens_bt, axis=0)
  inputs, maps = [], []
  for i in range(cfg.n_layers):
    inputs.append(np.asarray(x_btd))
    x_btd, kept = _block({k: v[i] for k, v in layers.items()}, x_btd, cos, sin, cfg=cfg, span=span)
    maps.append(np.asarray(kept))
  h_btd = llama.rms_norm(x_btd, f32(params["norm"]), cfg.norm_eps)
  logits = jnp.einsum("btd,dv->btv", h_btd, f32(params["lm_head"]))
  out = {"logits": np.asarray(logits), "hidden": np.asarray(h_btd), "inputs": np.stack(inputs)}
  out["probs" if span is None else "span_max"] = np.stack(maps)
  return out


def attention_to_span(params: dict, cfg, tokens_t, span: tuple[int, int]) -> np.ndarray:
  """[T] float: max over layers, heads and keys in `span` of the attention weight of each query token
  (0 for the tokens before the span's end, which are not "later" tokens)."""
  out = debug_forward(params, cfg, np.asarray(tokens_t)[None], span)["span_max"]  # [L, 1, H, T]
  m_t = out.max(axis=(0, 1, 2))
  m_t[:span[1]] = 0.0
  return m_t


def binned(values_t: np.ndarray, start: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
  """(bin centres as positions, mean of values_t[start:] in each of `bins` equal bins)."""
  v = np.asarray(values_t[start:], np.float64)
  edges = np.linspace(0, len(v), min(bins, max(len(v), 1)) + 1).round().astype(int)
  means = np.array([v[a:b].mean() if b > a else np.nan for a, b in zip(edges[:-1], edges[1:])])
  return start + (edges[:-1] + edges[1:]) / 2.0, means


def token_span(tok, before: str, text: str, after: str) -> tuple[int, int]:
  """Token positions [a, b) of `text` in BOS + encode(before + text + after), by common prefixes of encodings."""
  def common(x, y):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
      n += 1
    return n
  full = tok.encode(before + text + after, bos=True)
  a = common(tok.encode(before, bos=True), full)
  b = common(tok.encode(before + text, bos=True), full)
  return a, b
