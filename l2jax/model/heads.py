"""Scalar heads for reward models (Llama 2 section 3.2.2) and value models (section 3.2.3).

"The model architecture and hyper-parameters are identical to those of the pretrained language models,
except that the classification head for next-token prediction is replaced with a regression head for
outputting a scalar reward." The score of a (prompt, response) row is the head applied to the hidden state
of its last non-padding token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from l2jax.model.config import LlamaConfig
from l2jax.model.llama import Llama


def last_token_index(mask_bt: jax.Array) -> jax.Array:
  """Index [B] of the last position whose mask is nonzero in each row (0 for an all-padding row).

  Works for right padding and for any interior pattern: it is the largest t with mask[b, t] != 0.
  """
  T = mask_bt.shape[1]
  idx_bt = jnp.where(mask_bt != 0, jnp.arange(T, dtype=jnp.int32)[None, :], -1)
  return jnp.maximum(jnp.max(idx_bt, axis=1), 0)


def gather_last(h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Hidden state of each row's last non-padding token: [B, D]."""
  idx_b = last_token_index(mask_bt)
  return jnp.take_along_axis(h_btd, idx_b[:, None, None], axis=1)[:, 0]


class ScalarHead(nnx.Module):
  """Linear map from the model width to one float32 score: s = h_last . w + b."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (dim,), param_dtype) / jnp.sqrt(dim), axes=("embed",))
    self.b = nnx.Param(jnp.zeros((), param_dtype), axes=())

  def __call__(self, h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
    h_bd = gather_last(h_btd, mask_bt).astype(jnp.float32)
    return h_bd @ self.w[...].astype(jnp.float32) + self.b[...].astype(jnp.float32)

  def every_position(self, h_btd: jax.Array) -> jax.Array:
    """The same linear map at every position: float32 [B, T] (a value model's V(s_t), section 3.2.3)."""
    return jnp.einsum("btd,d->bt", h_btd.astype(jnp.float32), self.w[...].astype(jnp.float32)) \
        + self.b[...].astype(jnp.float32)


class ScalarModel(nnx.Module):
  """Llama backbone (without its output head) + scalar head: a reward or value model. float32 scores [B].

  Its params are {"backbone": Llama params less "lm_head", "head": {"w", "b"}}; `backbone_params(lm_params)`
  turns a language model's params into the backbone part.
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.backbone = Llama(cfg, rngs=rngs)
    del self.backbone.lm_head  # the next-token head is replaced by the scalar head (no unused [D, V] weights)
    self.head = ScalarHead(cfg.dim, rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_bt: jax.Array, mask_bt: jax.Array, positions_bt=None, segment_ids_bt=None) -> jax.Array:
    h_btd, _ = self.backbone.hidden(tokens_bt, positions_bt, segment_ids_bt)
    return self.head(h_btd, mask_bt)

  def values(self, tokens_bt: jax.Array, positions_bt=None, segment_ids_bt=None) -> jax.Array:
    """float32 [B, T]: the head at every position, V(tokens[:, :t+1]). The value model of PPO (section 3.2.3)
    has this form; initialised from a reward model's params (Stiennon et al., 2020), its value at a row's last
    token is that reward model's score."""
    h_btd, _ = self.backbone.hidden(tokens_bt, positions_bt, segment_ids_bt)
    return self.head.every_position(h_btd)


def backbone_params(lm_params: dict) -> dict:
  """A language model's parameter dict without its next-token head: the `backbone` of a ScalarModel."""
  return {k: v for k, v in lm_params.items() if k != "lm_head"}
