"""l2jax: the Llama 2 recipe (Touvron et al., 2023) in JAX / Flax NNX."""
from __future__ import annotations

from pathlib import Path

from l2jax.model import presets
from l2jax.model.config import LlamaConfig
from l2jax.model.llama import KVCache, Llama

__all__ = ["load", "Llama", "LlamaConfig", "KVCache", "presets"]
__version__ = "0.1.0"


def load(ckpt_dir: str | Path, **overrides) -> Llama:
  """The model stored in an l2jax checkpoint directory; `model(tokens_bt)` gives float32 logits [B, T, vocab].

  It computes in the checkpoint's own dtype (config.json's `dtype`; the converters record the stored weights'
  dtype there, so a converted float32 checkpoint reproduces its float32 reference with no argument).
  `overrides` replace config fields, e.g. `load(d, dtype="bfloat16")` to compute in bf16.
  """
  import jax.numpy as jnp
  from flax import nnx

  from l2jax import checkpoint
  from l2jax.model import llama
  cfg, params = checkpoint.load_model_dir(ckpt_dir, **overrides)
  graphdef, _ = llama.split(llama.abstract(cfg))
  pd = jnp.dtype(cfg.param_dtype)
  import jax
  return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, pd), params))
