"""Hugging Face `LlamaForCausalLM` safetensors <-> l2jax model directory.

HF stores q_proj / k_proj rows permuted so that rotary pairs are (x[i], x[i + Dh/2]) ("rotate_half");
Meta and l2jax pair (x[2i], x[2i+1]). transformers' convert_llama_weights_to_hf.py applies, per head,
  permute(w) = w.view(n, Dh/2, 2, D).transpose(1, 2).reshape(n * Dh, D)
and `unpermute` below is its inverse. All other weights are torch Linear (out, in), handled by the
Meta-layout maps in `l2jax.convert`. Safetensors are read and written here directly (the format is a JSON
header and raw little-endian arrays), one tensor at a time, so bfloat16 needs no torch.
"""
from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np

from l2jax.convert import (BLOCK_NAMES, NP_DTYPES, ConversionError, ParamPlan, check_dtype, check_out_dir,
                           check_tokenizer_vocab, compute_dtype_for, dtype_name, find_tokenizer, l2jax_to_meta,
                           meta_shapes, positive_int, positive_number, save, writing)
from l2jax.model.config import LlamaConfig, read_json

ST_DTYPES = {"F32": NP_DTYPES["float32"], "BF16": NP_DTYPES["bfloat16"], "F16": NP_DTYPES["float16"]}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# HF key -> l2jax name. "{i}" is the layer index.
TOP_KEYS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
LAYER_KEYS = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "mlp.gate_proj.weight": "w1",
    "mlp.up_proj.weight": "w3",
    "mlp.down_proj.weight": "w2",
}
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_key(name: str, layer: int | None) -> str:
  if layer is None:
    return {v: k for k, v in TOP_KEYS.items()}[name]
  return f"model.layers.{layer}." + {v: k for k, v in LAYER_KEYS.items()}[name]


def parse_key(key: str, where: str = "") -> tuple[str, int | None] | None:
  """(l2jax name, layer) for an HF key; None for keys we ignore; ConversionError for unknown ones."""
  if key in TOP_KEYS:
    return TOP_KEYS[key], None
  m = _LAYER_RE.match(key)
  if m and m.group(2) in LAYER_KEYS:
    return LAYER_KEYS[m.group(2)], int(m.group(1))
  if IGNORED.match(key):
    return None
  raise ConversionError(f"{where}: unexpected tensor key {key!r}; expected {sorted(TOP_KEYS)} and "
                        f"model.layers.N.{{{', '.join(LAYER_KEYS)}}}")


