"""Checkpoint converters into and out of the l2jax model directory (DESIGN.md sections 2 and 8).

One module per foreign format, each an explicit key map with shape checks:
  hf.py       Hugging Face `LlamaForCausalLM` safetensors (q/k rows permuted for rotate_half) <-> l2jax
  meta.py     Meta `consolidated.NN.pth` + `params.json` (model-parallel shards merged) -> l2jax
  llama2c.py  llama2.c legacy (version 0) `.bin` + SentencePiece model -> l2jax

This module holds what they share: the torch-Linear ("Meta") layout of every parameter and its map to
the l2jax layout, a plan that builds each [L, ...] parameter one tensor at a time when it is written (so
converting holds about one stacked parameter, not the model), dtype names, and the error type.
"""
from __future__ import annotations

import contextlib
import errno as errno_lib
import functools
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from l2jax.model.config import LlamaConfig

BLOCK_NAMES = ("attn_norm", "ffn_norm", "wq", "wk", "wv", "wo", "w1", "w3", "w2")
TOP_NAMES = ("embed", "norm", "lm_head")

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, key and expected/found value."""


def dtype_name(dt) -> str:
  """'float32' | 'bfloat16' | 'float16' for a numpy dtype; ConversionError for anything else."""
  for name, d in NP_DTYPES.items():
    if np.dtype(dt) == d:
      return name
  raise ConversionError(f"unsupported dtype {dt}; expected one of {sorted(NP_DTYPES)}")


def compute_dtype_for(param_dtype: str, compute_dtype: str | None) -> str:
  """The compute dtype recorded in a converted checkpoint's config.json: `compute_dtype` when asked, else the
  stored parameter dtype (as transformers' dtype="auto"), so a float32 checkpoint reproduces its float32
  reference (HF, run.c) with no flag. float16 weights compute in float16, as transformers' "auto" and Meta's
  generation.py do; pass compute_dtype="bfloat16" where float16 is slow (TPU) or its range is too small."""
  return check_dtype(param_dtype if compute_dtype is None else compute_dtype, "compute dtype")


def positive_int(d: dict, key: str, where: str, default=None) -> int:
  """d[key] (or `default` when absent) checked to be a positive int; ConversionError naming file and key."""
  v = d.get(key, default)
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ConversionError(f"{where}: {key!r} must be a positive integer, found {v!r}")
  return v


def positive_number(d: dict, key: str, where: str, default: float | None = None,
                    optional: bool = False) -> float | None:
  """float(d[key]) (or `default` when absent) checked to be a finite number > 0; None allowed if `optional`."""
  v = d.get(key, default)
  if v is None and optional:
    return None
  if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
    raise ConversionError(f"{where}: {key!r} must be a positive number, found {v!r}")
  return float(v)


def check_dtype(name: str, what: str = "dtype") -> str:
  """`name` if it is a supported parameter dtype name, else ConversionError."""
  if name not in NP_DTYPES:
    raise ConversionError(f"{what}: unsupported dtype {name!r}; expected one of {sorted(NP_DTYPES)}")
  return name


def ffn_dim_meta(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """SwiGLU width as Meta computes it: int(2 * 4d / 3), times the multiplier, rounded up to `multiple_of`."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---- The torch-Linear ("Meta") layout: weights are (out_features, in_features). ----

def meta_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Per-layer (for block names) or whole shape of each parameter in Meta / torch-Linear layout."""
  D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
  H, K = cfg.n_heads, cfg.n_kv_heads
  return {"embed": (V, D), "norm": (D,), "lm_head": (V, D),
          "attn_norm": (D,), "ffn_norm": (D,), "wq": (H * Dh, D), "wk": (K * Dh, D), "wv": (K * Dh, D),
          "wo": (D, H * Dh), "w1": (F, D), "w3": (F, D), "w2": (D, F)}


def l2jax_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Shape of each parameter in the l2jax tree (block names without the leading [L] axis)."""
  D, F, V, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
  H, K = cfg.n_heads, cfg.n_kv_heads
  return {"embed": (V, D), "norm": (D,), "lm_head": (D, V),
          "attn_norm": (D,), "ffn_norm": (D,), "wq": (D, H, Dh), "wk": (D, K, Dh), "wv": (D, K, Dh),
          "wo": (H, Dh, D), "w1": (D, F), "w3": (D, F), "w2": (F, D)}


def meta_to_l2jax(name: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """One parameter from Meta layout (torch Linear (out, in)) to l2jax layout; returns a view where possible.

  wq/wk/wv: (n*Dh, D) -> [D, n, Dh]; wo: (D, H*Dh) -> [H, Dh, D]; w1/w3: (F, D) -> [D, F];
  w2: (D, F) -> [F, D]; lm_head: (V, D) -> [D, V]; embeddings and norms unchanged.
  """
  D, Dh = cfg.dim, cfg.head_dim
  if name in ("wq", "wk", "wv"):
    return w.reshape(-1, Dh, D).transpose(2, 0, 1)
  if name == "wo":
    return w.T.reshape(-1, Dh, D)
  if name in ("w1", "w3", "w2", "lm_head"):
    return w.T
  return w


def l2jax_to_meta(name: str, w: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """Inverse of `meta_to_l2jax`: one parameter (one layer's slice for blocks) to torch Linear layout."""
  D = cfg.dim
  if name in ("wq", "wk", "wv"):
    return w.transpose(1, 2, 0).reshape(-1, D)
  if name == "wo":
    return w.reshape(-1, D).T
  if name in ("w1", "w3", "w2", "lm_head"):
    return w.T
  return w


# ---- The l2jax tree, planned from shapes and built one parameter at a time. ----

class ParamPlan:
  """Where each l2jax parameter slot (name, layer) comes from, checked from shapes alone (no tensor data).

  A converter registers a loader per slot (`add_meta`) while it validates the source's headers;
  `finish` then returns the parameter dict (as `llama.split` returns it) with lazy leaves: each is a
  zero-argument callable that builds one whole parameter, e.g. the stacked [L, D, F] `w1`, by loading its
  slots one tensor at a time. `l2jax.checkpoint.save_params` calls them one after another and writes each
  before building the next, so converting holds about one stacked parameter, not the model.
  """

  def __init__(self, cfg: LlamaConfig, dtype, release: Callable[[], None] | None = None):
    self.cfg = cfg
    self.dtype = np.dtype(dtype)
    self.shapes = l2jax_shapes(cfg)
    self.release = release  # called after each parameter is built (e.g. to close memory-mapped sources)
    self.slots: dict[tuple[str, int | None], tuple[Callable[[], np.ndarray], str]] = {}  # -> (loader, where)

  def _check_slot(self, name: str, layer: int | None, where: str) -> None:
    if (name in BLOCK_NAMES) != (layer is not None):
      raise ConversionError(f"{where}: parameter {name!r} given layer {layer!r}")
    if layer is not None and not 0 <= layer < self.cfg.n_layers:
      raise ConversionError(f"{where}: layer {layer} out of range; the config has n_layers={self.cfg.n_layers}")
    if (name, layer) in self.slots:
      first = self.slots[(name, layer)][1]
      raise ConversionError(f"{where}: duplicate tensor; {name}[{layer}] already set from {first}")

  def add_meta(self, name: str, layer: int | None, shape: tuple[int, ...], load: Callable[[], np.ndarray],
               where: str) -> None:
    """Register slot (name, layer): `load()` returns a tensor of `shape` in Meta / torch-Linear layout."""
    want = meta_shapes(self.cfg)[name]
    if tuple(shape) != want:
      raise ConversionError(f"{where}: expected shape {want}, found {tuple(shape)}")
    self._check_slot(name, layer, where)
    self.slots[(name, layer)] = (load, where)

  def missing(self) -> list[tuple[str, int | None]]:
    slots = [(n, None) for n in TOP_NAMES] + [(n, i) for i in range(self.cfg.n_layers) for n in BLOCK_NAMES]
    return [s for s in slots if s not in self.slots]

  def build(self, name: str) -> np.ndarray:
    """Parameter `name` in l2jax layout and the plan's dtype ([L, ...] for blocks), loaded slot by slot."""
    top = name not in BLOCK_NAMES
    out = np.empty(self.shapes[name] if top else (self.cfg.n_layers, *self.shapes[name]), self.dtype)
    try:
      for layer in [None] if top else range(self.cfg.n_layers):
        load, where = self.slots[(name, layer)]
        w = load()
        if tuple(w.shape) != meta_shapes(self.cfg)[name]:
          raise ConversionError(f"{where}: expected shape {meta_shapes(self.cfg)[name]}, read {tuple(w.shape)}")
        np.copyto(out if top else out[layer], meta_to_l2jax(name, w, self.cfg), casting="unsafe")
        del w
    finally:
      if self.release is not None:
        self.release()
    return out

  def finish(self, where: str, describe: Callable[[str, int | None], str] | None = None) -> dict:
    """The parameter dict with lazy leaves (see the class doc); ConversionError naming missing keys."""
    missing = self.missing()
    if missing:
      names = [describe(n, i) if describe else f"{n}[{i}]" for n, i in missing]
      more = f" (and {len(names) - 10} more)" if len(names) > 10 else ""
      raise ConversionError(f"{where}: missing tensors {names[:10]}{more}")
    lazy = {n: functools.partial(self.build, n) for n in (*TOP_NAMES, *BLOCK_NAMES)}
    return {**{n: lazy[n] for n in TOP_NAMES}, "layers": {n: lazy[n] for n in BLOCK_NAMES}}


# ---- Output directory and tokenizer. ----

def check_out_dir(out_dir: str | Path) -> Path:
  """Fail before any work if `out_dir` exists and is not empty (outputs are written atomically)."""
  out = Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out}: output directory exists and is not empty; remove it or choose another")
  return out


def find_tokenizer(explicit: str | Path | None, *candidates: Path) -> Path | None:
  """`explicit` (must exist) or the first existing candidate; None (with a warning) if there is none."""
  if explicit is not None:
    p = Path(explicit)
    if not p.is_file():
      raise FileNotFoundError(f"{p}: tokenizer model not found (--tokenizer)")
    return p
  for p in candidates:
    if p.is_file():
      return p
  print(f"warning: no tokenizer.model found (looked at {', '.join(map(str, candidates))}); the checkpoint "
        "will have none. Pass --tokenizer PATH to include one.", file=sys.stderr)
  return None


def check_tokenizer_vocab(tokenizer: Path | None, cfg: LlamaConfig) -> None:
  """Error if the SentencePiece model has more pieces than the model has embedding rows."""
  if tokenizer is None:
    return
  import sentencepiece as spm
  try:
    n = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
  except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
    raise ConversionError(f"{tokenizer}: not a SentencePiece model ({e})") from None
  if n > cfg.vocab_size:
    raise ConversionError(f"{tokenizer}: tokenizer has {n} pieces, more than the model's vocab_size "
                          f"{cfg.vocab_size}")


class OutputError(OSError):
  """The output could not be written (disk full, read-only, permissions); the message names the output path."""


_OS_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def writing(out_dir: str | Path, what: str = "output"):
  """Around the writing of `out_dir`: an OSError (or what Orbax / tensorstore raise for one: a ValueError
  carrying `os_error_code`) becomes one OutputError naming `out_dir`, and parent directories this block
  created are removed again, so a failed conversion leaves nothing behind (atomic_dir removes its own
  temporary directory)."""
  import logging
  out = Path(out_dir).absolute()
  first_new = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.CRITICAL)  # Orbax logs each failed background write with a traceback; we report once
  try:
    yield
  except Exception as e:
    if first_new is not None and first_new.is_dir() and all(p.is_dir() for p in first_new.rglob("*")):
      shutil.rmtree(first_new, ignore_errors=True)  # only directories this block created, and empty ones
    m = _OS_CODE.search(str(e)) if isinstance(e, ValueError) and not isinstance(e, ConversionError) else None
    if isinstance(e, FileExistsError) or not (isinstance(e, OSError) or m):
      raise
    code = e.errno if isinstance(e, OSError) else int(m.group(1))
    if code:
      reason = f"{os.strerror(code)} (errno {errno_lib.errorcode.get(code, code)})"
    else:
      reason = str(e)
    err = OutputError(f"{out_dir}: cannot write the {what}: {reason}")
    err.errno = code
    raise err from None
  finally:
    absl_log.setLevel(level)


def save(out_dir: str | Path, cfg: LlamaConfig, params: dict, tokenizer: Path | None) -> Path:
  """Write the l2jax model directory atomically (no partial directory on failure).

  `params` may hold arrays or lazy leaves (`ParamPlan.finish`). Lazy leaves are built, written and dropped
  one parameter at a time (`checkpoint.save_params` streams them), so the whole conversion holds about one
  stacked parameter plus Orbax's write buffers for it. Arrays go to Orbax as CPU jax.Arrays (device_put
  aliases them, no copy): Orbax writes those two to three times faster than numpy arrays.
  """
  import jax

  from l2jax import checkpoint
  cpu = jax.devices("cpu")[0]

  def on_cpu(v):
    if callable(v):
      return lambda: jax.device_put(v(), cpu)
    return jax.device_put(v, cpu)
  params = jax.tree.map(on_cpu, params)
  with writing(out_dir, "l2jax checkpoint"):
    return checkpoint.save_model_dir(out_dir, cfg, params, tokenizer)
