"""PPO's rollout against the sampler (Llama 2 section 3.2.3): the log-probability PPO scores for each response
token (assemble, token_logprobs, shift_right) is the one the sampler drew it with, token by token, for prompts
of different lengths, at temperature 1 and at another temperature; the values, the entropy, the whitened score
and the missing-EOS penalty against independent numpy; repeated prompts in one batch get their own samples.

KL = 0 at pi_0 cannot catch a misalignment (policy and reference share the scoring function); the sampler's own
log-probabilities (computed in its decode loop, from its KV cache) can."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2jax import sharding as shd
from l2jax.model import heads, llama, presets
from l2jax.rl import ppo as ppo_lib
from l2jax.rl import rollout as ro
from l2jax.sample import Sampler

CFG = presets.get("test", vocab_size=128, max_seq_len=64)
PAD = 0
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12, 13, 14], [1, 20], [1, 30, 31, 32, 33]]
N = 10
PENALTY = 0.5


@pytest.fixture(scope="module")
def models():
  graphdef, params = llama.split(llama.init(CFG, 0))
  value = heads.ScalarModel(CFG, rngs=nnx.Rngs(params=3))
  v_graphdef, v_params = llama.split(value)
  return graphdef, params, v_graphdef, v_params


_CACHE: dict = {}


def _rollout(models, temperature: float):
  """(sampler output, EOS id, scored Rollout, batch) at `temperature`, computed once per module."""
  if temperature not in _CACHE:
    out, eos = _sample(models, temperature)
    _CACHE[temperature] = (out, eos, *_score(models, out, eos, temperature))
  return _CACHE[temperature]


def _sample(models, temperature: float):
  """The sampler's draws; EOS is chosen as the 4th token of row 0 (so row 0 ends on EOS early, the others
  most likely run to the limit): the same keys draw the same tokens whatever the stop token is."""
  graphdef, params = models[:2]
  free = Sampler((graphdef, params, CFG), eos_id=127, pad_id=PAD).generate(
      PROMPTS, N, temperature=temperature, seed=7, stop_on_eos=False)
  eos = int(free.tokens[0, 3])
  out = Sampler((graphdef, params, CFG), eos_id=eos, pad_id=PAD).generate(
      PROMPTS, N, temperature=temperature, seed=7, return_logits=True)
  assert out.stop_reasons[0] == "eos" and out.lengths[0] <= 4
  return out, eos


def _rule(frozen, tokens_bt, seq_mask_bt, mask_bt):
  """Rh = the count of response tokens below 40, Rs = 0.3 x the response length - 2 (numpy-checkable)."""
  helpful = jnp.sum((tokens_bt < 40) & mask_bt, axis=1).astype(jnp.float32)
  return helpful, 0.3 * jnp.sum(mask_bt, axis=1).astype(jnp.float32) - 2.0


def _score(models, out, eos: int, temperature: float):
  graphdef, params, v_graphdef, v_params = models
  B, P = len(PROMPTS), max(map(len, PROMPTS))
  prompt = np.full((B, P), PAD, np.int32)
  for b, p in enumerate(PROMPTS):
    prompt[b, :len(p)] = p
  batch = {"prompt_tokens": jnp.asarray(prompt), "prompt_lens": jnp.asarray([len(p) for p in PROMPTS], jnp.int32),
           "is_safety": jnp.asarray([0, 1, 0, 0], jnp.int32), "index": jnp.arange(B, dtype=jnp.int32)}
  resp = ro.Responses(jnp.asarray(out.tokens), jnp.asarray(out.lengths))
  score = ro.make_score(graphdef, graphdef, v_graphdef, _rule, eos_id=eos, pad_id=PAD, kl_beta=0.1, gamma=1.0,
                        lam=0.95, threshold=0.15, missing_eos_penalty=PENALTY, whiten_advantages=True,
                        temperature=temperature)
  return jax.jit(score)({"policy": params, "value": v_params}, {"ref": params}, batch, resp), batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scored_logprobs_are_the_samplers_token_by_token(models, temperature):
  out, eos, r, _ = _rollout(models, temperature)
  mask, tokens = np.asarray(r.mask), np.asarray(r.tokens)
  # the sampler's log-probability of each token under the distribution it drew from (its `logprobs`; at
  # temperature 1 that is also the raw model's, `model_logprobs`)
  want = out.logprobs if temperature != 1.0 else out.model_logprobs
  if temperature == 1.0:
    np.testing.assert_allclose(out.logprobs[out.mask()], out.model_logprobs[out.mask()], atol=1e-5)
  else:   # at 0.7 the raw model's differ: scoring them (the off-policy bug) would fail below
    assert np.max(np.abs(out.logprobs - out.model_logprobs)[out.mask()]) > 0.05
  for b, p in enumerate(PROMPTS):
    n = int(out.lengths[b])
    assert list(np.nonzero(mask[b])[0]) == list(range(len(p), len(p) + n))       # right after its own prompt
    np.testing.assert_array_equal(tokens[b, :len(p)], p)
    np.testing.assert_array_equal(tokens[b, mask[b]], out.tokens[b, :n])
    assert np.all(tokens[b, len(p) + n:] == PAD)
    np.testing.assert_allclose(np.asarray(r.logprobs)[b, mask[b]], want[b, :n], atol=2e-5)
    np.testing.assert_allclose(np.asarray(r.ref_logprobs)[b, mask[b]], want[b, :n], atol=2e-5)
    # entropy of the sampled distribution, softmax(raw logits / T), from the sampler's own logits
    x = out.logits[b, :n].astype(np.float64) / temperature
    logp = x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)
    np.testing.assert_allclose(float(r.entropy[b]), np.mean(-np.sum(np.exp(logp) * logp, -1)), rtol=1e-4)


def test_values_are_read_before_each_response_token(models):
  """values[t] = V(tokens[:t]): the value model's score of the row cut just before the token (shift_right)."""
  out, eos, r, _ = _rollout(models, 1.0)
  tokens = np.asarray(r.tokens)
  cuts = [(b, len(p) + k) for b, p in enumerate(PROMPTS) for k in range(int(out.lengths[b]))]
  rows = np.stack([tokens[b] for b, _ in cuts])
  keep = np.stack([np.arange(tokens.shape[1]) < t for _, t in cuts]).astype(np.int32)
  # the value model's own pooling (its head at the last kept token) over each row cut before token t
  v = jax.jit(lambda p, x, m: nnx.merge(models[2], p)(x, m))(models[3], rows, keep)
  np.testing.assert_allclose(np.asarray(r.values)[tuple(np.array(cuts).T)], np.asarray(v), atol=1e-5)


