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


# --- reward-model ranking loss (Llama 2 section 3.2.2) ---------------------------------------------------------

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


# --- PPO (Llama 2 section 3.2.3) -------------------------------------------------------------------------------

def _masked_mean(x_bt: jax.Array, mask_bt: jax.Array, count: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask_bt, x_bt.astype(jnp.float32), 0.0)) / jnp.maximum(count, 1.0)


def ppo_policy_loss(logprobs_bt: jax.Array, old_logprobs_bt: jax.Array, advantages_bt: jax.Array,
                    mask_bt: jax.Array, clip: float = 0.2) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum over masked tokens of the clipped PPO policy loss, number of masked tokens, metrics), float32.

  Llama 2 section 3.2.3 (PPO, Schulman et al. 2017, clip 0.2): per token
    L_t = -min(rho_t * A_t, clip(rho_t, 1 - clip, 1 + clip) * A_t),   rho_t = exp(log pi_theta - log pi_old).
  Sums (not means) so that micro-batches accumulate exactly, like the other losses.
  metrics (float32 scalars, means over masked tokens; 0 with no masked token):
    "clipfrac"   TRL's pg_clipfrac: the share of tokens where the clipped term is strictly the larger loss
                 (the one chosen, so the token has no gradient);
    "approx_kl"  TRL's approxkl: mean of 0.5 * (log pi_theta - log pi_old)^2;
    "ratio"      mean of rho.
  """
  m = jnp.asarray(mask_bt).astype(bool)
  count = jnp.sum(m).astype(jnp.float32)
  logratio_bt = logprobs_bt.astype(jnp.float32) - old_logprobs_bt.astype(jnp.float32)
  ratio_bt = jnp.exp(logratio_bt)
  adv_bt = advantages_bt.astype(jnp.float32)
  loss1_bt = -adv_bt * ratio_bt
  loss2_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip, 1.0 + clip)
  loss_sum = jnp.sum(jnp.where(m, jnp.maximum(loss1_bt, loss2_bt), 0.0))
  metrics = {"clipfrac": _masked_mean(loss2_bt > loss1_bt, m, count),
             "approx_kl": _masked_mean(0.5 * jnp.square(logratio_bt), m, count),
             "ratio": _masked_mean(ratio_bt, m, count)}
  return loss_sum, count, metrics


def ppo_value_loss(values_bt: jax.Array, old_values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array,
                   clip: float = 0.2) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(sum over masked tokens of the clipped value loss, number of masked tokens, metrics), float32.

  Clipped value loss (the PPO2 / TRL form; the value-loss clip Llama 2 section 3.2.3 leaves open, 0.2):
    L_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - clip, V_old_t + clip) - R_t)^2).
  metrics: "vf_clipfrac", TRL's: the share of masked tokens where the clipped term is strictly larger.
  """
  m = jnp.asarray(mask_bt).astype(bool)
  count = jnp.sum(m).astype(jnp.float32)
  v_bt = values_bt.astype(jnp.float32)
  old_bt = old_values_bt.astype(jnp.float32)
  ret_bt = returns_bt.astype(jnp.float32)
  loss1_bt = jnp.square(v_bt - ret_bt)
  loss2_bt = jnp.square(jnp.clip(v_bt, old_bt - clip, old_bt + clip) - ret_bt)
  loss_sum = 0.5 * jnp.sum(jnp.where(m, jnp.maximum(loss1_bt, loss2_bt), 0.0))
  return loss_sum, count, {"vf_clipfrac": _masked_mean(loss2_bt > loss1_bt, m, count)}


# --- DPO (Rafailov et al. 2023) ----------------------------------------------------------------------------------

def sequence_logprob(logprobs_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """float32 [B]: log pi(y | x) = sum of the token log-probs over each row's response tokens (mask_bt True)."""
  m = jnp.asarray(mask_bt).astype(bool)
  return jnp.sum(jnp.where(m, jnp.asarray(logprobs_bt, jnp.float32), 0.0), axis=1)


def dpo_loss(policy_chosen_b: jax.Array, policy_rejected_b: jax.Array, ref_chosen_b: jax.Array,
             ref_rejected_b: jax.Array, beta: float = 0.1, label_smoothing: float = 0.0,
             margin_b: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean DPO loss over pairs, metrics), float32: Rafailov et al. 2023 equation 7, with label smoothing and margin.

  Inputs are sequence log-probs [B] (`sequence_logprob`) of the chosen / rejected responses under the policy and
  the frozen reference. Implicit reward r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)) (section 5), and with
  z = r_c - r_r - m:
    L = -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z).
  ls = label_smoothing: conservative DPO (the chosen label is wrong with probability ls; TRL's "sigmoid" loss);
  ls = 0 is equation 7, the Bradley-Terry ranking loss (`ranking_loss_sum`) on the implicit rewards. m = margin_b:
  the rating margin of Llama 2 section 3.2.2 (Table 27, `rating_margin`); None = 0.
  metrics (float32 scalars, means over pairs): "rewards_chosen", "rewards_rejected" (r_c, r_r), "reward_accuracy"
  (share with r_c > r_r), "reward_margin" (r_c - r_r), "logps_chosen", "logps_rejected" (policy log-probs).
  """
  pc_b = jnp.asarray(policy_chosen_b, jnp.float32)
  pr_b = jnp.asarray(policy_rejected_b, jnp.float32)
  r_chosen_b = beta * (pc_b - jnp.asarray(ref_chosen_b, jnp.float32))
  r_rejected_b = beta * (pr_b - jnp.asarray(ref_rejected_b, jnp.float32))
  z_b = r_chosen_b - r_rejected_b
  if margin_b is not None:
    z_b = z_b - jnp.asarray(margin_b, jnp.float32)
  loss_b = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_b) - label_smoothing * jax.nn.log_sigmoid(-z_b)
  metrics = {"rewards_chosen": jnp.mean(r_chosen_b), "rewards_rejected": jnp.mean(r_rejected_b),
             "reward_accuracy": jnp.mean((r_chosen_b > r_rejected_b).astype(jnp.float32)),
             "reward_margin": jnp.mean(r_chosen_b - r_rejected_b),
             "logps_chosen": jnp.mean(pc_b), "logps_rejected": jnp.mean(pr_b)}
  return jnp.mean(loss_b), metrics
