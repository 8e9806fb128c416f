"""Llama 2 in Flax NNX (Touvron et al., 2023, section 2.2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters are stored in Meta's layout (q/k rotary pairs interleaved, as Meta's reference and llama2.c
compute them); the converters in tools/ move HF's permuted q/k layout into this one. Blocks are stacked on
a leading "layers" axis and run with `jax.lax.scan`, so compile time does not grow with depth.

Used functionally (DESIGN.md section 3): `graphdef, params = split(model)` and, inside a jitted step,
`nnx.merge(graphdef, params)(tokens_bt)`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from l2jax.model.config import LlamaConfig
from l2jax.sharding import constrain

Params = dict[str, Any]


class KVCache(NamedTuple):
  """Per-layer keys and values, grouped (never repeated to all heads): each [L, B, S, n_kv, head_dim]."""
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float = 0.02) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def rms_norm(x_btd: jax.Array, weight_d: jax.Array, eps: float) -> jax.Array:
  """RMSNorm (Zhang & Sennrich, 2019; Llama 2 section 2.2): x / sqrt(mean(x^2) + eps) * w, reduced in float32."""
  x32 = x_btd.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x_btd.dtype) * weight_d.astype(x_btd.dtype)


def rope_angles(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin of position * theta^(-2i / head_dim), each [B, T, head_dim // 2] in float32 (Su et al., 2021)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_bti = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_bti), jnp.sin(angles_bti)


def apply_rope(x_bthk: jax.Array, cos_bti: jax.Array, sin_bti: jax.Array) -> jax.Array:
  """Rotate interleaved pairs (x[2i], x[2i+1]) by the position's angle, as Meta's reference does."""
  x = x_bthk.astype(jnp.float32).reshape(*x_bthk.shape[:-1], -1, 2)  # [B, T, H, k/2, 2]
  x0, x1 = x[..., 0], x[..., 1]
  cos, sin = cos_bti[:, :, None, :], sin_bti[:, :, None, :]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x_bthk.shape).astype(x_bthk.dtype)


class Blocks(nnx.Module):
  """All transformer blocks, each parameter stacked on a leading [L] axis."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    L, D, H, K, Dh, F = cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = nnx.Param(jnp.ones((L, D), pd), axes=("layers", "norm"))
    self.wq = _param(rngs, (L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim"), pd)
    self.wk = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), pd)
    self.wv = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), pd)
    self.wo = _param(rngs, (L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed"), pd)
    self.ffn_norm = nnx.Param(jnp.ones((L, D), pd), axes=("layers", "norm"))
    self.w1 = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
    self.w3 = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd)
    self.w2 = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), pd)


def attention(q_bthk, k_bshk, v_bshk, mask_b1ts, mode: str, impl: str | None, cached: bool = False):
  """softmax(q k^T / sqrt(head_dim) + mask) v with grouped KV heads.

  mode: "causal" (no mask array), "mask" (mask_b1ts [B, 1, T, S] bool) or "splash" (causal within segments on
  TPU's splash kernel, l2jax.model.splash; mask_b1ts then carries the segment ids [B, T] or None).
  Otherwise `jax.nn.dot_product_attention`: impl None picks cuDNN flash attention on GPU for bf16 / fp16 without
  a KV cache (JAX's own default is XLA), falling back to XLA when cuDNN rejects the shapes or mask; "xla" /
  "cudnn" force one.
  """
  if mode == "splash":
    from l2jax.model.splash import splash_attention
    return splash_attention(q_bthk, k_bshk, v_bshk, mask_b1ts)
  is_causal = mode == "causal"
  if impl is None and not cached and q_bthk.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu":
    try:
      return jax.nn.dot_product_attention(q_bthk, k_bshk, v_bshk, mask=mask_b1ts, is_causal=is_causal,
                                          implementation="cudnn")
    except Exception:  # unsupported by this cuDNN / shape / mask: use XLA  # noqa: BLE001
      pass
  return jax.nn.dot_product_attention(q_bthk, k_bshk, v_bshk, mask=mask_b1ts, is_causal=is_causal,
                                      implementation=None if impl == "splash" else impl)


