"""PPO math (Llama 2 section 3.2.3): combined reward, whitening, KL token rewards, GAE, PPO losses; vs hand numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax.losses import ppo_policy_loss, ppo_value_loss
from l2jax.rl.gae import explained_variance, gae
from l2jax.rl.rewards import combine, kl_stats, select_safety, token_rewards, whiten

LOGIT_015 = math.log(0.15 / 0.85)


def test_combine_threshold_both_sides_and_is_safety():
  helpful = jnp.array([2.0, 2.0, 2.0, 2.0, -1.0])
  safety = jnp.array([LOGIT_015 - 1e-3, LOGIT_015 + 1e-3, 5.0, 5.0, -0.5])
  is_safety = jnp.array([False, False, True, False, False])
  # sigmoid(Rs) just below 0.15 -> safety; just above -> helpful; IS_SAFETY overrides a high Rs; high Rs -> helpful
  sel = jax.jit(select_safety)(safety, is_safety)
  np.testing.assert_array_equal(np.asarray(sel), [True, False, True, False, False])
  out = jax.jit(combine)(helpful, safety, is_safety)
  assert out.dtype == jnp.float32 and out.shape == (5,)
  np.testing.assert_allclose(np.asarray(out), [LOGIT_015 - 1e-3, 2.0, 5.0, 2.0, -1.0], rtol=1e-6)
  # the probabilities agree with the paper's rule
  assert 1 / (1 + math.exp(-(LOGIT_015 - 1e-3))) < 0.15 < 1 / (1 + math.exp(-(LOGIT_015 + 1e-3)))
  # another threshold moves the boundary: sigmoid(-0.5) = 0.378 < 0.5
  np.testing.assert_array_equal(np.asarray(select_safety(safety, is_safety, threshold=0.5)),
                                [True, True, True, False, True])


def test_whiten_masked_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (4, 7)).astype(np.float32)
  mask = rng.random((4, 7)) < 0.6
  sel = x[mask].astype(np.float64)
  want = (sel - sel.mean()) / np.sqrt(sel.var() + 1e-8)
  out = np.asarray(jax.jit(whiten)(x, mask))
  np.testing.assert_allclose(out[mask], want, rtol=1e-5, atol=1e-5)
  assert np.all(out[~mask] == 0.0)
  out2 = np.asarray(jax.jit(lambda a, m: whiten(a, m, shift_mean=False))(x, mask))
  np.testing.assert_allclose(out2[mask], want + sel.mean(), rtol=1e-5, atol=1e-5)
  # no mask: all entries; a hand case: [1, 3] -> mean 2, var 1 -> [-1, 1]
  np.testing.assert_allclose(np.asarray(whiten(jnp.array([1.0, 3.0]))), [-1.0, 1.0], rtol=1e-6)
  full = x.astype(np.float64)
  np.testing.assert_allclose(np.asarray(whiten(x)), (full - full.mean()) / np.sqrt(full.var() + 1e-8), atol=1e-5)


def test_token_rewards_kl_and_score_placement_with_padding():
  lp = jnp.array([[-1.0, -2.0, -0.5, -0.1, 0.0],
                  [-9.0, -1.0, -1.5, -3.0, -7.0],
                  [-1.0, -1.0, -1.0, -1.0, -1.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, -9.0, 0.0],
                   [0.0, -2.0, -1.0, -3.0, 0.0],
                   [-2.0, -2.0, -2.0, -2.0, -2.0]])
  mask = jnp.array([[1, 1, 1, 0, 0],     # response from column 0, padded
                    [0, 1, 1, 1, 0],     # prompt, response starting at column 1, pad
                    [0, 0, 0, 0, 0]])    # empty row
  score = jnp.array([10.0, 20.0, 30.0])
  r = np.asarray(jax.jit(token_rewards)(score, lp, ref, mask, 0.1))
  want = np.array([[-0.05, 0.1, 10.0, 0.0, 0.0],
                   [0.0, -0.1, 0.05, 20.0, 0.0],
                   [0.0] * 5])
  np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-7)
  ks = jax.jit(kl_stats)(lp, ref, mask)
  np.testing.assert_allclose(np.asarray(ks["k1"]), [0.5 - 1.0 + 0.0, 1.0 - 0.5 + 0.0, 0.0], atol=1e-6)
  d = np.array([-0.5, 1.0, 0.0])  # ref - lp on row 0's response
  np.testing.assert_allclose(float(ks["k3"][0]), np.sum(np.expm1(d) - d), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(ks["tokens"]), [3, 3, 0])


def test_kl_exactly_zero_when_policy_is_reference():
  lp = jax.random.normal(jax.random.PRNGKey(0), (3, 6)) - 2.0
  mask = jnp.ones((3, 6), jnp.int32).at[1, :2].set(0)
  score = jnp.array([1.0, 2.0, 3.0])
  r = np.asarray(jax.jit(token_rewards)(score, lp, lp, mask, 0.01))
  assert np.all(r[:, :-1] == 0.0) and np.all(r[:, -1] == [1.0, 2.0, 3.0])
  ks = jax.jit(kl_stats)(lp, lp, mask)
  assert np.all(np.asarray(ks["k1"]) == 0.0) and np.all(np.asarray(ks["k3"]) == 0.0)


def _gae_loop(r, v, m, gamma, lam):
  """The direct double loop: over rows, then backwards over that row's masked positions."""
  adv, ret = np.zeros_like(r, np.float64), np.zeros_like(r, np.float64)
  for b in range(r.shape[0]):
    idx = [t for t in range(r.shape[1]) if m[b, t]]
    next_v, next_a = 0.0, 0.0
    for t in reversed(idx):
      delta = r[b, t] + gamma * next_v - v[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = v[b, t]
      adv[b, t], ret[b, t] = next_a, next_a + v[b, t]
  return adv, ret


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_matches_double_loop_ragged(gamma):
  rng = np.random.default_rng(1)
  B, T = 6, 11
  r = rng.normal(size=(B, T)).astype(np.float32)
  v = rng.normal(size=(B, T)).astype(np.float32)
  m = np.zeros((B, T), bool)
  for b, (s, n) in enumerate([(0, 11), (0, 4), (3, 5), (7, 4), (10, 1), (0, 0)]):
    m[b, s:s + n] = True
  adv, ret = jax.jit(gae, static_argnames=("gamma", "lam"))(r, v, m, gamma=gamma, lam=0.95)
  want_a, want_r = _gae_loop(r.astype(np.float64), v.astype(np.float64), m, gamma, 0.95)
  np.testing.assert_allclose(np.asarray(adv), want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_r, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[~m] == 0.0) and np.all(np.asarray(ret)[~m] == 0.0)


def test_gae_hand_case():
  # one row [prompt, resp, resp, pad]: r = (_, 0, 1), V = (_, 0.5, 0.2), gamma 1, lam 0.5
  r = jnp.array([[9.0, 0.0, 1.0, 9.0]])
  v = jnp.array([[9.0, 0.5, 0.2, 9.0]])
  m = jnp.array([[0, 1, 1, 0]])
  adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
  a2 = 1.0 - 0.2                       # delta at the last token, next value 0
  a1 = (0.0 + 0.2 - 0.5) + 0.5 * a2    # delta_1 + gamma * lam * A_2
  np.testing.assert_allclose(np.asarray(adv), [[0.0, a1, a2, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[0.0, a1 + 0.5, a2 + 0.2, 0.0]], rtol=1e-6)


def test_explained_variance():
  ret = jnp.array([[1.0, 2.0, 3.0, 0.0]])
  m = jnp.array([[1, 1, 1, 0]])
  assert float(explained_variance(ret, ret, m)) == pytest.approx(1.0)
  assert float(explained_variance(jnp.zeros_like(ret), ret, m)) == pytest.approx(0.0, abs=1e-6)


def test_ppo_policy_loss_hand_cases():
  f = jax.jit(ppo_policy_loss, static_argnames=("clip",))
  old = jnp.zeros((1, 4))
  # ratios e^0 = 1, e^0.1 = 1.105 (inside 0.2), e^0.5 = 1.649 (outside), e^-0.5 = 0.607 (outside); pad last
  lp = jnp.array([[0.0, 0.1, 0.5, -0.5]])
  adv = jnp.array([[2.0, 1.0, 1.0, -1.0]])
  mask = jnp.array([[1, 1, 1, 1]])
  s, n, met = f(lp, old, adv, mask)
  rho = np.exp([0.0, 0.1, 0.5, -0.5])
  # per token -min(rho A, clip(rho) A): 0) -2; 1) -1.105; 2) A>0, rho>1.2 -> -1.2; 3) A<0, rho<0.8 -> -(-0.8)... min
  # of (-0.607, -0.8) is -0.8, loss 0.8 (clipped: the pessimistic term)
  want = [-2.0, -rho[1], -1.2, 0.8]
  np.testing.assert_allclose(float(s), sum(want), rtol=1e-6)
  assert float(n) == 4.0
  assert float(met["clipfrac"]) == pytest.approx(0.5)
  np.testing.assert_allclose(float(met["approx_kl"]), np.mean(0.5 * np.square([0.0, 0.1, 0.5, -0.5])), rtol=1e-6)
  # outside the band on the side that does not clip (A > 0, rho < 0.8): unclipped term, no clip counted
  s2, _, met2 = f(jnp.array([[-0.5]]), jnp.zeros((1, 1)), jnp.array([[1.0]]), jnp.array([[1]]))
  np.testing.assert_allclose(float(s2), -rho[3], rtol=1e-6)
  assert float(met2["clipfrac"]) == 0.0
  # a large clip never clips: the plain -rho A sum; masked tokens excluded
  mask_p = jnp.array([[1, 1, 1, 0]])
  s3, n3, met3 = f(lp, old, adv, mask_p, clip=10.0)
  np.testing.assert_allclose(float(s3), -np.sum(rho[:3] * [2.0, 1.0, 1.0]), rtol=1e-6)
  assert float(n3) == 3.0 and float(met3["clipfrac"]) == 0.0


def test_ppo_policy_loss_gradient_on_policy():
  # at rho = 1 the gradient of the loss w.r.t. logprobs is -A (per masked token)
  adv = jnp.array([[0.5, -2.0, 3.0]])
  mask = jnp.array([[1, 1, 0]])
  g = jax.grad(lambda lp: ppo_policy_loss(lp, jnp.zeros((1, 3)), adv, mask)[0])(jnp.zeros((1, 3)))
  np.testing.assert_allclose(np.asarray(g), [[-0.5, 2.0, 0.0]], rtol=1e-6)


def test_ppo_value_loss_hand_cases():
  f = jax.jit(ppo_value_loss, static_argnames=("clip",))
  old = jnp.array([[0.0, 0.0, 0.0, 0.0]])
  v = jnp.array([[0.1, 1.0, 1.0, 5.0]])
  ret = jnp.array([[0.0, 2.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  s, n, met = f(v, old, ret, mask)
  # 0) inside the band: (0.1)^2; 1) v clipped to 0.2: (0.2-2)^2 = 3.24 > (1-2)^2 = 1 -> 3.24;
  # 2) clipped (0.2-0)^2 = 0.04 < (1-0)^2 = 1 -> 1
  np.testing.assert_allclose(float(s), 0.5 * (0.01 + 3.24 + 1.0), rtol=1e-6)
  assert float(n) == 3.0
  assert float(met["vf_clipfrac"]) == pytest.approx(1.0 / 3.0)
  s2, _, met2 = f(v, old, ret, mask, clip=100.0)
  np.testing.assert_allclose(float(s2), 0.5 * (0.01 + 1.0 + 1.0), rtol=1e-6)
  assert float(met2["vf_clipfrac"]) == 0.0
