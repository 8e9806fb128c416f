"""DPO (Rafailov et al. 2023) in l2jax.losses: sequence log-probs, the loss, label smoothing, margin; hand numbers."""
import jax
import jax.numpy as jnp
import numpy as np

from l2jax.losses import dpo_loss, ranking_loss_sum, sequence_logprob

# One pair: policy log-probs chosen -1, rejected -3; reference -2, -2; beta 0.5:
# r_c = 0.5 (-1 + 2) = 0.5, r_r = 0.5 (-3 + 2) = -0.5, z = 1, loss = log(1 + e^-1) = 0.3132617.
ONE = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))


def test_sequence_logprob_masks():
  logp = jnp.array([[-1.0, -2.0, -9.0], [-9.0, -0.5, -0.25]])
  mask = jnp.array([[1, 1, 0], [0, 1, 1]], bool)
  np.testing.assert_allclose(np.asarray(sequence_logprob(logp, mask)), [-3.0, -0.75])


def test_dpo_hand_value_and_metrics():
  loss, m = jax.jit(dpo_loss, static_argnames=("beta", "label_smoothing"))(*ONE, beta=0.5)
  np.testing.assert_allclose(float(loss), 0.3132617, rtol=1e-6)
  np.testing.assert_allclose(float(m["rewards_chosen"]), 0.5)
  np.testing.assert_allclose(float(m["rewards_rejected"]), -0.5)
  np.testing.assert_allclose(float(m["reward_margin"]), 1.0)
  assert float(m["reward_accuracy"]) == 1.0
  assert float(m["logps_chosen"]) == -1.0 and float(m["logps_rejected"]) == -3.0


def test_dpo_label_smoothing_and_margin_by_hand():
  # ls 0.1: 0.9 log(1 + e^-1) + 0.1 log(1 + e) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
  np.testing.assert_allclose(float(dpo_loss(*ONE, beta=0.5, label_smoothing=0.1)[0]), 0.4132617, rtol=1e-6)
  # margin 0.5: z = 1 - 0.5, loss = log(1 + e^-0.5) = 0.4740770
  np.testing.assert_allclose(float(dpo_loss(*ONE, beta=0.5, margin_b=jnp.array([0.5]))[0]), 0.4740770, rtol=1e-6)


def test_dpo_is_ranking_loss_of_implicit_rewards():
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (jnp.asarray(rng.normal(-20, 5, 6), jnp.float32) for _ in range(4))
  margin = jnp.asarray(rng.uniform(0, 1, 6), jnp.float32)
  beta = 0.3
  loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, margin_b=margin)
  total, count = ranking_loss_sum(beta * (pc - rc), beta * (pr - rr), margin)
  np.testing.assert_allclose(float(loss), float(total / count), rtol=1e-5)
  want_acc = np.mean(np.asarray(beta * (pc - rc)) > np.asarray(beta * (pr - rr)))
  np.testing.assert_allclose(float(m["reward_accuracy"]), want_acc)


def test_dpo_gradients_match_numpy_reference():
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = (rng.normal(-10, 3, 5).astype(np.float32) for _ in range(4))
  margin = rng.uniform(0, 2, 5).astype(np.float32)
  beta, ls = 0.2, 0.15
  f = lambda a, b: dpo_loss(a, b, rc, rr, beta=beta, label_smoothing=ls, margin_b=margin)[0]
  g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
  z = beta * (pc - rc) - beta * (pr - rr) - margin
  sig = lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  want_c = (-beta * (1 - ls) * sig(-z) + beta * ls * sig(z)) / len(pc)  # mean over the 5 pairs
  np.testing.assert_allclose(np.asarray(g_c), want_c, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_r), -want_c, rtol=1e-5)
