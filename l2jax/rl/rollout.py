"""PPO rollouts (Llama 2 section 3.2.3): sample one response per prompt (k per prompt for the group estimators
GRPO / RLOO) from the policy, then score it.

Two pure functions, each jitted once by the PPO stage with explicit shardings:

  generate(policy_params, batch, key) -> responses
    The policy's *training* parameters are constrained to the sampling layout (SAMPLE_RULES: no FSDP gather per
    decoded token) and cast to the sampling dtype inside the program: the paper's "consolidate the model weights
    on each node once before generation" (20x faster generation in their FSDP runs). Decoding is the sampler's
    on-device loop (`l2jax.sample._generate`), one key per row from (seed, iteration, prompt index, row of the
    global batch): a row's tokens do not depend on the batch layout or the number of devices, and a prompt that
    appears twice in one batch (an epoch boundary can put it there) gets two independent samples. The group
    estimators repeat each prompt k times first (`repeat_groups`: row = prompt * k + sample, one generate call),
    so a row's key is fixed by (seed, iteration, prompt index, prompt * k + sample) and the k samples of a
    prompt are k independent draws.
    Sampling is at `temperature` from the whole distribution (top-p is refused by the PPO config): the
    log-probabilities scored below are those of the distribution sampled.

  score(params, frozen, batch, responses) -> Rollout
    Assembles [prompt | response | pad] rows, then one forward pass each of the policy, the frozen reference
    policy, the value model and both reward models over the whole rows (the policies' vocabulary head and
    log-softmax on the response window only: `window_logprobs`); computes R~c = WHITEN(LOGIT(Rc)) over
    the batch, the per-token KL rewards and GAE (l2jax/rl/rewards.py, l2jax/rl/gae.py).

  group_score(params, frozen, batch, responses) -> Rollout   (`make_group_score`: GRPO, RLOO)
    The same rows, policy, reference and reward models, no value model: the sequence reward is the raw
    LOGIT(Rc) (minus the missing-EOS penalty, minus beta * sum_t k1_t when the KL is in the reward), its group
    advantage (l2jax/rl/advantages.py) is put on every response token; no per-token reward, values or returns.

Alignment: position t of every [B, T] array is the token tokens[:, t]; for a response token ("action") at t,
logprobs[:, t] = log pi_T(tokens[t] | tokens[:t]) and values[:, t] = V(tokens[:t]) (the value model's head read
at t - 1). `mask` is True exactly on the response tokens, EOS included when the row stopped on it.
pi_T = softmax(logits / temperature): the distribution the sampler draws from (its `logprobs`; at temperature 1
its `model_logprobs`). The reference pi_0 is scored at the same temperature and the KL is between the two
tempered distributions, as TRL's and OpenRLHF's PPO do.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from l2jax import sharding as shd
from l2jax.losses import token_nll
from l2jax.rl import advantages as adv_lib
from l2jax.rl import gae as gae_lib
from l2jax.rl import rewards


class Responses(NamedTuple):
  tokens_bn: jax.Array     # int32 [B, N] new tokens, pad after each row's length
  lengths_b: jax.Array     # int32 [B] new tokens per row (EOS counted when it ended the row)


class Rollout(NamedTuple):
  """One scored batch (all [B, T] arrays aligned as in the module docstring; float32 unless noted). The group
  estimators (`make_group_score`) have no values, rewards, returns or whitened score (None) and fill the last
  two fields instead."""
  tokens: jax.Array        # int32 [B, T]
  mask: jax.Array          # bool [B, T] response tokens
  logprobs: jax.Array      # [B, T] log pi_theta_old (the policy that sampled), 0 off the mask
  ref_logprobs: jax.Array  # [B, T] log pi_0
  values: jax.Array        # [B, T] V before each response token
  rewards: jax.Array       # [B, T] -beta * KL per token + R~c at the last response token
  advantages: jax.Array    # [B, T] GAE (whitened over the batch when configured); group: the row's on its tokens
  returns: jax.Array       # [B, T] advantages (before whitening) + values
  helpful: jax.Array       # [B] raw helpfulness score (logit of Rh)
  safety: jax.Array        # [B] raw safety score (logit of Rs)
  score: jax.Array         # [B] LOGIT(Rc): the raw score of the model Rc selects
  whitened: jax.Array      # [B] R~c (missing-EOS penalty included)
  used_safety: jax.Array   # bool [B] Rc took the safety model
  entropy: jax.Array       # [B] mean entropy of the policy over the row's response tokens
  eos: jax.Array           # bool [B] the response ended with EOS
  seq_reward: Any = None   # [B] group estimators: the sequence reward the estimator sees
  seq_advantage: Any = None  # [B] group estimators: GRPO / RLOO advantage of the row


def assemble(prompt_bp: jax.Array, prompt_lens_b: jax.Array, resp_bn: jax.Array, resp_lens_b: jax.Array,
             pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(tokens int32 [B, P+N], response mask bool [B, P+N], real-token mask bool [B, P+N]).

  Row b is prompt[b, :len_b] + response[b, :n_b] + padding: each response starts right after its own prompt.
  """
  B, P = prompt_bp.shape
  N = resp_bn.shape[1]
  t_t = jnp.arange(P + N, dtype=jnp.int32)[None, :]
  k_bt = t_t - prompt_lens_b[:, None]                      # index into the response
  in_prompt = t_t < prompt_lens_b[:, None]
  in_resp = (k_bt >= 0) & (k_bt < resp_lens_b[:, None])
  prompt_bt = jnp.pad(prompt_bp, ((0, 0), (0, N)), constant_values=pad_id)
  resp_bt = jnp.take_along_axis(resp_bn, jnp.clip(k_bt, 0, N - 1), axis=1)
  tokens = jnp.where(in_prompt, prompt_bt, jnp.where(in_resp, resp_bt, pad_id)).astype(jnp.int32)
  return tokens, in_resp, in_prompt | in_resp


