"""Group estimators (GRPO, RLOO), k3 KL and the token / sequence policy loss (l2jax.rl.advantages); hand numbers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax.rl.advantages import broadcast_to_tokens, group_rewards, grpo, k3_kl, policy_loss, rloo

# two prompts, k = 4, rows of one prompt contiguous. Group 0 = [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3],
# sum of squares 14. Group 1 = [5, 5, 5, 5]: identical rewards.
REWARDS = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]


def test_group_rewards_layout_and_errors():
  out = group_rewards(jnp.array(REWARDS), 4)
  assert out.shape == (2, 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), [[1, 2, 3, 6], [5, 5, 5, 5]])
  with pytest.raises(ValueError, match="group_size=3"):
    group_rewards(jnp.array(REWARDS), 3)
  with pytest.raises(ValueError, match="group_size=0"):
    group_rewards(jnp.array(REWARDS), 0)
  with pytest.raises(ValueError, match=r"\[B\]"):
    group_rewards(jnp.ones((2, 4)), 4)
  for fn in (rloo, grpo):
    with pytest.raises(ValueError, match=">= 2"):
      fn(jnp.array(REWARDS), 1)
    with pytest.raises(ValueError, match="group_size=3"):
      fn(jnp.array(REWARDS), 3)


def test_rloo_hand_values():
  # r_i - mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3 = [-8/3, -4/3, 0, 4]; group 1: 5 - 5 = 0
  out = np.asarray(jax.jit(rloo, static_argnums=1)(jnp.array(REWARDS), 4))
  np.testing.assert_allclose(out, [-2.6666667, -1.3333333, 0.0, 4.0, 0, 0, 0, 0], rtol=1e-6, atol=1e-6)
  # k = 2: each sample against the other one: [1, 3] -> [-2, 2]
  np.testing.assert_allclose(np.asarray(rloo(jnp.array([1.0, 3.0]), 2)), [-2.0, 2.0])


def test_grpo_hand_values_ddof_and_unscaled():
  r = jnp.array(REWARDS)
  # ddof 1 (TRL): std = sqrt(14 / 3) = 2.1602469; [-2, -1, 0, 3] / (2.1602469 + 1e-4)
  out = np.asarray(jax.jit(grpo, static_argnums=1)(r, 4))
  np.testing.assert_allclose(out[:4], [-0.9257772, -0.4628886, 0.0, 1.3886659], rtol=1e-5)
  # ddof 0 (population): std = sqrt(14 / 4) = 1.8708287
  np.testing.assert_allclose(np.asarray(grpo(r, 4, ddof=0))[:4], [-1.0689878, -0.5344939, 0.0, 1.6034817], rtol=1e-5)
  # identical rewards: 0 / (0 + eps) = 0, no NaN
  assert np.all(out[4:] == 0.0) and np.all(np.isfinite(out))
  # Dr. GRPO: only the group mean removed
  np.testing.assert_allclose(np.asarray(grpo(r, 4, scale=False)), [-2, -1, 0, 3, 0, 0, 0, 0], atol=1e-6)
  with pytest.raises(ValueError, match="ddof"):
    grpo(r, 4, ddof=4)


def test_broadcast_to_tokens_masks():
  mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  out = np.asarray(broadcast_to_tokens(jnp.array([2.0, -1.0, 7.0]), mask))
  np.testing.assert_array_equal(out, [[0, 2, 2, 0], [-1, -1, -1, -1], [0, 0, 0, 0]])
  assert out.dtype == np.float32


def test_k3_kl_hand_values():
  logp = jnp.array([[-1.0, -2.0, -0.5]])
  ref = jnp.array([[-2.0, -1.0, -0.5]])
  # d = ref - logp = [-1, 1, 0]: e^-1 + 1 - 1 = 0.3678794; e - 1 - 1 = 0.7182818; 0
  out = np.asarray(jax.jit(k3_kl)(logp, ref))
  np.testing.assert_allclose(out, [[0.3678794, 0.7182818, 0.0]], rtol=1e-6, atol=1e-7)
  d = np.random.default_rng(0).normal(0, 3, (3, 5)).astype(np.float32)
  assert np.all(np.asarray(k3_kl(jnp.zeros_like(d), d)) >= 0.0)
  # tiny differences: expm1 keeps d^2 / 2 accurate
  np.testing.assert_allclose(np.asarray(k3_kl(jnp.array([[0.0]]), jnp.array([[1e-3]]))), [[5.0016667e-7]], rtol=1e-3)


# Two rows, T = 3, clip 0.2. Row 0: three response tokens, A = 1, ratios [1, 1.5, 1]; token 1 is clipped:
# -min(1.5, 1.2) = -1.2, so losses [-1, -1.2, -1] (sum -3.2). Row 1: one response token, A = -2, ratio 1: loss 2;
# its other positions are off the mask and hold values that would change every number if counted.
LOGP = jnp.array([[0.0, math.log(1.5), 0.0], [0.0, 5.0, -5.0]])
OLD = jnp.zeros((2, 3))
ADV = jnp.array([[1.0, 1.0, 1.0], [-2.0, 100.0, 100.0]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
KL = jnp.array([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])


def test_policy_loss_token_vs_sequence_by_hand():
  # token: (-3.2 + 2) / 4 = -0.3; sequence: (-3.2 / 3 + 2 / 1) / 2 = 0.4666667
  tok, m = policy_loss(LOGP, OLD, ADV, MASK, 0.2, normalization="token")
  seq, _ = policy_loss(LOGP, OLD, ADV, MASK, 0.2, normalization="sequence")
  np.testing.assert_allclose(float(tok), -0.3, rtol=1e-6)
  np.testing.assert_allclose(float(seq), 0.4666667, rtol=1e-6)
  # one of four tokens clipped; approx_kl = 0.5 * log(1.5)^2 / 4 = 0.0822010 / 4; ratio (1 + 1.5 + 1 + 1) / 4
  np.testing.assert_allclose(float(m["clip_frac"]), 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(m["approx_kl"]), 0.0205502, rtol=1e-5)
  np.testing.assert_allclose(float(m["ratio"]), 1.125, rtol=1e-6)
  assert "kl" not in m


def test_policy_loss_kl_term_by_hand():
  # beta 0.5 adds [0.05, 0.1, 0.15] to row 0 (sum 0.3) and 0.2 to row 1.
  # token: (-3.2 + 0.3 + 2 + 0.2) / 4 = -0.175; sequence: (-2.9 / 3 + 2.2) / 2 = 0.6166667; kl metric: 1.0 / 4
  tok, m = policy_loss(LOGP, OLD, ADV, MASK, 0.2, normalization="token", kl_bt=KL, beta=0.5)
  seq, _ = policy_loss(LOGP, OLD, ADV, MASK, 0.2, normalization="sequence", kl_bt=KL, beta=0.5)
  np.testing.assert_allclose(float(tok), -0.175, rtol=1e-6)
  np.testing.assert_allclose(float(seq), 0.6166667, rtol=1e-6)
  np.testing.assert_allclose(float(m["kl"]), 0.25, rtol=1e-6)


def test_policy_loss_empty_row_bad_normalization_and_jit():
  # a third row with no response token: the token loss is unchanged, and the sequence mean leaves it out
  pad = lambda x, v: jnp.concatenate([x, jnp.full((1, 3), v, x.dtype)])
  args = (pad(LOGP, 3.0), pad(OLD, 0.0), pad(ADV, 50.0), pad(MASK, False))
  fn = jax.jit(policy_loss, static_argnames=("clip", "normalization"))
  np.testing.assert_allclose(float(fn(*args, clip=0.2, normalization="token")[0]), -0.3, rtol=1e-6)
  np.testing.assert_allclose(float(fn(*args, clip=0.2, normalization="sequence")[0]), 0.4666667, rtol=1e-6)
  # no response token at all: 0, not NaN
  loss, m = fn(*args[:3], jnp.zeros((3, 3), bool), clip=0.2, normalization="sequence")
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())
  with pytest.raises(ValueError, match="normalization"):
    policy_loss(LOGP, OLD, ADV, MASK, 0.2, normalization="seq")


def test_policy_loss_gradient_zero_on_clipped_token():
  # d/dlogp of the token loss: -A * rho / count where unclipped, 0 on the clipped token and off the mask
  g = np.asarray(jax.grad(lambda lp: policy_loss(lp, OLD, ADV, MASK, 0.2)[0])(LOGP))
  np.testing.assert_allclose(g, [[-0.25, 0.0, -0.25], [0.5, 0.0, 0.0]], rtol=1e-6, atol=1e-7)