def unpermute(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
  """HF rotate_half row order -> Meta interleaved row order, for a (n_heads * head_dim, D) q/k weight."""
  d = w.shape[-1]
  return w.reshape(n_heads, 2, head_dim // 2, d).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d)


def permute(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
  """Meta interleaved row order -> HF rotate_half row order (transformers' convert script's `permute`)."""
  d = w.shape[-1]
  return w.reshape(n_heads, head_dim // 2, 2, d).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d)


# ---- safetensors, read and written one tensor at a time ----

class SafetensorsFile:
  """The header of one .safetensors file, validated against the file size; `read(key)` loads one tensor."""

  def __init__(self, path: Path):
    self.path = Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else -1
      if n < 0 or n > size - 8:
        raise ConversionError(f"{self.path}: truncated or not a safetensors file (file has {size} bytes, "
                              f"header says {n} header bytes)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{self.path}: invalid safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.entries: dict[str, dict] = header
    data_bytes = size - self.data_start
    for key, e in header.items():
      begin, end = e["data_offsets"]
      if end > data_bytes:
        raise ConversionError(f"{self.path}: tensor {key!r} ends at byte {end} of the data section but the file "
                              f"has only {data_bytes}: file truncated")
      if e["dtype"] in ST_DTYPES:  # other dtypes are reported by `dtype` when the converter asks
        self._check_size(key)

  def keys(self) -> list[str]:
    return list(self.entries)

  def dtype(self, key: str) -> np.dtype:
    name = self.entries[key]["dtype"]
    if name not in ST_DTYPES:
      raise ConversionError(f"{self.path}: tensor {key!r} has dtype {name}; expected one of {sorted(ST_DTYPES)}")
    return ST_DTYPES[name]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key]["shape"])

  def _check_size(self, key: str) -> int:
    """The element count of tensor `key`; ConversionError if its byte range does not match shape and dtype."""
    e = self.entries[key]
    dt, shape = self.dtype(key), self.shape(key)
    begin, end = e["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dt.itemsize:
      raise ConversionError(f"{self.path}: tensor {key!r}: shape {shape} {e['dtype']} needs "
                            f"{count * dt.itemsize} bytes, header gives {end - begin}")
    return count

  def read(self, key: str) -> np.ndarray:
    count = self._check_size(key)
    offset = self.data_start + self.entries[key]["data_offsets"][0]
    return np.fromfile(self.path, dtype=self.dtype(key), count=count, offset=offset).reshape(self.shape(key))


def write_safetensors(path: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], produce) -> None:
  """Write tensors `specs` = [(key, dtype, shape)] to `path`, calling `produce(key)` for each in turn."""
  header, offset = {}, 0
  for key, dt, shape in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    header[key] = {"dtype": ST_NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for key, dt, shape in specs:
      arr = np.ascontiguousarray(produce(key), dtype=dt)
      if arr.shape != tuple(shape):
        raise ConversionError(f"{path}: tensor {key!r}: expected shape {tuple(shape)}, produced {arr.shape}")
      f.write(arr.reshape(-1).view(np.uint8))  # not ndarray.tofile: a full disk must raise OSError(ENOSPC)


# ---- config.json ----

def config_from_hf(d: dict, where: str, **fields) -> LlamaConfig:
  """LlamaConfig from an HF Llama config.json dict; ConversionError for what l2jax does not implement."""
  def need(key):
    if key not in d or d[key] is None:
      raise ConversionError(f"{where}: missing required key {key!r}")
    return d[key]

  if d.get("model_type", "llama") != "llama":
    raise ConversionError(f"{where}: model_type {d['model_type']!r}; expected 'llama'")
  if d.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{where}: hidden_act {d['hidden_act']!r}; expected 'silu' (SwiGLU)")
  for flag in ("attention_bias", "mlp_bias"):
    if d.get(flag):
      raise ConversionError(f"{where}: {flag}=true is not supported (Llama 2 has no biases)")
  if d.get("rope_scaling") is not None:
    raise ConversionError(f"{where}: rope_scaling={d['rope_scaling']!r} is not supported; expected null")
  rope = d.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise ConversionError(f"{where}: rope_parameters must be an object or null, found {type(rope).__name__}")
  if rope.get("rope_type", "default") != "default":
    raise ConversionError(f"{where}: rope_parameters.rope_type={rope['rope_type']!r} is not supported; "
                          "expected 'default'")
  theta = positive_number({"rope_theta": d.get("rope_theta", rope.get("rope_theta", 10000.0))}, "rope_theta", where)
  sizes = {k: positive_int(d, k, where, need(k)) for k in ("hidden_size", "num_attention_heads", "vocab_size",
                                                            "num_hidden_layers", "intermediate_size")}
  dim, heads = sizes["hidden_size"], sizes["num_attention_heads"]
  head_dim = positive_int(d, "head_dim", where) if d.get("head_dim") is not None else None
  if head_dim is not None and heads * head_dim != dim:
    raise ConversionError(f"{where}: head_dim={head_dim} with num_attention_heads={heads}; expected "
                          f"hidden_size / num_attention_heads = {dim / heads:g}")
  kv = positive_int(d, "num_key_value_heads", where) if d.get("num_key_value_heads") is not None else heads
  try:
    return LlamaConfig(vocab_size=sizes["vocab_size"], dim=dim, n_layers=sizes["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=kv, ffn_dim=sizes["intermediate_size"],
                       max_seq_len=positive_int(d, "max_position_embeddings", where, 2048),
                       norm_eps=positive_number(d, "rms_norm_eps", where, 1e-6), rope_theta=theta, **fields)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
  """An HF `LlamaConfig` dict (config.json) for `cfg`, stored in `dtype`."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
      "pad_token_id": None, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
      "torch_dtype": dtype,
  }


# ---- HF -> l2jax ----

def _shard_files(hf_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
  """The safetensors files of a checkpoint and, when sharded, the index's key -> file map."""
  index = hf_dir / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ConversionError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (hf_dir / n).is_file()]
    if missing:
      raise ConversionError(f"{index}: lists shard files that are missing: {missing}")
    totals = sorted({int(m.group(1)) for n in names if (m := re.search(r"-of-(\d+)\.safetensors$", n))})
    if totals and totals != [len(names)]:
      raise ConversionError(f"{index}: mismatched shard count: the file names say {totals} shards, "
                            f"the index lists {len(names)} files: {names}")
    return [hf_dir / n for n in names], weight_map
  if (hf_dir / SINGLE).is_file():
    return [hf_dir / SINGLE], None
  others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pth"))
  hint = f"; found {others} (only safetensors is read: re-save with safe_serialization)" if others else ""
  raise FileNotFoundError(f"{hf_dir}: no {SINGLE} or {INDEX}{hint}")


def hf_to_l2jax(hf_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                dtype: str | None = None, compute_dtype: str | None = None) -> Path:
  """Convert an HF Llama safetensors checkpoint into an l2jax model directory; returns `out_dir`.

  dtype: stored parameter dtype (default: the checkpoint's, float32 if mixed). compute_dtype: config.dtype
  (default: the stored dtype, see `compute_dtype_for`).
  """
  hf_dir = Path(hf_dir)
  check_out_dir(out_dir)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"{hf_dir}: HF checkpoint directory not found")
  cfg_path = hf_dir / "config.json"
  hf_cfg = read_json(cfg_path, "config.json (needed for the model shape)", ConversionError)
  files, weight_map = _shard_files(hf_dir)
  shards = [SafetensorsFile(p) for p in files]
  if weight_map is not None:
    by_name = {s.path.name: s for s in shards}
    for key, fname in weight_map.items():
      if key not in by_name[fname].entries:
        raise ConversionError(f"{by_name[fname].path}: key {key!r} listed in {INDEX} is not in this file")
  src_dtypes = {s.dtype(k) for s in shards for k in s.keys()}
  if dtype is None:
    dtype = dtype_name(src_dtypes.pop()) if len(src_dtypes) == 1 else "float32"
  check_dtype(dtype)
  cfg = config_from_hf(hf_cfg, str(cfg_path), dtype=compute_dtype_for(dtype, compute_dtype), param_dtype=dtype)
  tok = find_tokenizer(tokenizer, hf_dir / "tokenizer.model")
  check_tokenizer_vocab(tok, cfg)

  # Plan every slot from the headers (keys, shapes, sizes) before any tensor is read; the tensors are read
  # one at a time later, while each stacked parameter is built and written.
  plan = ParamPlan(cfg, NP_DTYPES[dtype])
  want = meta_shapes(cfg)
  for s in shards:
    for key in s.keys():
      parsed = parse_key(key, str(s.path))
      if parsed is None:
        continue
      name, layer = parsed
      where = f"{s.path}: tensor {key!r}"
      if s.shape(key) != want[name]:
        raise ConversionError(f"{where}: expected shape {want[name]}, found {s.shape(key)}")
      n_heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(name)
      plan.add_meta(name, layer, s.shape(key), functools.partial(_read_meta, s, key, n_heads, cfg.head_dim), where)
  tied = hf_cfg.get("tie_word_embeddings") and ("embed", None) in plan.slots
  if ("lm_head", None) not in plan.slots and tied:  # read the embedding again when lm_head is built
    plan.add_meta("lm_head", None, want["lm_head"], plan.slots[("embed", None)][0],
                  f"{hf_dir}: lm_head tied to model.embed_tokens.weight")
  params = plan.finish(str(hf_dir), describe=hf_key)
  return save(out_dir, cfg, params, tok)


def _read_meta(s: SafetensorsFile, key: str, n_heads: int | None, head_dim: int) -> np.ndarray:
  """One tensor in Meta layout: read from its file, q/k rows un-permuted (n_heads given) from rotate_half order."""
  w = s.read(key)
  return w if n_heads is None else unpermute(w, n_heads, head_dim)


# ---- l2jax -> HF ----

def parse_size(s: str | int) -> int:
  """'5GB' / '500MB' / '2GiB' / bytes -> bytes."""
  if isinstance(s, int):
    return s
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", s, re.I)
  if not m:
    raise ValueError(f"size {s!r}: expected a number with an optional unit like 5GB, 500MB, 2GiB")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * mult)


def l2jax_to_hf(ckpt_dir: str | Path, hf_dir: str | Path, *, dtype: str | None = None,
                max_shard_size: str | int = "5GB") -> Path:
  """Write an l2jax model directory as an HF `LlamaForCausalLM` directory (safetensors, config.json, tokenizer)."""
  from l2jax import checkpoint
  check_out_dir(hf_dir)
  cfg, params = checkpoint.load_model_dir(ckpt_dir)
  dtype = check_dtype(dtype or dtype_name(params["embed"].dtype))
  np_dt = NP_DTYPES[dtype]
  shapes = meta_shapes(cfg)

  order: list[tuple[str, str, int | None]] = [(hf_key("embed", None), "embed", None)]
  for i in range(cfg.n_layers):
    order += [(hf_key(n, i), n, i) for n in ("wq", "wk", "wv", "wo", "w1", "w3", "w2", "attn_norm", "ffn_norm")]
  order += [(hf_key("norm", None), "norm", None), (hf_key("lm_head", None), "lm_head", None)]
  where = {k: (n, i) for k, n, i in order}

  def produce(key: str) -> np.ndarray:
    name, layer = where[key]
    w = params["layers"][name][layer] if name in BLOCK_NAMES else params[name]
    w = l2jax_to_meta(name, np.asarray(w), cfg)
    if name in ("wq", "wk"):
      w = permute(w, cfg.n_heads if name == "wq" else cfg.n_kv_heads, cfg.head_dim)
    return w

  limit = parse_size(max_shard_size)
  shards, cur, cur_bytes = [], [], 0
  for key, name, _ in order:
    nbytes = int(np.prod(shapes[name])) * np_dt.itemsize
    if cur and cur_bytes + nbytes > limit:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append(key)
    cur_bytes += nbytes
  shards.append(cur)

  with writing(hf_dir, "Hugging Face checkpoint"), checkpoint.atomic_dir(hf_dir) as tmp:
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
    weight_map = {}
    for fname, keys in zip(names, shards):
      write_safetensors(tmp / fname, [(k, np_dt, shapes[where[k][0]]) for k in keys], produce)
      weight_map.update({k: fname for k in keys})
    if len(shards) > 1:
      total = sum(int(np.prod(shapes[n])) * np_dt.itemsize for _, n, _ in order)
      (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    tok = Path(ckpt_dir) / checkpoint.TOKENIZER
    if tok.is_file():
      shutil.copyfile(tok, tmp / "tokenizer.model")
  return Path(hf_dir)