def shift_right(x_bt: jax.Array) -> jax.Array:
  """[B, T] -> [B, T] with x[:, t-1] at t and 0 at t = 0 (per-position outputs -> per-next-token alignment)."""
  return jnp.pad(x_bt[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(log p(tokens[t] | tokens[:t]), entropy of p(. | tokens[:t])), both float32 [B, T], 0 at t = 0, with
  p = softmax(logits / temperature), the sampler's distribution at that temperature."""
  logits = logits_btv[:, :-1].astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  lp_bt = -token_nll(logits, tokens_bt[:, 1:])
  logp_btv = jax.nn.log_softmax(logits, axis=-1)
  ent_bt = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
  return jnp.pad(lp_bt, ((0, 0), (1, 0))), jnp.pad(ent_bt, ((0, 0), (1, 0)))


def window_logprobs(model, tokens_bt: jax.Array, start_b: jax.Array, n: int,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`token_logprobs` of `model` (a Llama) on each row's window t in [start_b, start_b + n) only, float32 [B, T],
  0 elsewhere: the transformer runs over the whole rows, but the [D, V] head and the log-softmax only at the n
  positions that predict the window's tokens (hidden state at t - 1), gathered first. PPO's window is the
  response: n = max_new_tokens of T = prompt + response positions (1024 of 2048 at the paper's sizes). One
  log-softmax gives the log-probability and the entropy. Equal to `token_logprobs` of the full logits on the
  window, up to float rounding (the head's matmul has another shape); start_b >= 1."""
  h_btd, _ = model.hidden(tokens_bt)
  B, T = tokens_bt.shape
  pos_bn = start_b[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]            # the window's tokens
  h_bnd = jnp.take_along_axis(h_btd, jnp.clip(pos_bn - 1, 0, T - 1)[..., None], axis=1)
  logits_bnv = model.head(h_bnd)
  if temperature != 1.0:
    logits_bnv = logits_bnv / temperature
  logp_bnv = jax.nn.log_softmax(logits_bnv, axis=-1)
  tgt_bn = jnp.take_along_axis(tokens_bt, jnp.clip(pos_bn, 0, T - 1), axis=1)
  vocab_v = jnp.arange(logp_bnv.shape[-1], dtype=jnp.int32)
  lp_bn = jnp.sum(jnp.where(vocab_v == tgt_bn[..., None], logp_bnv, 0.0), axis=-1)   # select, no gather (as token_nll)
  ent_bn = -jnp.sum(jnp.exp(logp_bnv) * logp_bnv, axis=-1)
  k_bt = jnp.arange(T, dtype=jnp.int32)[None, :] - start_b[:, None]
  inside_bt = (k_bt >= 0) & (k_bt < n)
  back = lambda x_bn: jnp.where(inside_bt, jnp.take_along_axis(x_bn, jnp.clip(k_bt, 0, n - 1), axis=1), 0.0)
  return back(lp_bn), back(ent_bn)


def response_start(mask_bt: jax.Array) -> jax.Array:
  """int32 [B]: the position of each row's first response token (`assemble` puts it right after the prompt; a row
  without one gets 1, its window is masked out anyway)."""
  return jnp.maximum(jnp.argmax(mask_bt, axis=1), 1).astype(jnp.int32)


def policy_and_reference(policy_graphdef, ref_graphdef, temperature: float) -> Callable:
  """fn(policy_params, ref_params, tokens [B, T], mask [B, T], n) -> (log pi, entropy of pi, log pi_0), float32
  [B, T], on each row's window of n response positions (`window_logprobs` from `response_start`), at the
  sampling temperature: the scoring shared by PPO and the group estimators."""
  def fn(policy_params, ref_params, tokens_bt, mask_bt, n: int):
    start_b = response_start(mask_bt)
    lp_bt, ent_bt = window_logprobs(nnx.merge(policy_graphdef, policy_params), tokens_bt, start_b, n, temperature)
    ref_lp_bt, _ = window_logprobs(nnx.merge(ref_graphdef, ref_params), tokens_bt, start_b, n, temperature)
    return lp_bt, ent_bt, ref_lp_bt
  return fn


def chunked(fn: Callable, chunks: int, *xs):
  """fn over the rows of xs in `chunks` chunks (lax.map; chunk i = rows i::chunks, as the train step splits
  micro-batches), so a big batch's [B, T, V] logits never live at once; chunks <= 1 calls fn once."""
  if chunks <= 1:
    return fn(*xs)
  split = lambda x: x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)
  out = jax.lax.map(lambda a: fn(*a), tuple(split(x) for x in xs))
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(-1, *y.shape[2:]), out)


def repeat_groups(batch: dict, group_size: int) -> dict:
  """Each prompt row of `batch` repeated group_size times, rows of a prompt contiguous: row = prompt * k + sample
  (the layout of l2jax.rl.advantages.group_rewards). group_size 1 returns the batch itself."""
  if group_size == 1:
    return batch
  return {k: jnp.repeat(v, group_size, axis=0) for k, v in batch.items()}


def make_generate(graphdef, cfg, mesh, sample_shardings, *, max_new_tokens: int, temperature: float,
                  eos_id: int, pad_id: int, chunks: int = 1) -> Callable:
  """generate(policy_params, batch, key_data) -> Responses; batch: prompt_tokens [B, P], prompt_lens, index.

  chunks: decode the rows in this many sequential chunks (the KV cache is 1/chunks of the batch's; the tokens
  are the same, since each row's randomness is its own).
  """
  from l2jax.sample import _generate
  dt = jnp.dtype(cfg.dtype)
  mode = (False, False, False)   # sampling at `temperature` from the whole vocabulary: no top-k, no top-p

  def generate(policy_params, batch, key_data) -> Responses:
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, policy_params)
    params = jax.lax.with_sharding_constraint(params, sample_shardings)   # consolidate before generation
    prompt_bp, lens_b = batch["prompt_tokens"], batch["prompt_lens"]
    P = prompt_bp.shape[1]
    key = jax.random.wrap_key_data(key_data)
    rows_b = jnp.arange(prompt_bp.shape[0], dtype=jnp.int32)    # the row of the global batch
    keys_b = jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(key, i), r))(batch["index"], rows_b)
    limits_b = jnp.minimum(max_new_tokens, cfg.max_seq_len - lens_b).astype(jnp.int32)

    def decode(prompt_bp, lens_b, limits_b, keys_b):
      n_b, out = _generate(params, prompt_bp, lens_b, limits_b, keys_b, jnp.float32(temperature), jnp.int32(0),
                           jnp.float32(1.0), jnp.asarray([eos_id], jnp.int32), jnp.int32(pad_id),
                           graphdef=graphdef, cache_len=P + max_new_tokens, n_out=max_new_tokens, mode=mode,
                           mesh=mesh, return_logits=False)
      return Responses(out["tokens"][:, :max_new_tokens], n_b)
    return chunked(decode, chunks, prompt_bp, lens_b, limits_b, keys_b)

  return generate


