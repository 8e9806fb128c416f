"""Meta's reference checkpoints (`consolidated.NN.pth` + `params.json`) -> l2jax model directory.

Meta's weights are already in the l2jax rotary layout (interleaved pairs); only the torch Linear (out, in)
orientation changes. A model trained with N-way model parallelism ships N shards, merged here along each
weight's split dimension (fairscale's layers in Meta's llama/model.py):
  column-parallel (split on dim 0): wq, wk, wv, w1, w3, output
  row-parallel    (split on dim 1): wo, w2, tok_embeddings (ParallelEmbedding splits the embedding dim)
  replicated:                       attention_norm, ffn_norm, norm
Shards are opened with `torch.load(..., weights_only=True, mmap=True)` (never plain pickle) and merged one
weight at a time.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from l2jax.convert import (NP_DTYPES, ConversionError, ParamPlan, check_dtype, check_out_dir,
                           check_tokenizer_vocab, compute_dtype_for, ffn_dim_meta, find_tokenizer, meta_shapes,
                           positive_int, positive_number, save)
from l2jax.model.config import LlamaConfig, read_json

TOP_KEYS = {"tok_embeddings.weight": "embed", "norm.weight": "norm", "output.weight": "lm_head"}
LAYER_KEYS = {
    "attention_norm.weight": "attn_norm",
    "ffn_norm.weight": "ffn_norm",
    "attention.wq.weight": "wq",
    "attention.wk.weight": "wk",
    "attention.wv.weight": "wv",
    "attention.wo.weight": "wo",
    "feed_forward.w1.weight": "w1",
    "feed_forward.w3.weight": "w3",
    "feed_forward.w2.weight": "w2",
}
IGNORED = {"rope.freqs"}
# l2jax name -> dimension of the Meta (out, in) tensor that model-parallel shards split; None: replicated.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "lm_head": 0,
             "wo": 1, "w2": 1, "embed": 1, "attn_norm": None, "ffn_norm": None, "norm": None}
PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_batch_size", "max_seq_len"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def meta_key(name: str, layer: int | None) -> str:
  if layer is None:
    return {v: k for k, v in TOP_KEYS.items()}[name]
  return f"layers.{layer}." + {v: k for k, v in LAYER_KEYS.items()}[name]


def parse_key(key: str, where: str) -> tuple[str, int | None] | None:
  """(l2jax name, layer) for a Meta key; None for ignored keys; ConversionError for unknown ones."""
  if key in TOP_KEYS:
    return TOP_KEYS[key], None
  m = _LAYER_RE.match(key)
  if m and m.group(2) in LAYER_KEYS:
    return LAYER_KEYS[m.group(2)], int(m.group(1))
  if key in IGNORED:
    return None
  raise ConversionError(f"{where}: unexpected tensor key {key!r}; expected {sorted(TOP_KEYS)} and "
                        f"layers.N.{{{', '.join(LAYER_KEYS)}}}")


def config_from_params(d: dict, where: str, vocab_size: int, max_seq_len: int, **fields) -> LlamaConfig:
  """LlamaConfig from Meta's params.json; `vocab_size` is used when the file says -1."""
  for key in ("dim", "n_layers", "n_heads", "multiple_of"):
    if key not in d:
      raise ConversionError(f"{where}: missing required key {key!r}")
  if d.get("use_scaled_rope"):
    raise ConversionError(f"{where}: use_scaled_rope=true (Llama 3.1 rope scaling) is not supported")
  v = d.get("vocab_size", -1)
  if v not in (-1, None) and v != vocab_size:
    raise ConversionError(f"{where}: vocab_size={v} but tok_embeddings.weight has {vocab_size} rows")
  dim, n_layers, n_heads, multiple_of = (positive_int(d, k, where) for k in ("dim", "n_layers", "n_heads",
                                                                            "multiple_of"))
  n_kv = positive_int(d, "n_kv_heads", where) if d.get("n_kv_heads") is not None else n_heads
  mult = positive_number(d, "ffn_dim_multiplier", where, optional=True)
  try:
    return LlamaConfig(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        ffn_dim=ffn_dim_meta(dim, multiple_of, mult), max_seq_len=max_seq_len,
        norm_eps=positive_number(d, "norm_eps", where, 1e-5),
        rope_theta=positive_number(d, "rope_theta", where, 10000.0, optional=True) or 10000.0, **fields)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None


def shard_paths(meta_dir: Path) -> list[Path]:
  """consolidated.00.pth ... consolidated.NN.pth, checked to be numbered 0..N-1 without gaps."""
  found = {int(m.group(1)): p for p in meta_dir.iterdir() if (m := _SHARD_RE.match(p.name))}
  if not found:
    raise FileNotFoundError(f"{meta_dir}: no consolidated.NN.pth checkpoint shards")
  missing = [i for i in range(max(found) + 1) if i not in found]
  if missing:
    raise ConversionError(f"{meta_dir}: mismatched shard count: found {len(found)} shards numbered up to "
                          f"{max(found):02d}, missing consolidated.{missing[0]:02d}.pth")
  return [found[i] for i in range(len(found))]


