"""Reward-model batches padded to the longest row's bucket (not seq_len) give the padded batch's loss, scores
and gradients: the score is read at each row's last token and attention is causal."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax.data import preferences as prefs
from l2jax.data.tokenizer import Tokenizer
from l2jax.model import heads, llama, presets
from l2jax.stages.reward import pair_loss_fn

ROOT = Path(__file__).resolve().parents[1]


def test_bucket_len():
  assert [prefs.bucket_len(n, 128) for n in (1, 16, 17, 33, 100, 200)] == [16, 16, 32, 64, 128, 128]


def test_bucketed_pair_batches_equal_padded_ones():
  tok = Tokenizer(ROOT / "data/stories260K/tok512.model", chat_format="text")
  pairs = [prefs.Pair((("user", f"Once upon a time {i}"),), "a cat ran home. " * (1 + i % 3), "the dog sat.",
                      rating=i % 4) for i in range(12)]
  padded = prefs.PairBatches(pairs, tok, seq_len=128, global_batch=4, seed=1)
  bucketed = prefs.PairBatches(pairs, tok, seq_len=128, global_batch=4, seed=1, buckets=True)
  cfg = presets.get("stories260k", dtype="float32")
  model = heads.ScalarModel(cfg, rngs=nnx.Rngs(0))
  graphdef, params = llama.split(model)
  loss_fn = pair_loss_fn(graphdef, "small")
  shapes = set()
  for _ in range(5):
    a, b = next(padded), next(bucketed)
    shapes.add(b["tokens"].shape[-1])
    T = b["tokens"].shape[-1]
    assert T < 128 and np.array_equal(a["tokens"][..., :T], b["tokens"]) and a["mask"][..., T:].sum() == 0
    (la, _), ga = jax.value_and_grad(loss_fn, has_aux=True)(params, jax.tree.map(jnp.asarray, a))
    (lb, _), gb = jax.value_and_grad(loss_fn, has_aux=True)(params, jax.tree.map(jnp.asarray, b))
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  assert shapes <= {16, 32, 64}
  assert padded.get_state() == bucketed.get_state()
