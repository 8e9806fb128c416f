"""Named model shapes (data, not subclasses): Llama 2 (Touvron et al., 2023, Table 1) and small ones.

Llama 2 shapes are Meta's `params.json`: vocab 32000, context 4096, RMSNorm eps 1e-5,
FFN width from `multiple_of` / `ffn_dim_multiplier`, GQA with 8 KV heads for 34B and 70B.
"""
from __future__ import annotations

from l2jax.model.config import LlamaConfig

_L2 = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0)

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, **_L2),
    "llama2-13b": LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, **_L2),
    "llama2-34b": LlamaConfig(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016, **_L2),
    "llama2-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_L2),
    # TinyLlama-1.1B: the Llama 2 architecture and tokenizer at 1.1B (the benchmark shape).
    "tinyllama-1.1b": LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                                  vocab_size=32000, max_seq_len=2048, norm_eps=1e-5),
    # llama2.c's stories260K (Karpathy, tinyllamas): vocab 512, GQA 8/4.
    "stories260k": LlamaConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, ffn_dim=172,
                               vocab_size=512, max_seq_len=512, norm_eps=1e-5),
    # Small shapes for CPU runs and tests, on the Llama 2 tokenizer.
    "tiny": LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352,
                        vocab_size=32000, max_seq_len=256, dtype="float32", remat="none"),
    "test": LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        vocab_size=128, max_seq_len=64, dtype="float32", remat="none"),
}


def get(name: str, **overrides) -> LlamaConfig:
  """The preset `name`, with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