def test_scores_whitening_and_missing_eos_penalty_against_numpy(models):
  out, eos, r, batch = _rollout(models, 1.0)
  n_b = out.lengths.astype(np.float64)
  helpful = np.array([np.sum(out.tokens[b, :int(n_b[b])] < 40) for b in range(len(PROMPTS))], np.float64)
  safety = 0.3 * n_b - 2.0
  is_safety = np.asarray(batch["is_safety"]).astype(bool)
  use_safety = is_safety | (safety < np.log(0.15 / 0.85))
  score = np.where(use_safety, safety, helpful)
  eos_b = np.array([s == "eos" for s in out.stop_reasons])
  assert eos_b.any() and not eos_b.all()
  want = (score - score.mean()) / np.sqrt(score.var() + 1e-8) - PENALTY * ~eos_b
  np.testing.assert_allclose(np.asarray(r.score), score, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(r.eos), eos_b)
  np.testing.assert_allclose(np.asarray(r.whitened), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_update_scores_the_rollout_at_the_same_temperature(models, temperature):
  """The PPO ratio at the parameters that sampled is exactly 1 only if the update scores the tokens as the
  rollout did (logits / T)."""
  out, eos, r, _ = _rollout(models, temperature)
  mb = {k: getattr(r, k) for k in ppo_lib.UPDATE_FIELDS}
  _, (_, m) = jax.jit(ppo_lib.policy_loss_fn(models[0], 0.2, temperature))(models[1], mb)
  assert float(m["ratio"]) == pytest.approx(1.0, abs=1e-5) and float(m["approx_kl"]) < 1e-9
  _, (_, m1) = jax.jit(ppo_lib.policy_loss_fn(models[0], 0.2, 1.0 if temperature != 1.0 else 0.5))(models[1], mb)
  assert abs(float(m1["ratio"]) - 1.0) > 1e-3      # the other temperature is off-policy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_window_logprobs_equal_the_full_sequence_ones(models, temperature):
  """The head and log-softmax only on the response window (window_logprobs) give the full-sequence
  token_logprobs on every response token, and the same loss and gradient in the update (float rounding: the
  head's matmul has another shape)."""
  out, eos, r, batch = _rollout(models, temperature)
  graphdef, params = models[:2]
  model = nnx.merge(graphdef, params)
  full_lp, full_ent = ro.token_logprobs(model(r.tokens), r.tokens, temperature)
  win_lp, win_ent = ro.window_logprobs(model, r.tokens, ro.response_start(r.mask), N, temperature)
  mask = np.asarray(r.mask)
  np.testing.assert_allclose(np.asarray(win_lp)[mask], np.asarray(full_lp)[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(win_ent)[mask], np.asarray(full_ent)[mask], rtol=1e-5, atol=1e-5)
  assert np.array_equal(np.asarray(ro.response_start(r.mask)), np.asarray(batch["prompt_lens"]))
  mb = {k: getattr(r, k) for k in ppo_lib.UPDATE_FIELDS}
  mb["advantages"] = jnp.where(r.mask, jnp.linspace(-1.0, 1.0, r.mask.size).reshape(r.mask.shape), 0.0)
  mb["logprobs"] = jnp.where(r.mask, r.logprobs + 0.05, 0.0)   # off-policy: the ratio and the clip matter
  grads = {}
  for n in (0, N):
    vg = jax.value_and_grad(ppo_lib.policy_loss_fn(graphdef, 0.2, temperature, new_tokens=n), has_aux=True)
    grads[n] = jax.jit(vg)(params, mb)
  (s0, (c0, _)), g0 = grads[0]
  (s1, (c1, _)), g1 = grads[N]
  assert float(c0) == float(c1) and float(s1) == pytest.approx(float(s0), rel=1e-5, abs=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_a_wider_prompt_bucket_scores_the_same_rollout(models):
  """prompt_buckets: the same prompts padded to another width give the same rollout within float rounding
  (rows are [prompt | response | padding]; causal attention never reads the trailing padding)."""
  out, eos, r, batch = _rollout(models, 1.0)
  graphdef, params, v_graphdef, v_params = models
  wide = {**batch, "prompt_tokens": jnp.pad(batch["prompt_tokens"], ((0, 0), (0, 7)), constant_values=PAD)}
  score = ro.make_score(graphdef, graphdef, v_graphdef, _rule, eos_id=eos, pad_id=PAD, kl_beta=0.1, gamma=1.0,
                        lam=0.95, threshold=0.15, missing_eos_penalty=PENALTY, whiten_advantages=True)
  w = jax.jit(score)({"policy": params, "value": v_params}, {"ref": params}, wide,
                     ro.Responses(jnp.asarray(out.tokens), jnp.asarray(out.lengths)))
  T = r.tokens.shape[1]
  assert w.tokens.shape[1] == T + 7 and np.all(np.asarray(w.tokens)[:, T:] == PAD)
  np.testing.assert_array_equal(np.asarray(w.mask)[:, :T], np.asarray(r.mask))
  for f in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
    np.testing.assert_allclose(np.asarray(getattr(w, f))[:, :T], np.asarray(getattr(r, f)), rtol=1e-5, atol=1e-5)
  for f in ("score", "whitened", "entropy"):
    np.testing.assert_allclose(np.asarray(getattr(w, f)), np.asarray(getattr(r, f)), rtol=1e-5, atol=1e-6)


def test_a_prompt_twice_in_one_batch_gets_two_samples(models):
  """An epoch boundary can put one prompt twice in a batch: same prompt index, different rows."""
  graphdef, params = models[:2]
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  sample_sh = shd.tree_shardings(llama.logical_axes(llama.abstract(CFG)), mesh, shd.SAMPLE_RULES, params)
  gen = ro.make_generate(graphdef, CFG, mesh, sample_sh, max_new_tokens=N, temperature=1.0, eos_id=127,
                         pad_id=PAD)
  prompt = np.zeros((4, 8), np.int32)
  prompt[:, :3] = [1, 5, 6]
  batch = {"prompt_tokens": prompt, "prompt_lens": np.full(4, 3, np.int32), "index": np.array([3, 3, 3, 9], np.int32)}
  key = jax.random.key_data(jax.random.key(0))
  with shd.use_rules(mesh, shd.SAMPLE_RULES):
    resp = jax.jit(gen)(params, batch, key)
  toks = np.asarray(resp.tokens_bn)
  assert len({tuple(t) for t in toks[:3]}) == 3, toks
  # a row's tokens are its own: the same (prompt index, row) draws the same tokens in another batch
  batch2 = dict(batch, index=np.array([3, 4, 5, 6], np.int32))
  with shd.use_rules(mesh, shd.SAMPLE_RULES):
    toks2 = np.asarray(jax.jit(gen)(params, batch2, key).tokens_bn)
  np.testing.assert_array_equal(toks2[0], toks[0])


def test_one_reward_model_as_both_runs_once_with_the_same_scores():
  """PPO against a single proxy (helpful = safety = one directory, the over-optimisation benchmark) scores the rows
  once; the scores equal running the model twice."""
  from flax import nnx

  from l2jax.model import heads, llama, presets
  from l2jax.rl import rollout as ro
  cfg = presets.get("stories260k", dtype="float32")
  g, p = llama.split(heads.ScalarModel(cfg, rngs=nnx.Rngs(0)))
  t = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 500
  m = jnp.ones((2, 8), jnp.int32)
  frozen = {"rm_helpful": p, "rm_safety": p}
  twice = ro.reward_model_fn(g, g)(frozen, t, m, m)
  once_fn = ro.reward_model_fn(g, g, same=True)
  once = once_fn(frozen, t, m, m)
  np.testing.assert_array_equal(np.asarray(twice[0]), np.asarray(once[0]))
  np.testing.assert_array_equal(np.asarray(twice[1]), np.asarray(once[1]))
  eqns = lambda fn: len(jax.make_jaxpr(lambda f: fn(f, t, m, m))(frozen).jaxpr.eqns)
  assert eqns(once_fn) < eqns(ro.reward_model_fn(g, g))   # one model's program, not two
