"""Generalized advantage estimation (Schulman et al. 2016) for PPO (Llama 2 section 3.2.3: gamma 1, lambda 0.95).

Over the masked positions of each row (the response tokens), in order, with the value after a row's last
masked token taken as 0:
  delta_t = r_t + gamma * V_next(t) - V_t,   A_t = delta_t + gamma * lam * A_next(t),   R_t = A_t + V_t,
where next(t) is the next masked position of the row. Rows may be [prompt | response | pad] or response-only:
the mask may start at any column. Unmasked positions are skipped (the recursion carries over them), and their
advantages and returns are 0; a mask with gaps is treated as one sequence of its masked tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from l2jax.rl.rewards import masked_mean_var


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """(advantages_bt, returns_bt), float32 [B, T], by a reverse lax.scan over time (formula in the module docstring)."""
  r_tb = jnp.asarray(rewards_bt, jnp.float32).T
  v_tb = jnp.asarray(values_bt, jnp.float32).T
  m_tb = jnp.asarray(mask_bt).astype(bool).T

  def step(carry, x):
    next_v_b, next_a_b = carry
    r_b, v_b, m_b = x
    a_b = r_b + gamma * next_v_b - v_b + gamma * lam * next_a_b
    carry = (jnp.where(m_b, v_b, next_v_b), jnp.where(m_b, a_b, next_a_b))
    return carry, jnp.where(m_b, a_b, 0.0)

  zeros_b = jnp.zeros(r_tb.shape[1], jnp.float32)
  _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (r_tb, v_tb, m_tb), reverse=True)
  adv_bt = adv_tb.T
  ret_bt = jnp.where(m_tb.T, adv_bt + v_tb.T, 0.0)
  return adv_bt, ret_bt


def explained_variance(values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """float32 scalar 1 - Var(R - V) / Var(R) over masked positions (1 = perfect value model, <= 0 = useless)."""
  v = jnp.asarray(values_bt, jnp.float32)
  r = jnp.asarray(returns_bt, jnp.float32)
  _, var_r = masked_mean_var(r, mask_bt)
  _, var_d = masked_mean_var(r - v, mask_bt)
  return 1.0 - var_d / jnp.maximum(var_r, 1e-8)
