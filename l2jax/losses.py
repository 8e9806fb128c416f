"""Losses: masked next-token cross-entropy (pretraining, SFT), the reward ranking loss, PPO losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """-log p(target) per token [B, T], computed in float32 with a stable log-softmax."""
  logits = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse_bt - target_logit_bt


def masked_nll_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target) over tokens with mask 1, number of such tokens), both float32 scalars.

  Returning sums (not means) lets gradient accumulation over micro-batches equal one large batch exactly:
  loss = sum_k nll_sum_k / sum_k tokens_k.
  """
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(token_nll(logits_btv, targets_bt) * mask), jnp.sum(mask)
