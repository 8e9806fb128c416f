"""llama2.c legacy (version 0) `.bin` + its SentencePiece model -> l2jax model directory.

File layout (llama2.c export.py `legacy_export`, read by run.c): 7 little-endian int32
  [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len]
(vocab_size < 0 means an unshared classifier follows), then float32 arrays in this order:
  tok_embeddings (V, D); rms_att (L, D); wq (L, D, D); wk (L, KVD, D); wv (L, KVD, D); wo (L, D, D);
  rms_ffn (L, D); w1 (L, F, D); w2 (L, D, F); w3 (L, F, D); rms_final (D);
  freq_cis_real, freq_cis_imag (seq_len, head_size / 2 each; ignored, l2jax computes RoPE); [wcls (V, D)]
Matrices are torch Linear (out, in) in Meta's rotary layout, so no q/k permutation is needed. With a
shared classifier, tok_embeddings becomes both `embed` and `lm_head`. run.c fixes eps 1e-5, theta 10000.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from l2jax.convert import (NP_DTYPES, ConversionError, ParamPlan, check_dtype, check_out_dir,
                           check_tokenizer_vocab, compute_dtype_for, save)
from l2jax.model.config import LlamaConfig

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER)
MAGIC_V1 = 0x616B3432  # "ak42": llama2.c export.py version 1 / 2 files


def read_header(path: Path) -> dict[str, int]:
  """The 7-int header, checked for plausibility; ConversionError naming the file otherwise."""
  with open(path, "rb") as f:
    raw = f.read(HEADER_BYTES)
  if len(raw) < HEADER_BYTES:
    raise ConversionError(f"{path}: truncated: {len(raw)} bytes, a llama2.c header needs {HEADER_BYTES}")
  vals = np.frombuffer(raw, "<i4")
  if np.frombuffer(raw[:4], "<u4")[0] == MAGIC_V1:
    raise ConversionError(f"{path}: llama2.c version {vals[1]} export (magic 'ak42'); expected the legacy "
                          "version 0 format (llama2.c export.py --version 0)")
  h = dict(zip(HEADER, (int(v) for v in vals)))
  bad = [k for k, v in h.items() if (v == 0 if k == "vocab_size" else v <= 0)]
  if bad or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
    raise ConversionError(f"{path}: not a llama2.c legacy .bin: implausible header {h} "
                          f"(expected positive sizes, dim divisible by n_heads, n_heads by n_kv_heads)")
  return h


def layout(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of each float32 array after the header, in file order."""
  D, F, L, V = h["dim"], h["hidden_dim"], h["n_layers"], abs(h["vocab_size"])
  hs = D // h["n_heads"]
  kvd = h["n_kv_heads"] * hs
  arrays = [("tok_embeddings", (V, D)), ("rms_att", (L, D)), ("wq", (L, D, D)), ("wk", (L, kvd, D)),
            ("wv", (L, kvd, D)), ("wo", (L, D, D)), ("rms_ffn", (L, D)), ("w1", (L, F, D)), ("w2", (L, D, F)),
            ("w3", (L, F, D)), ("rms_final", (D,)), ("freq_cis_real", (h["seq_len"], hs // 2)),
            ("freq_cis_imag", (h["seq_len"], hs // 2))]
  if h["vocab_size"] < 0:
    arrays.append(("wcls", (V, D)))
  return arrays


# llama2.c array -> l2jax name (block arrays are stacked per layer in the file).
NAMES = {"tok_embeddings": "embed", "rms_att": "attn_norm", "wq": "wq", "wk": "wk", "wv": "wv", "wo": "wo",
         "rms_ffn": "ffn_norm", "w1": "w1", "w2": "w2", "w3": "w3", "rms_final": "norm", "wcls": "lm_head"}


def _read_f32(path: Path, offset: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.fromfile(path, "<f4", count=int(np.prod(shape)), offset=offset).reshape(shape)


def llama2c_to_l2jax(model_bin: str | Path, tokenizer: str | Path, out_dir: str | Path, *,
                     dtype: str = "float32", compute_dtype: str | None = None) -> Path:
  """Convert a llama2.c legacy .bin (+ SentencePiece tokenizer) into an l2jax model directory.

  dtype: stored parameter dtype (the file is float32). compute_dtype: config.dtype (default: `dtype`, so the
  float32 file computes in float32 and reproduces run.c).
  """
  path = Path(model_bin)
  check_out_dir(out_dir)
  check_dtype(dtype)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: llama2.c model file not found")
  tok = Path(tokenizer)
  if not tok.is_file():
    raise FileNotFoundError(f"{tok}: tokenizer model not found")
  h = read_header(path)
  arrays = layout(h)
  expected = HEADER_BYTES + 4 * sum(int(np.prod(s)) for _, s in arrays)
  found = path.stat().st_size
  if found != expected:
    what = "truncated" if found < expected else "has trailing bytes"
    raise ConversionError(f"{path}: file {what}: header {h} implies {expected} bytes, found {found}")
  try:
    cfg = LlamaConfig(vocab_size=abs(h["vocab_size"]), dim=h["dim"], n_layers=h["n_layers"], n_heads=h["n_heads"],
                      n_kv_heads=h["n_kv_heads"], ffn_dim=h["hidden_dim"], max_seq_len=h["seq_len"],
                      norm_eps=1e-5, rope_theta=10000.0, dtype=compute_dtype_for(dtype, compute_dtype),
                      param_dtype=dtype)
  except ValueError as e:
    raise ConversionError(f"{path}: header {h}: {e}") from None
  check_tokenizer_vocab(tok, cfg)

  # Each slot is read from its offset when its stacked parameter is built and written (one at a time).
  plan = ParamPlan(cfg, NP_DTYPES[dtype])
  offset = HEADER_BYTES
  for arr_name, shape in arrays:
    name = NAMES.get(arr_name)
    per_layer = name in ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
    item_shape = shape[1:] if per_layer else shape
    count = int(np.prod(item_shape))
    for i in range(cfg.n_layers if per_layer else 1):
      if name is not None:
        load = functools.partial(_read_f32, path, offset, item_shape)
        plan.add_meta(name, i if per_layer else None, item_shape, load,
                      f"{path}: {arr_name}" + (f"[{i}]" if per_layer else ""))
        if arr_name == "tok_embeddings" and h["vocab_size"] > 0:  # shared classifier
          plan.add_meta("lm_head", None, item_shape, load, f"{path}: tok_embeddings (shared classifier)")
      offset += 4 * count
  params = plan.finish(str(path))
  return save(out_dir, cfg, params, tok)
