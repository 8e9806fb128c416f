"""PPO rewards (Llama 2 section 3.2.3): the combined safety/helpfulness score, whitening, per-token KL rewards.

The paper's objective is max E[R(g | p)] with
  R(g | p) = R~c(g | p) - beta * D_KL(pi_theta(g | p) || pi_0(g | p)),
  Rc(g | p) = Rs(g | p) if IS_SAFETY(p) or Rs(g | p) < 0.15 else Rh(g | p),
  R~c(g | p) = WHITEN(LOGIT(Rc(g | p))),
where Rs, Rh are the safety and helpfulness reward models' scores as probabilities (sigmoid of the raw
scalar-head score). LOGIT(sigmoid(s)) = s, so R~c is the whitened raw score of the selected model. The KL
enters as a per-token reward -beta * (log pi_theta - log pi_0) on each sampled token (k1, the form of
Stiennon et al. 2020 that the paper follows); the whitened score is added at the response's last token.
All functions are pure jnp, float32, and jit-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8


def _logit(p) -> jax.Array:
  p = jnp.asarray(p, jnp.float32)
  return jnp.log(p) - jnp.log1p(-p)


def select_safety(safety_b: jax.Array, is_safety_b: jax.Array, threshold: float = 0.15) -> jax.Array:
  """bool [B]: True where Rc takes the safety model: IS_SAFETY(p) or sigmoid(Rs_raw) < threshold (section 3.2.3).

  sigmoid(s) < t is evaluated as s < logit(t) on the raw score (exact, no saturation for large |s|).
  """
  safety_b = jnp.asarray(safety_b, jnp.float32)
  return jnp.asarray(is_safety_b).astype(bool) | (safety_b < _logit(threshold))


def combine(helpful_b: jax.Array, safety_b: jax.Array, is_safety_b: jax.Array, threshold: float = 0.15) -> jax.Array:
  """float32 [B]: LOGIT(Rc), the raw score of the model that Rc selects (Llama 2 section 3.2.3).

  Rc = Rs if IS_SAFETY(p) or Rs < threshold else Rh, with Rs = sigmoid(safety_b), Rh = sigmoid(helpful_b);
  so LOGIT(Rc) = safety_b where `select_safety` else helpful_b. Whiten the result with `whiten` for R~c.
  """
  return jnp.where(select_safety(safety_b, is_safety_b, threshold), jnp.asarray(safety_b, jnp.float32),
                   jnp.asarray(helpful_b, jnp.float32))


def masked_mean_var(x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(mean, biased variance) of x over the entries where mask is true (over all if mask is None); 0, 0 if none."""
  x = jnp.asarray(x, jnp.float32)
  m = jnp.ones_like(x) if mask is None else jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  var = jnp.sum(jnp.square(x - mean) * m) / n
  return mean, var


def whiten(x: jax.Array, mask: jax.Array | None = None, shift_mean: bool = True) -> jax.Array:
  """(x - mean) / sqrt(var + 1e-8) over the entries where mask is true: the WHITEN of Llama 2 section 3.2.3.

  mean and var are taken over the masked entries only; var is the biased (population, numpy's default)
  variance, where TRL's masked_whiten uses the unbiased one (a factor n / (n - 1) apart). Unmasked entries are
  returned as 0 (so whitened advantages never leak into padding; TRL whitens them too and relies on the mask
  downstream). shift_mean=False adds the mean back, (x - mean) / std + mean, TRL's convention for rewards.
  mask None = all entries. Output float32, same shape as x.
  """
  x = jnp.asarray(x, jnp.float32)
  mean, var = masked_mean_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + EPS)
  if not shift_mean:
    out = out + mean
  if mask is not None:
    out = jnp.where(jnp.broadcast_to(jnp.asarray(mask), x.shape).astype(bool), out, 0.0)
  return out


def last_token_onehot(mask_bt: jax.Array) -> jax.Array:
  """bool [B, T]: True at each row's last masked position; an all-unmasked row is all False."""
  m = jnp.asarray(mask_bt).astype(bool)
  t = m.shape[1]
  last_b = t - 1 - jnp.argmax(m[:, ::-1], axis=1)
  return (jnp.arange(t)[None, :] == last_b[:, None]) & jnp.any(m, axis=1, keepdims=True)


def token_rewards(score_b: jax.Array, logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array, mask_bt: jax.Array,
                  beta: float) -> jax.Array:
  """float32 [B, T]: per-token PPO rewards (Llama 2 section 3.2.3, Stiennon et al. 2020).

  r_t = -beta * (log pi_theta(g_t) - log pi_0(g_t)) on masked (response) tokens, plus score_b (the whitened
  R~c) at each row's last masked token; 0 on unmasked tokens, and 0 everywhere for an all-unmasked row.
  """
  m = jnp.asarray(mask_bt).astype(bool)
  kl_bt = jnp.asarray(logprobs_bt, jnp.float32) - jnp.asarray(ref_logprobs_bt, jnp.float32)
  r_bt = jnp.where(m, -beta * kl_bt, 0.0)
  return r_bt + jnp.where(last_token_onehot(m), jnp.asarray(score_b, jnp.float32)[:, None], 0.0)


def kl_stats(logprobs_bt: jax.Array, ref_logprobs_bt: jax.Array, mask_bt: jax.Array) -> dict[str, jax.Array]:
  """Per-row KL(pi_theta || pi_0) estimates over the masked (sampled) tokens, float32 [B] each.

  "k1": sum_t (log pi_theta - log pi_0), the estimate in the reward (unbiased, may be negative per sample);
  "k3": sum_t ((exp(d_t) - 1) - d_t) with d_t = log pi_0 - log pi_theta (Schulman's k3: unbiased, >= 0,
  lower variance; for reporting); "tokens": the number of masked tokens. Both are exactly 0 when
  logprobs == ref_logprobs.
  """
  m = jnp.asarray(mask_bt).astype(bool)
  d_bt = jnp.asarray(ref_logprobs_bt, jnp.float32) - jnp.asarray(logprobs_bt, jnp.float32)
  k1_b = jnp.sum(jnp.where(m, -d_bt, 0.0), axis=1)
  k3_b = jnp.sum(jnp.where(m, jnp.expm1(d_bt) - d_bt, 0.0), axis=1)
  return {"k1": k1_b, "k3": k3_b, "tokens": jnp.sum(m, axis=1).astype(jnp.float32)}
