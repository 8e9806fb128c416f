"""Group advantage estimators (GRPO, RLOO), the k3 KL estimator, and the clipped token-level policy loss.

Both estimators replace PPO's value model and GAE by a baseline from the other samples of the same prompt: the
rollout samples k responses per prompt, each is scored once with the sequence-level combined reward R~c of Llama
2 section 3.2.3 (`l2jax.rl.rewards.combine` + `whiten`), and the sequence advantage is put on every response token
(`broadcast_to_tokens`). No value model, no per-token reward.

Layout: a batch of B = G * k rows holds G prompts with k samples each, the rows of one prompt contiguous:
row = prompt * k + sample (`group_rewards` reshapes [B] -> [G, k]).

RLOO, REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", section 3.2; Kool et al. 2019):
  A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) (r_i - mean_group(r)).
GRPO outcome supervision (Shao et al. 2024, DeepSeekMath, section 4.1.2):
  A_i = (r_i - mean_group(r)) / (std_group(r) + eps).
  The paper does not say which standard deviation; TRL's GRPOTrainer uses torch's `.std(dim=1)`, the unbiased
  one (ddof = 1), and eps = 1e-4 added to the std: our defaults. ddof=0 gives the population std.
  scale=False gives Dr. GRPO's unscaled A_i = r_i - mean_group(r) (Liu et al. 2025, "Understanding R1-Zero-Like
  Training"), which removes the bias toward groups with a small reward spread.
k3 KL (Schulman 2020, "Approximating KL divergence"; DeepSeekMath equation 4), d = log pi_ref - log pi_theta:
  k3 = exp(d) - d - 1 >= 0, an unbiased estimate of KL(pi_theta || pi_ref) for tokens sampled from pi_theta. It
  enters the GRPO loss (not the reward, unlike PPO's k1 in `l2jax.rl.rewards.token_rewards`).
Policy loss: PPO's clipped surrogate per token plus beta * KL, reduced over response tokens either per token
(DAPO, Yu et al. 2025; TRL "bnpo") or per sequence (the original GRPO objective; TRL "grpo"); see `policy_loss`.
All functions are pure jnp, float32, and jit-able (group_size, clip, normalization static).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from l2jax.losses import ppo_policy_loss


def group_rewards(rewards_b: jax.Array, group_size: int) -> jax.Array:
  """float32 [G, k]: rewards [B] of G prompts x k samples, rows of one prompt contiguous (row = prompt * k + sample).

  Raises ValueError when group_size < 1 or B is not a multiple of group_size.
  """
  rewards_b = jnp.asarray(rewards_b, jnp.float32)
  if rewards_b.ndim != 1:
    raise ValueError(f"advantages.group_rewards: expected rewards of shape [B], got {rewards_b.shape}")
  b = rewards_b.shape[0]
  if group_size < 1 or b % group_size != 0:
    raise ValueError(f"advantages.group_rewards: batch of {b} rewards is not a whole number of groups of "
                     f"group_size={group_size} (expected B = prompts * group_size, rows of one prompt contiguous)")
  return rewards_b.reshape(b // group_size, group_size)


def _check_group_of_two(name: str, group_size: int) -> None:
  if group_size < 2:
    raise ValueError(f"advantages.{name}: group_size must be >= 2 (a baseline needs another sample of the same "
                     f"prompt), got {group_size}")


def rloo(rewards_b: jax.Array, group_size: int) -> jax.Array:
  """float32 [B]: RLOO advantages r_i - mean of the other k - 1 rewards of the group (Ahmadian et al. 2024).

  A_i = r_i - (sum_g r - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_g r); sums to 0 over each group. k >= 2.
  """
  _check_group_of_two("rloo", group_size)
  r_gk = group_rewards(rewards_b, group_size)
  others_gk = (jnp.sum(r_gk, axis=1, keepdims=True) - r_gk) / (group_size - 1)
  return (r_gk - others_gk).reshape(-1)


def grpo(rewards_b: jax.Array, group_size: int, eps: float = 1e-4, scale: bool = True, ddof: int = 1) -> jax.Array:
  """float32 [B]: GRPO outcome advantages (r_i - mean_g r) / (std_g r + eps) (DeepSeekMath section 4.1.2).

  std_g = sqrt(sum_g (r - mean_g)^2 / (k - ddof)); ddof=1 (unbiased) is TRL GRPOTrainer's torch `.std`, ddof=0
  the population std. A group of identical rewards gets 0 (0 / eps, no NaN). scale=False: Dr. GRPO's unscaled
  r_i - mean_g r (Liu et al. 2025). k >= 2 and 0 <= ddof < k.
  """
  _check_group_of_two("grpo", group_size)
  if not 0 <= ddof < group_size:
    raise ValueError(f"advantages.grpo: ddof must be in [0, group_size={group_size}), got {ddof}")
  r_gk = group_rewards(rewards_b, group_size)
  centered_gk = r_gk - jnp.mean(r_gk, axis=1, keepdims=True)
  if scale:
    std_g1 = jnp.sqrt(jnp.sum(jnp.square(centered_gk), axis=1, keepdims=True) / (group_size - ddof))
    centered_gk = centered_gk / (std_g1 + eps)
  return centered_gk.reshape(-1)


def broadcast_to_tokens(adv_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """float32 [B, T]: each row's sequence advantage on its response tokens (mask_bt True), 0 elsewhere."""
  adv_b = jnp.asarray(adv_b, jnp.float32)
  return jnp.where(jnp.asarray(mask_bt).astype(bool), adv_b[:, None], 0.0)


