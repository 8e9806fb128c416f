"""Losses: masked next-token cross-entropy (pretraining, SFT), the reward ranking loss, PPO losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """-log p(target) per token [B, T], computed in float32 with a stable log-softmax."""
  logits = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits, axis=-1)
  # select by comparison rather than a gather: fused with the reduction, and its gradient is elementwise
  vocab_v = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  target_logit_bt = jnp.sum(jnp.where(vocab_v == targets_bt[..., None].astype(jnp.int32), logits, 0.0), axis=-1)
  return lse_bt - target_logit_bt


def masked_nll_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(target) over tokens with mask 1, number of such tokens), both float32 scalars.

  Returning sums (not means) lets gradient accumulation over micro-batches equal one large batch exactly:
  loss = sum_k nll_sum_k / sum_k tokens_k.
  """
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum(token_nll(logits_btv, targets_bt) * mask), jnp.sum(mask)


# --- reward-model ranking loss (issue 6) ---------------------------------------------------------------------

# Margin m(r) per rating level (Llama 2 Table 27), in the level order of l2jax.data.preferences.RATINGS:
# significantly better, better, slightly better, negligibly better / unsure. Unrated pairs get no margin.
MARGINS: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "small": (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0),
    "large": (3.0, 2.0, 1.0, 0.0),
}


def rating_margin(rating_p: jax.Array, table: str | tuple[float, ...]) -> jax.Array:
  """Margin m(r) [P] for rating levels 0..3 (`MARGINS` order) under a margin table; 0 for unrated (-1) pairs."""
  values = jnp.asarray(MARGINS[table] if isinstance(table, str) else table, jnp.float32)
  rating_p = jnp.asarray(rating_p, jnp.int32)
  return jnp.where(rating_p >= 0, values[jnp.clip(rating_p, 0, values.shape[0] - 1)], 0.0)


def ranking_loss_sum(r_chosen_p: jax.Array, r_rejected_p: jax.Array, margin_p: jax.Array | None = None,
                     weight_p: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum over pairs of the binary ranking loss with margin, sum of pair weights), both float32 scalars.

  Llama 2 section 3.2.2, equation (2): L = -log(sigmoid(r_theta(x, y_c) - r_theta(x, y_r) - m(r))), where
  y_c is the chosen response, y_r the rejected one and m(r) the margin of the preference rating (Table 27;
  see `MARGINS`; 0 = the plain binary ranking loss of equation (1)). Computed as softplus(-(r_c - r_r - m))
  in float32, stable for any score gap. weight_p: 1 for real pairs, 0 for padding pairs.
  """
  diff_p = r_chosen_p.astype(jnp.float32) - r_rejected_p.astype(jnp.float32)
  if margin_p is not None:
    diff_p = diff_p - margin_p.astype(jnp.float32)
  w_p = jnp.ones_like(diff_p) if weight_p is None else weight_p.astype(jnp.float32)
  return jnp.sum(jax.nn.softplus(-diff_p) * w_p), jnp.sum(w_p)
