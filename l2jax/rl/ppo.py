"""The PPO update of Llama 2 section 3.2.3: one AdamW step per mini-batch for the policy and the value model.

update(state, rollout, key_data) -> (state, metrics), pure: for each of `epochs` passes, the batch's rows are
permuted and cut into mini-batches of `minibatch` rows; each mini-batch takes one gradient step of the clipped
policy loss (policy optimizer) and one of the clipped value loss (value optimizer), as the paper does ("one
gradient step per mini-batch"; TRL cannot do this, trl#5645). A mini-batch may be split into micro-batches
whose sums are accumulated, which gives the same step as the whole mini-batch (the losses return sums).
Losses are token means over the mini-batch's response tokens. state = {"params": {"policy", "value"},
"opt": {"policy", "value"}, "step", "rng"}.
The group estimators (GRPO, RLOO) take the same update with `group_policy_loss_fn` (l2jax.rl.advantages'
clipped surrogate, its "token" or "sequence" normalisation, DeepSeekMath's k3 term) and no value model
(value_graphdef None: state {"params": {"policy"}, "opt": {"policy"}, ...}).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from l2jax.losses import ppo_policy_loss, ppo_value_loss
from l2jax.rl import advantages as adv_lib
from l2jax.rl.rollout import response_start, shift_right, token_logprobs, window_logprobs

UPDATE_FIELDS = ("tokens", "mask", "logprobs", "values", "advantages", "returns")
GROUP_UPDATE_FIELDS = ("tokens", "mask", "logprobs", "ref_logprobs", "advantages")


def logprobs_fn(graphdef, temperature: float = 1.0, new_tokens: int = 0) -> Callable:
  """lp(params, mb) -> log pi(tokens[t] | tokens[:t]) float32 [B, T] of logits / temperature, as the rollout scored
  them (l2jax/rl/rollout.py). new_tokens > 0: the head only on each row's response window of that many positions
  (`rollout.window_logprobs`, from the row's first response token); 0: at every position."""
  def lp(params, mb):
    model = nnx.merge(graphdef, params)
    if new_tokens:
      return window_logprobs(model, mb["tokens"], response_start(mb["mask"]), new_tokens, temperature)[0]
    return token_logprobs(model(mb["tokens"]), mb["tokens"], temperature)[0]
  return lp


def policy_loss_fn(graphdef, clip: float, temperature: float = 1.0, new_tokens: int = 0) -> Callable:
  """loss(policy_params, mb) -> (sum of the clipped policy loss, (token count, metrics)) (l2jax.losses); the
  log-probabilities are `logprobs_fn`'s."""
  logprobs = logprobs_fn(graphdef, temperature, new_tokens)

  def loss(params, mb):
    s, n, m = ppo_policy_loss(logprobs(params, mb), mb["logprobs"], mb["advantages"], mb["mask"], clip)
    return s, (n, m)
  return loss


def group_policy_loss_fn(graphdef, clip: float, temperature: float = 1.0, *, normalization: str = "token",
                         kl_beta: float = 0.0, new_tokens: int = 0) -> Callable:
  """loss(policy_params, mb) -> (loss x count, (count, metrics)) of `advantages.policy_loss` (GRPO / RLOO): the
  clipped surrogate, + kl_beta * k3 against mb["ref_logprobs"] per token when kl_beta > 0 (DeepSeekMath eq. 3),
  normalised per token (count = response tokens) or per sequence (count = rows with a response token).

  The mean times its count is a sum, so `accumulated_grads` (sum over micro-batches / total count) gives the
  whole mini-batch's loss and gradient (DeepSeekMath's per-sequence mean over the mini-batch, or DAPO's token
  mean). Metrics are weighted by the same count: "clipfrac", "approx_kl", "ratio" and, with the KL term,
  "kl_loss" (mean k3 per token).
  """
  logprobs = logprobs_fn(graphdef, temperature, new_tokens)

  def loss(params, mb):
    lp_bt = logprobs(params, mb)
    kl_bt = adv_lib.k3_kl(lp_bt, mb["ref_logprobs"]) if kl_beta > 0 else None
    mean, m = adv_lib.policy_loss(lp_bt, mb["logprobs"], mb["advantages"], mb["mask"], clip,
                                  normalization=normalization, kl_bt=kl_bt, beta=kl_beta)
    tokens_b = jnp.sum(mb["mask"], axis=1)
    n = jnp.sum(tokens_b if normalization == "token" else tokens_b > 0).astype(jnp.float32)
    metrics = {"clipfrac": m["clip_frac"], "approx_kl": m["approx_kl"], "ratio": m["ratio"]}
    if kl_bt is not None:
      metrics["kl_loss"] = m["kl"]
    return mean * n, (n, metrics)
  return loss


def value_loss_fn(graphdef, clip: float) -> Callable:
  """loss(value_params, mb) -> (sum of the clipped value loss, (token count, metrics))."""
  def loss(params, mb):
    v_bt = shift_right(nnx.merge(graphdef, params).values(mb["tokens"]))
    s, n, m = ppo_value_loss(v_bt, mb["values"], mb["returns"], mb["mask"], clip)
    return s, (n, m)
  return loss


def accumulated_grads(loss_fn: Callable, params: Any, mb: dict, micro: int):
  """(mean gradient, mean loss, metrics) of sum-losses over `micro` micro-batches (rows i::micro), divided
  once by the total token count: equal to one pass over the whole mini-batch. Metrics are token-weighted."""
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if micro <= 1:
    (s, (n, m)), g = vg(params, mb)
  else:
    split = lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)

    def body(acc, x):
      (s, (n, m)), g = vg(params, x)
      return jax.tree.map(jnp.add, acc, (g, s, n, jax.tree.map(lambda v: v * n, m))), None
    zeros_m = jax.tree.map(lambda _: jnp.float32(0), jax.eval_shape(lambda: vg(params, mb)[0][1][1]))
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (g, s, n, m), _ = jax.lax.scan(body, (zeros_g, jnp.float32(0), jnp.float32(0), zeros_m),
                                   jax.tree.map(split, mb))
    m = jax.tree.map(lambda v: v / jnp.maximum(n, 1.0), m)
  denom = jnp.maximum(n, 1.0)
  g = jax.tree.map(lambda gi, p: (gi / denom).astype(p.dtype), g, params)
  return g, s / denom, m