def to_numpy(t, where: str) -> np.ndarray:
  """A CPU torch tensor as numpy (bfloat16 through ml_dtypes), without copying."""
  import torch
  table = {torch.float32: None, torch.float16: None, torch.bfloat16: NP_DTYPES["bfloat16"]}
  if t.dtype not in table:
    raise ConversionError(f"{where}: dtype {t.dtype}; expected one of float32, bfloat16, float16")
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(NP_DTYPES["bfloat16"])
  return t.contiguous().numpy()


class _Shards:
  """The `consolidated.NN.pth` state dicts, opened memory-mapped on first use and dropped by `close`."""

  def __init__(self, paths: list[Path]):
    self.paths = paths
    self.shards: list[dict] | None = None

  def get(self) -> list[dict]:
    if self.shards is None:
      import torch
      shards = []
      for p in self.paths:
        try:
          shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # noqa: BLE001 - torch raises several types for corrupt or pickled files
          raise ConversionError(f"{p}: cannot read as a weights-only torch checkpoint "
                                f"({type(e).__name__}: {e})") from None
      self.shards = shards
    return self.shards

  def close(self) -> None:
    self.shards = None


def _merged(sources: _Shards, key: str, split: int | None, where: str) -> np.ndarray:
  """Tensor `key` merged over the model-parallel shards along `split`, as numpy in Meta layout."""
  import torch
  tensors = [sd[key] for sd in sources.get()]
  merged = tensors[0] if split is None or len(tensors) == 1 else torch.cat(tensors, dim=split)
  return to_numpy(merged, where)


def meta_to_l2jax(meta_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                  dtype: str | None = None, compute_dtype: str | None = None, max_seq_len: int = 4096) -> Path:
  """Convert a Meta Llama 2 checkpoint directory into an l2jax model directory; returns `out_dir`.

  dtype: stored parameter dtype (default: the checkpoint's). compute_dtype: config.dtype (default: the stored
  dtype, see `compute_dtype_for`). max_seq_len: not in params.json; Llama 2 used 4096.
  """
  import torch
  TORCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # noqa: N806
  meta_dir = Path(meta_dir)
  check_out_dir(out_dir)
  if not meta_dir.is_dir():
    raise FileNotFoundError(f"{meta_dir}: Meta checkpoint directory not found")
  params_path = meta_dir / "params.json"
  pj = read_json(params_path, "params.json (needed for the model shape)", ConversionError)
  paths = shard_paths(meta_dir)
  sources = _Shards(paths)
  shards = sources.get()
  n = len(shards)
  keys = list(shards[0])
  for p, sd in zip(paths[1:], shards[1:]):
    if set(sd) != set(keys):
      diff = sorted(set(keys) ^ set(sd))
      raise ConversionError(f"{p}: keys differ from {paths[0].name}: {diff[:5]}")
  if "tok_embeddings.weight" not in shards[0]:
    raise ConversionError(f"{paths[0]}: missing tensor 'tok_embeddings.weight'")
  vocab = int(shards[0]["tok_embeddings.weight"].shape[0])
  if dtype is None:
    dts = {shards[0][k].dtype for k in keys if k not in IGNORED}
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dts.pop()) \
        if len(dts) == 1 else "float32"
  check_dtype(dtype)
  cfg = config_from_params(pj, str(params_path), vocab, max_seq_len, dtype=compute_dtype_for(dtype, compute_dtype),
                           param_dtype=dtype)
  tok = find_tokenizer(tokenizer, meta_dir / "tokenizer.model", meta_dir.parent / "tokenizer.model")
  check_tokenizer_vocab(tok, cfg)

  # Plan every slot from the shards' shapes before any tensor data is read; each stacked parameter is then
  # merged and built layer by layer while it is written, with the shards re-opened (memory-mapped) per
  # parameter so the pages read for one parameter do not stay mapped for the rest of the conversion.
  want = meta_shapes(cfg)
  plan = ParamPlan(cfg, NP_DTYPES[dtype], release=sources.close)
  for key in keys:
    parsed = parse_key(key, str(paths[0]))
    if parsed is None:
      continue
    name, layer = parsed
    split = SPLIT_DIM[name]
    full = want[name]
    if split is not None and full[split] % n:
      raise ConversionError(f"{meta_dir}: mismatched shard count: {key} has size {full[split]} on dim {split}, "
                            f"not divisible into {n} shards")
    part = tuple(s // n if d == split else s for d, s in enumerate(full))
    for p, sd in zip(paths, shards):
      if tuple(sd[key].shape) != part:
        raise ConversionError(f"{p}: tensor {key!r}: expected shape {part} (full {full} split {n} ways on dim "
                              f"{split}), found {tuple(sd[key].shape)}")
      if sd[key].dtype not in TORCH_DTYPES:
        raise ConversionError(f"{p}: tensor {key!r}: dtype {sd[key].dtype}; expected one of float32, bfloat16, "
                              "float16")
    plan.add_meta(name, layer, full, functools.partial(_merged, sources, key, split, f"{paths[0]}: tensor {key!r}"),
                  f"{meta_dir}: tensor {key!r}")
  params = plan.finish(str(meta_dir), describe=meta_key)
  del shards
  sources.close()
  return save(out_dir, cfg, params, tok)
