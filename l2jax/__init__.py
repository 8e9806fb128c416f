"""l2jax: the Llama 2 recipe (Touvron et al., 2023) in JAX / Flax NNX."""
from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path


def _quiet_libtpu_off_tpu() -> None:
  """With the `tpu` extra installed on a machine without TPU chips (a CPU or GPU host that compiles for TPU
  slices with --aot), libtpu probes for a TPU host on JAX's start-up and prints a page of warnings into every
  command; tell it there is no pod to find. A TPU VM (/dev/accel*, /dev/vfio/*) is left alone."""
  if importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


_quiet_libtpu_off_tpu()

from l2jax.model import presets  # noqa: E402
from l2jax.model.config import LlamaConfig  # noqa: E402
from l2jax.model.llama import KVCache, Llama  # noqa: E402

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
