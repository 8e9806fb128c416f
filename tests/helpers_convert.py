"""Shared helpers for the converter tests: random HF models, Meta-layout exports, logits, tool loading."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
LLAMA2_TOKENIZER = DATA / "llama2-tokenizer" / "tokenizer.model"
TOK512 = DATA / "stories260K" / "tok512.model"


def tool(name: str):
  """The module tools/<name>.py (run as a script in production; imported here to call main(argv))."""
  spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def hf_model(n_heads=8, n_kv=2, hidden=64, layers=2, vocab=512, ffn=96, tie=False, seed=0):
  """A random fp32 transformers LlamaForCausalLM whose every weight (norms included) is non-trivial."""
  import torch
  import transformers
  cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                 num_attention_heads=n_heads, num_key_value_heads=n_kv, vocab_size=vocab,
                                 max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))  # so a swapped or misplaced norm shows in the logits
      else:
        p.normal_(0.0, 0.15)
  return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def l2jax_logits(ckpt_dir, ids: np.ndarray, **overrides) -> np.ndarray:
  import jax.numpy as jnp

  import l2jax
  model = l2jax.load(ckpt_dir, **{"dtype": "float32", **overrides})
  return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
  """max |got - want| <= rel * max |want| (a relative tolerance on the logit scale)."""
  assert got.shape == want.shape, (got.shape, want.shape)
  err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * max |logit| {scale:.3g}"


def random_ids(vocab: int, batch=2, seq=12, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def no_partial_output(out: Path) -> bool:
  """True when neither `out` nor an atomic_dir temporary beside it exists."""
  return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


# ---- Meta layout, written from an HF model ----

def meta_state_dict(model) -> dict:
  """The HF model's weights under Meta's names and layout (q/k rows un-permuted to interleaved pairs)."""
  from l2jax.convert.hf import unpermute
  import torch
  cfg = model.config
  hd = cfg.hidden_size // cfg.num_attention_heads
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
         "output.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
         "rope.freqs": torch.ones(hd // 2)}
  names = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
           "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
           "mlp.down_proj": "feed_forward.w2"}
  for i in range(cfg.num_hidden_layers):
    for hf, meta in names.items():
      w = sd[f"model.layers.{i}.{hf}.weight"]
      if hf in ("self_attn.q_proj", "self_attn.k_proj"):
        n = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads
        w = torch.from_numpy(unpermute(w.numpy(), n, hd).copy())
      out[f"layers.{i}.{meta}.weight"] = w
  return out


SPLIT0 = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
SPLIT1 = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def split_meta(sd: dict, n: int) -> list[dict]:
  """Model-parallel shards as Meta's fairscale layers hold them (column-parallel dim 0, row-parallel dim 1)."""
  shards = [{} for _ in range(n)]
  for k, w in sd.items():
    dim = 0 if any(s in k for s in SPLIT0) else 1 if any(s in k for s in SPLIT1) else None
    for j in range(n):
      shards[j][k] = w.clone() if dim is None else w.chunk(n, dim=dim)[j].clone().contiguous()
  return shards


def write_meta(out: Path, model, n_shards: int, multiple_of: int, ffn_dim_multiplier=None, dtype=None) -> Path:
  """A Meta checkpoint directory (params.json + consolidated.NN.pth) of an HF model."""
  import torch
  out.mkdir(parents=True, exist_ok=True)
  cfg = model.config
  sd = meta_state_dict(model)
  if dtype is not None:
    sd = {k: v.to(dtype) for k, v in sd.items()}
  for j, shard in enumerate(split_meta(sd, n_shards)):
    torch.save(shard, out / f"consolidated.{j:02d}.pth")
  params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "vocab_size": -1, "multiple_of": multiple_of,
            "norm_eps": cfg.rms_norm_eps}
  if ffn_dim_multiplier is not None:
    params["ffn_dim_multiplier"] = ffn_dim_multiplier
  (out / "params.json").write_text(json.dumps(params))
  return out
