"""Scalar head: last-token pooling with padding."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax.model import heads, presets


def test_last_token_index_with_right_padding():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(heads.last_token_index(mask), [2, 4, 0, 2])


def test_scalar_model_reads_last_real_token_and_ignores_padding():
  cfg = presets.get("test")
  model = heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))
  toks = jnp.array([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
  s = model(toks, mask)
  assert s.shape == (2,) and s.dtype == jnp.float32
  # padding content after the last real token must not change the score (causal + last-token pooling)
  np.testing.assert_allclose(s[0], s[1], rtol=1e-6)
  # and equals the head on the unpadded sequence, computed by hand
  h, _ = model.backbone.hidden(toks[:1, :3])
  want = float(h[0, -1].astype(jnp.float32) @ model.head.w[...] + model.head.b[...])
  np.testing.assert_allclose(float(s[0]), want, rtol=1e-5)
  # a different last token changes the score
  s2 = model(jnp.array([[5, 6, 8, 0, 0]], jnp.int32), mask[:1])
  assert abs(float(s2[0]) - float(s[0])) > 1e-6


def test_value_model_gives_the_reward_score_at_every_prefix():
  """values()[:, t] is the scalar model's score of the prefix tokens[:, :t+1] (the value model of PPO)."""
  cfg = presets.get("test")
  model = heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))
  toks = jnp.array([[5, 6, 7, 8, 9]], jnp.int32)
  v = model.values(toks)
  assert v.shape == (1, 5) and v.dtype == jnp.float32
  for t in range(5):
    mask = (jnp.arange(5) <= t).astype(jnp.int32)[None]
    np.testing.assert_allclose(float(v[0, t]), float(model(toks, mask)[0]), rtol=1e-5, atol=1e-6)
  assert float(jnp.std(v)) > 1e-6