def use_splash(cfg: LlamaConfig, seq_len: int) -> bool:
  """Splash attention for a cache-free forward pass: attention_impl "splash", or the default (None) when building
  for TPU; only where the sequence tiles (a multiple of 128), else XLA."""
  from l2jax.model import splash
  if cfg.attention_impl == "splash" or (cfg.attention_impl is None and splash.on_tpu()):
    return splash.supported(seq_len)
  return False


def _block(cfg: LlamaConfig, p: Params, x_btd, cos, sin, mask_b1ts, mode: str, kv=None, positions_bt=None):
  """One pre-norm block: x + Attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x)).

  kv: (k_all, v_all, layer) -- the whole cache, updated in place at [layer, row, position] (a scatter into
  the loop carry, so decoding never copies a layer's cache), or None without a cache.
  """
  dt = x_btd.dtype
  h_btd = rms_norm(x_btd, p["attn_norm"], cfg.norm_eps)
  q = jnp.einsum("btd,dhk->bthk", h_btd, p["wq"].astype(dt))
  k = jnp.einsum("btd,dhk->bthk", h_btd, p["wk"].astype(dt))
  v = jnp.einsum("btd,dhk->bthk", h_btd, p["wv"].astype(dt))
  q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "q_heads", "head_dim"))
  k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
  v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
  if kv is not None:  # write this step's keys/values in place at their positions, attend over the whole cache
    k_all, v_all, layer = kv  # [L, B, S, n_kv, head_dim] each, this block's index
    rows_b1 = jnp.arange(k.shape[0])[:, None]
    k_all = k_all.at[layer, rows_b1, positions_bt].set(k.astype(k_all.dtype))
    v_all = v_all.at[layer, rows_b1, positions_bt].set(v.astype(v_all.dtype))
    kv = (k_all, v_all, layer)
    k, v = k_all[layer].astype(dt), v_all[layer].astype(dt)
  attn_bthk = attention(q, k, v, mask_b1ts, mode, cfg.attention_impl, cached=kv is not None)
  x_btd = x_btd + jnp.einsum("bthk,hkd->btd", attn_bthk, p["wo"].astype(dt))
  x_btd = constrain(x_btd, ("batch", "seq", "embed"))
  h_btd = rms_norm(x_btd, p["ffn_norm"], cfg.norm_eps)
  gate_btf = jax.nn.silu(jnp.einsum("btd,df->btf", h_btd, p["w1"].astype(dt)))
  up_btf = jnp.einsum("btd,df->btf", h_btd, p["w3"].astype(dt))
  ff_btf = constrain(gate_btf * up_btf, ("batch", "seq", "mlp"))
  x_btd = x_btd + jnp.einsum("btf,fd->btd", ff_btf, p["w2"].astype(dt))
  return constrain(x_btd, ("batch", "seq", "embed")), kv


def _remat(fn, policy: str, in_scan: bool):
  if policy == "none":
    return fn
  saveable = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
  return jax.checkpoint(fn, policy=saveable, prevent_cse=not in_scan, static_argnums=(0, 6))