def k3_kl(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array) -> jax.Array:
  """float32 [B, T]: k3 = exp(d) - d - 1, d = log pi_ref - log pi_theta (Schulman 2020; DeepSeekMath eq. 4).

  >= 0 everywhere, 0 exactly where the log-probs are equal; expm1 keeps it accurate for small |d|. Unmasked:
  mask it in the loss (`policy_loss` does).
  """
  d_bt = jnp.asarray(ref_logprobs_bt, jnp.float32) - jnp.asarray(logprobs_bt, jnp.float32)
  return jnp.expm1(d_bt) - d_bt


def policy_loss(logprobs_bt: jax.Array, old_logprobs_bt: jax.Array, advantages_bt: jax.Array, mask_bt: jax.Array,
                clip: float = 0.2, *, normalization: str = "token", kl_bt: jax.Array | None = None,
                beta: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics), float32 scalars: the clipped surrogate plus beta * KL per token, reduced over response tokens.

  Per token (PPO clipping, as `l2jax.losses.ppo_policy_loss`; GRPO objective, DeepSeekMath equation 3):
    L_t = -min(rho_t A_t, clip(rho_t, 1 - clip, 1 + clip) A_t) + beta * kl_t,   rho_t = exp(log pi - log pi_old).
  normalization:
    "token"     sum_b sum_t m_bt L_bt / sum_b sum_t m_bt: every response token of the batch weighs the same
                (DAPO, Yu et al. 2025, section 3.4; TRL loss_type "bnpo");
    "sequence"  mean over rows of (sum_t m_bt L_bt / sum_t m_bt): every sequence weighs the same, a long
                response's tokens less (the original GRPO objective; TRL loss_type "grpo"). Rows with no response
                token are left out of the mean (TRL counts them as 0 in it).
  Means, not sums: micro-batches of unequal token counts do not accumulate to the full batch's "token" loss exactly.
  metrics, means over response tokens (0 with none): "clip_frac" (share of tokens where the clipped term is strictly
  the larger loss, so the token has no gradient), "approx_kl" (0.5 (log pi - log pi_old)^2), "ratio" (rho), and
  "kl" (kl_bt) when kl_bt is given.
  """
  if normalization not in ("token", "sequence"):
    raise ValueError(f"advantages.policy_loss: normalization must be 'token' or 'sequence', got {normalization!r}")
  m_bt = jnp.asarray(mask_bt).astype(bool)

  def row(logp_t, old_t, adv_t, m_t):
    return ppo_policy_loss(logp_t[None], old_t[None], adv_t[None], m_t[None], clip)

  # per row: sum of clipped-surrogate losses over its response tokens, its token count, its token-mean metrics
  pg_sum_b, count_b, row_metrics = jax.vmap(row)(logprobs_bt, old_logprobs_bt, advantages_bt, m_bt)
  sum_b = pg_sum_b
  if kl_bt is not None:
    kl_sum_b = jnp.sum(jnp.where(m_bt, jnp.asarray(kl_bt, jnp.float32), 0.0), axis=1)
    sum_b = sum_b + beta * kl_sum_b
  total = jnp.sum(count_b)
  if normalization == "token":
    loss = jnp.sum(sum_b) / jnp.maximum(total, 1.0)
  else:
    has_b = count_b > 0
    per_seq_b = jnp.where(has_b, sum_b / jnp.maximum(count_b, 1.0), 0.0)
    loss = jnp.sum(per_seq_b) / jnp.maximum(jnp.sum(has_b), 1).astype(jnp.float32)

  def token_mean(per_row_b):  # a row's token mean times its count is its token sum
    return jnp.sum(per_row_b * count_b) / jnp.maximum(total, 1.0)

  metrics = {"clip_frac": token_mean(row_metrics["clipfrac"]), "approx_kl": token_mean(row_metrics["approx_kl"]),
             "ratio": token_mean(row_metrics["ratio"])}
  if kl_bt is not None:
    metrics["kl"] = jnp.sum(kl_sum_b) / jnp.maximum(total, 1.0)
  return loss, metrics