def make_update(policy_graphdef, value_graphdef, policy_opt: optax.GradientTransformation,
                value_opt: optax.GradientTransformation | None, *, minibatch: int, micro_batch: int, epochs: int,
                clip: float, value_clip: float, temperature: float = 1.0, new_tokens: int = 0,
                policy_loss: Callable | None = None) -> Callable:
  """update(state, data {UPDATE_FIELDS: [B, T]}, key_data) -> (new state, metrics averaged over mini-batches).

  minibatch, micro_batch: rows. new_tokens: the response window of the policy's head (`logprobs_fn`).
  policy_loss: replaces PPO's (`group_policy_loss_fn`); value_graphdef None: no
  value model (data holds the fields the policy loss reads, GROUP_UPDATE_FIELDS).
  """
  p_loss = policy_loss or policy_loss_fn(policy_graphdef, clip, temperature, new_tokens)
  v_loss = value_loss_fn(value_graphdef, value_clip) if value_graphdef is not None else None
  micro = minibatch // micro_batch if micro_batch else 1

  def update(state, data, key_data):
    B = data["tokens"].shape[0]
    key = jax.random.wrap_key_data(key_data)
    perms_eb = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e), B) for e in range(epochs)])
    order_mk = perms_eb.reshape(epochs * (B // minibatch), minibatch)

    def body(carry, idx_k):
      params, opt = carry
      mb = {k: data[k][idx_k] for k in data}
      g_p, loss_p, m_p = accumulated_grads(p_loss, params["policy"], mb, micro)
      if v_loss is None:
        u_p, opt_p = policy_opt.update(g_p, opt["policy"], params["policy"])
        metrics = {"policy_loss": loss_p, "policy_grad_norm": optax.global_norm(g_p), **m_p}
        return ({"policy": optax.apply_updates(params["policy"], u_p)}, {"policy": opt_p}), metrics
      g_v, loss_v, m_v = accumulated_grads(v_loss, params["value"], mb, micro)
      u_p, opt_p = policy_opt.update(g_p, opt["policy"], params["policy"])
      u_v, opt_v = value_opt.update(g_v, opt["value"], params["value"])
      params = {"policy": optax.apply_updates(params["policy"], u_p),
                "value": optax.apply_updates(params["value"], u_v)}
      metrics = {"policy_loss": loss_p, "value_loss": loss_v, "policy_grad_norm": optax.global_norm(g_p),
                 "value_grad_norm": optax.global_norm(g_v), **m_p, **m_v}
      return (params, {"policy": opt_p, "value": opt_v}), metrics

    (params, opt), ms = jax.lax.scan(body, (state["params"], state["opt"]), order_mk)
    metrics = jax.tree.map(jnp.mean, ms)
    new = {"params": params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    return new, metrics

  return update