def sequence_scores(helpful_b, safety_b, is_safety_b, resp: Responses, threshold: float,
                    eos_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(Rc took the safety model bool [B], LOGIT(Rc) [B], ended with EOS bool [B]) (section 3.2.3)."""
  used_safety = rewards.select_safety(safety_b, is_safety_b, threshold)
  score_b = rewards.combine(helpful_b, safety_b, is_safety_b, threshold)
  last_b = jnp.take_along_axis(resp.tokens_bn, jnp.maximum(resp.lengths_b - 1, 0)[:, None], axis=1)[:, 0]
  eos_b = (resp.lengths_b > 0) & (last_b == eos_id)
  return used_safety, score_b, eos_b


RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def reward_model_fn(helpful_graphdef, safety_graphdef, same: bool = False) -> RewardFn:
  """reward_fn(frozen, tokens [B, T], seq_mask [B, T], response mask) -> (helpful [B], safety [B]) raw scores:
  each reward model's head at the row's last real token, as the reward stage trains and scores them.
  same: both are one reward model (one checkpoint directory, e.g. a single proxy): it runs once."""
  def reward_fn(frozen, tokens_bt, seq_mask_bt, mask_bt):
    m = seq_mask_bt.astype(jnp.int32)
    helpful_b = nnx.merge(helpful_graphdef, frozen["rm_helpful"])(tokens_bt, m)
    if same:
      return helpful_b, helpful_b
    return helpful_b, nnx.merge(safety_graphdef, frozen["rm_safety"])(tokens_bt, m)
  return reward_fn


def make_score(policy_graphdef, ref_graphdef, value_graphdef, reward_fn: RewardFn, *, eos_id: int, pad_id: int,
               kl_beta: float, gamma: float, lam: float, threshold: float, missing_eos_penalty: float,
               whiten_advantages: bool, chunks: int = 1, temperature: float = 1.0) -> Callable:
  """score(params {"policy", "value"}, frozen {"ref", "rm_helpful", "rm_safety"}, batch, responses) -> Rollout.

  R~c = WHITEN(LOGIT(Rc)) over the batch (section 3.2.3), minus `missing_eos_penalty` where the response did
  not end with EOS; rewards = -beta * (log pi - log pi_0) per response token + R~c at its last token; GAE
  with (gamma, lam); advantages whitened over the batch's response tokens when `whiten_advantages`.
  chunks: the forward passes run over the rows in this many chunks (memory; the result is the same).
  temperature: the sampling temperature; log-probabilities and entropy are those of logits / temperature.
  """
  logprobs = policy_and_reference(policy_graphdef, ref_graphdef, temperature)

  def forward(params, frozen, tokens_bt, mask_bt, n):
    lp_bt, ent_bt, ref_lp_bt = logprobs(params["policy"], frozen["ref"], tokens_bt, mask_bt, n)
    v_bt = shift_right(nnx.merge(value_graphdef, params["value"]).values(tokens_bt))
    return lp_bt, ent_bt, ref_lp_bt, v_bt

  def score(params, frozen, batch, resp: Responses) -> Rollout:
    tokens, mask, seq_mask = assemble(batch["prompt_tokens"], batch["prompt_lens"], resp.tokens_bn,
                                      resp.lengths_b, pad_id)
    tokens = shd.constrain(tokens, ("batch", "seq"))
    n = resp.tokens_bn.shape[1]
    lp, ent, ref_lp, v = chunked(lambda t, m: forward(params, frozen, t, m, n), chunks, tokens, mask)
    helpful_b, safety_b = chunked(lambda t, s, m: reward_fn(frozen, t, s, m), chunks, tokens, seq_mask, mask)
    zero = lambda x: jnp.where(mask, x, 0.0)
    lp, ref_lp, v = zero(lp), zero(ref_lp), zero(v)
    used_safety, score_b, eos_b = sequence_scores(helpful_b, safety_b, batch["is_safety"], resp, threshold, eos_id)
    whitened_b = rewards.whiten(score_b) - jnp.where(eos_b, 0.0, missing_eos_penalty)
    r_bt = rewards.token_rewards(whitened_b, lp, ref_lp, mask, kl_beta)
    adv, ret = gae_lib.gae(r_bt, v, mask, gamma, lam)
    if whiten_advantages:
      adv = rewards.whiten(adv, mask)
    n_b = jnp.maximum(jnp.sum(mask, axis=1), 1)
    return Rollout(tokens, mask, lp, ref_lp, v, r_bt, adv, ret, helpful_b, safety_b, score_b, whitened_b,
                   used_safety, jnp.sum(jnp.where(mask, ent, 0.0), axis=1) / n_b, eos_b)

  return score


def make_group_score(policy_graphdef, ref_graphdef, reward_fn: RewardFn, *, estimator: str, group_size: int,
                     eos_id: int, pad_id: int, kl_beta: float, kl_in: str, threshold: float,
                     missing_eos_penalty: float, chunks: int = 1, temperature: float = 1.0) -> Callable:
  """score(params {"policy"}, frozen {"ref", "rm_helpful", "rm_safety"}, batch, responses) -> Rollout for GRPO /
  RLOO, rows of a prompt contiguous (`repeat_groups`).

  Sequence reward r_b = LOGIT(Rc) - missing_eos_penalty * (no EOS) [- kl_beta * sum_t (log pi - log pi_0) when
  kl_in == "reward": RLOO's R(x, y) - beta * KL of Ahmadian et al. 2024 section 3 / TRL's RLOOTrainer]. LOGIT(Rc)
  is raw, not whitened over the batch (section 3.2.3's WHITEN): the estimators centre (and GRPO scales) within each
  group. A_b = advantages.grpo(r, k) (DeepSeekMath section 4.1.2) or advantages.rloo(r, k), put on the row's
  response tokens (advantages.broadcast_to_tokens). kl_in == "loss": the reward has no KL; the update adds
  kl_beta * k3 (advantages.k3_kl) against ref_logprobs.
  """
  if estimator not in ("grpo", "rloo"):
    raise ValueError(f"make_group_score: estimator must be 'grpo' or 'rloo', found {estimator!r}")
  if kl_in not in ("reward", "loss"):
    raise ValueError(f"make_group_score: kl_in must be 'reward' or 'loss', found {kl_in!r}")
  estimate = adv_lib.grpo if estimator == "grpo" else adv_lib.rloo

  logprobs = policy_and_reference(policy_graphdef, ref_graphdef, temperature)

  def score(params, frozen, batch, resp: Responses) -> Rollout:
    tokens, mask, seq_mask = assemble(batch["prompt_tokens"], batch["prompt_lens"], resp.tokens_bn,
                                      resp.lengths_b, pad_id)
    tokens = shd.constrain(tokens, ("batch", "seq"))
    n = resp.tokens_bn.shape[1]
    lp, ent, ref_lp = chunked(lambda t, m: logprobs(params["policy"], frozen["ref"], t, m, n), chunks, tokens, mask)
    helpful_b, safety_b = chunked(lambda t, s, m: reward_fn(frozen, t, s, m), chunks, tokens, seq_mask, mask)
    zero = lambda x: jnp.where(mask, x, 0.0)
    lp, ref_lp = zero(lp), zero(ref_lp)
    used_safety, score_b, eos_b = sequence_scores(helpful_b, safety_b, batch["is_safety"], resp, threshold, eos_id)
    seq_b = score_b - jnp.where(eos_b, 0.0, missing_eos_penalty)
    if kl_in == "reward":
      seq_b = seq_b - kl_beta * rewards.kl_stats(lp, ref_lp, mask)["k1"]
    adv_b = estimate(seq_b, group_size)
    n_b = jnp.maximum(jnp.sum(mask, axis=1), 1)
    return Rollout(tokens, mask, lp, ref_lp, None, None, adv_lib.broadcast_to_tokens(adv_b, mask), None,
                   helpful_b, safety_b, score_b, None, used_safety,
                   jnp.sum(jnp.where(mask, ent, 0.0), axis=1) / n_b, eos_b, seq_b, adv_b)

  return score
