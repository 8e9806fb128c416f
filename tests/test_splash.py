"""Splash attention (the TPU attention kernel, l2jax.model.splash) against the XLA path, in Pallas interpret mode
on CPU: outputs and gradients, causal and packed documents, GQA 4/2 and 8/1, float32 and bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax import sharding as shd
from l2jax.model import llama, splash
from l2jax.model.config import LlamaConfig


def _cfg(n_heads, n_kv, dtype, impl):
  return LlamaConfig(vocab_size=64, dim=32 * n_heads, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=64,
                     max_seq_len=256, dtype=dtype, param_dtype="float32", remat="none", attention_impl=impl)


def _inputs(T=128, B=2, packed=False):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (B, T)), jnp.int32)
  if not packed:
    return tokens, None, None
  seg = np.ones((B, T), np.int32)
  seg[0, 40:] = 2
  seg[0, 90:] = 3
  seg[1, 70:] = 2
  pos = np.concatenate([np.arange(n) for n in np.unique(seg[0], return_counts=True)[1]])
  pos1 = np.concatenate([np.arange(n) for n in np.unique(seg[1], return_counts=True)[1]])
  return tokens, jnp.asarray(np.stack([pos, pos1]), jnp.int32), jnp.asarray(seg)


TOL = {"float32": 2e-5, "bfloat16": 3e-2}


# every pair of (GQA 4/2 | 8/1) x (float32 | bfloat16) x (causal | packed) appears once (interpret mode is slow)
@pytest.mark.parametrize("heads,dtype,packed", [((4, 2), "float32", True), ((8, 1), "float32", False),
                                                ((4, 2), "bfloat16", False), ((8, 1), "bfloat16", True)])
def test_splash_matches_xla_outputs_and_gradients(heads, dtype, packed):
  tokens, pos, seg = _inputs(packed=packed)
  xla_cfg, spl_cfg = _cfg(*heads, dtype, "xla"), _cfg(*heads, dtype, "splash")
  graphdef_x, params = llama.split(llama.init(xla_cfg, seed=3))
  graphdef_s, _ = llama.split(llama.init(spl_cfg, seed=3))

  def loss(graphdef, p):
    logits = jax.nn.log_softmax(llama.nnx.merge(graphdef, p)(tokens, pos, seg))
    return -jnp.mean(jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1))

  lx, gx = jax.value_and_grad(lambda p: loss(graphdef_x, p))(params)
  ls, gs = jax.value_and_grad(lambda p: loss(graphdef_s, p))(params)
  tol = TOL[dtype]
  np.testing.assert_allclose(float(ls), float(lx), rtol=tol)
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    assert float(jnp.max(jnp.abs(a - b))) / scale < 10 * tol


def test_packed_documents_do_not_attend_across_segments():
  # a change to document 1 must not move document 2's logits (splash enforces the segments itself)
  tokens, pos, seg = _inputs(packed=True)
  cfg = _cfg(4, 2, "float32", "splash")
  model = llama.init(cfg, seed=1)
  a = model(tokens, pos, seg)
  b = model(tokens.at[0, :40].set((tokens[0, :40] + 1) % 64), pos, seg)
  np.testing.assert_allclose(np.asarray(a[0, 40:]), np.asarray(b[0, 40:]), atol=1e-5)
  assert float(jnp.max(jnp.abs(a[0, :40] - b[0, :40]))) > 1e-3


def test_splash_under_shard_map_on_a_mesh_matches_one_device():
  tokens, pos, seg = _inputs(B=8, packed=True)
  tokens = jnp.concatenate([tokens] * 4)[:8]
  cfg = _cfg(4, 2, "float32", "splash")
  graphdef, params = llama.split(llama.init(cfg, seed=2))
  one = llama.nnx.merge(graphdef, params)(tokens, jnp.concatenate([pos] * 4)[:8], jnp.concatenate([seg] * 4)[:8])
  mesh = shd.make_mesh(2, 2, 2)
  with shd.use_rules(mesh, shd.TRAIN_RULES):
    sharded = jax.jit(lambda p, t, q, s: llama.nnx.merge(graphdef, p)(t, q, s))(
        params, tokens, jnp.concatenate([pos] * 4)[:8], jnp.concatenate([seg] * 4)[:8])
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=2e-5)


def test_unsupported_lengths_and_decode_use_xla():
  cfg = _cfg(4, 2, "float32", "splash")
  assert llama.use_splash(cfg, 256) and not llama.use_splash(cfg, 100)
  assert not llama.use_splash(_cfg(4, 2, "float32", None), 256)   # default on CPU: XLA
  assert splash.block_size(1024) == 512 and splash.block_size(384) == 128 and splash.block_size(64) is None
  # a length that does not tile (100) runs the XLA path and equals it
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 100)), jnp.int32)
  gd_s, params = llama.split(llama.init(cfg, seed=0))
  gd_x, _ = llama.split(llama.init(_cfg(4, 2, "float32", "xla"), seed=0))
  np.testing.assert_array_equal(np.asarray(llama.nnx.merge(gd_s, params)(tokens)),
                                np.asarray(llama.nnx.merge(gd_x, params)(tokens)))