class Llama(nnx.Module):
  """The Llama 2 decoder: token embedding, `n_layers` blocks, final RMSNorm, untied output head."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), pd)
    self.layers = Blocks(cfg, rngs=rngs)
    self.norm = nnx.Param(jnp.ones((cfg.dim,), pd), axes=("norm",))
    self.lm_head = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), pd)

  def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
             segment_ids_bt: jax.Array | None = None, cache: KVCache | None = None):
    """Final-normed hidden states [B, T, D] (compute dtype), and the updated cache when one is given.

    tokens_bt: int32 [B, T]. positions_bt: [B, T] rotary positions (default 0..T-1).
    segment_ids_bt: [B, T] ids of packed documents; a token attends only within its own segment.
    cache: a KVCache; tokens are written at `positions_bt` and attend to cache slots <= their position.
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens_bt.shape
    default_positions = positions_bt is None
    if default_positions:
      positions_bt = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_btd = constrain(jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt), ("batch", "seq", "embed"))
    cos, sin = rope_angles(positions_bt, cfg.head_dim, cfg.rope_theta)

    mode, mask_b1ts = "mask", None
    if cache is not None:
      slots_s = jnp.arange(cache.k.shape[2], dtype=jnp.int32)
      mask_b1ts = (slots_s[None, None, None, :] <= positions_bt[:, None, :, None])
    elif use_splash(cfg, T):   # causal within segments, on the TPU kernel; the mask slot carries segment ids
      mode, mask_b1ts = "splash", segment_ids_bt
    elif segment_ids_bt is None and default_positions:
      mode = "causal"
    else:
      idx_t = jnp.arange(T)
      causal_tt = idx_t[:, None] >= idx_t[None, :]
      mask_b1ts = jnp.broadcast_to(causal_tt, (B, 1, T, T))
      if segment_ids_bt is not None:
        mask_b1ts = mask_b1ts & (segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :])

    layer_params = {k: v[...] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}
    block = _remat(_block, cfg.remat, cfg.scan_layers)
    if cfg.scan_layers:
      if cache is None:
        def body(x, p):
          return block(cfg, p, x, cos, sin, mask_b1ts, mode)[0], None
        x_btd, _ = jax.lax.scan(body, x_btd, layer_params)
      else:
        def body(carry, xs):
          x, k_all, v_all = carry
          p, i = xs
          x, (k_all, v_all, _) = block(cfg, p, x, cos, sin, mask_b1ts, mode, (k_all, v_all, i), positions_bt)
          return (x, k_all, v_all), None
        (x_btd, k_all, v_all), _ = jax.lax.scan(
            body, (x_btd, cache.k, cache.v), (layer_params, jnp.arange(cfg.n_layers)))
        cache = KVCache(k_all, v_all)
    else:
      kv = None if cache is None else (cache.k, cache.v, 0)
      for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a: a[i], layer_params)
        kv = None if kv is None else (kv[0], kv[1], i)
        x_btd, kv = block(cfg, p, x_btd, cos, sin, mask_b1ts, mode, kv, positions_bt)
      if cache is not None:
        cache = KVCache(kv[0], kv[1])
    h_btd = rms_norm(x_btd, self.norm[...], cfg.norm_eps)
    return h_btd, cache

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None, cache: KVCache | None = None):
    """float32 logits [B, T, vocab]; with a cache, (logits, updated cache). Arguments as in `hidden`."""
    h_btd, new_cache = self.hidden(tokens_bt, positions_bt, segment_ids_bt, cache)
    logits_btv = self.head(h_btd)
    return logits_btv if cache is None else (logits_btv, new_cache)

  def head(self, h_btd: jax.Array) -> jax.Array:
    """float32 logits [B, T, vocab] of final-normed hidden states [B, T, D]: any T positions, so a caller that needs
    the next-token distribution at a few positions (PPO's response window) gathers those first."""
    B, T, D = h_btd.shape  # as one [B*T, D] x [D, V] matmul: XLA's CPU backward of the 3-D einsum is 2x slower
    logits_btv = (h_btd.reshape(B * T, D) @ self.lm_head[...].astype(h_btd.dtype)).reshape(B, T, -1)
    return constrain(logits_btv, ("batch", "seq", "vocab")).astype(jnp.float32)


def init(cfg: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialised model (normal(0, 0.02) weights, unit norms)."""
  return Llama(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: LlamaConfig) -> Llama:
  """The model with ShapeDtypeStruct leaves: no memory allocated (for restore and sharding plans)."""
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0)))


def split(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
  """(graphdef, params): params is a plain nested dict of arrays, the form steps and checkpoints use."""
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def logical_axes(model: nnx.Module) -> Params:
  """Nested dict, same structure as `split(model)[1]`, of each parameter's logical axis names."""
  out: Params = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = var.get_metadata().get("axes")
  return out
