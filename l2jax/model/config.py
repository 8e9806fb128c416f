"""The model config: Llama 2 architecture hyper-parameters (Touvron et al., 2023, section 2.2 and Table 1)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of one Llama model.

  Fields:
    vocab_size: number of token ids (32000 for Llama 2).
    dim: model width d.
    n_layers: transformer blocks.
    n_heads: query heads.
    n_kv_heads: key/value heads (grouped-query attention, section 2.2; == n_heads is plain MHA).
    ffn_dim: SwiGLU hidden width.
    max_seq_len: context length (4096 for Llama 2).
    norm_eps: RMSNorm epsilon.
    rope_theta: rotary base (10000).
    dtype: compute dtype (activations, matmuls).
    param_dtype: storage dtype of parameters.
    remat: rematerialisation of each block in the backward pass: none | full | dots.
    scan_layers: run blocks with lax.scan (compile time independent of depth).
    attention_impl: None (splash attention on TPU, cuDNN flash attention on GPU in bf16/fp16 where it applies,
      else XLA), "xla", "cudnn" or "splash" (Pallas splash attention; interpret mode off TPU, for tests).
  """
  vocab_size: int = 32000
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 32
  ffn_dim: int = 11008
  max_seq_len: int = 4096
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: str = "full"
  scan_layers: bool = True
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LlamaConfig.{name}: expected a positive int, found {v!r}")
    if self.dim % self.n_heads:
      raise ValueError(f"LlamaConfig: dim={self.dim} is not a multiple of n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LlamaConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for rotary embeddings")
    if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
      raise ValueError(f"LlamaConfig: dtype/param_dtype must be one of {DTYPES}, found {self.dtype!r}/{self.param_dtype!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat: expected one of {REMAT_POLICIES}, found {self.remat!r}")
    if self.attention_impl not in (None, "xla", "cudnn", "splash"):
      raise ValueError(f"LlamaConfig.attention_impl: expected None, 'xla', 'cudnn' or 'splash', found "
                       f"{self.attention_impl!r}")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count: embeddings + blocks + final norm + untied head."""
    d, f, hd = self.dim, self.ffn_dim, self.head_dim
    attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
    block = attn + 3 * d * f + 2 * d
    return 2 * self.vocab_size * d + self.n_layers * block + d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * layers * seq * dim (DESIGN.md section 10)."""
    return 6.0 * self.num_params() + 12.0 * self.n_layers * seq_len * self.dim

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict, *, where: str = "config") -> "LlamaConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"{where}: unknown model config keys {unknown}; valid keys: {sorted(names)}")
    return cls(**d)

  def save(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str | Path) -> "LlamaConfig":
    return cls.from_dict(read_json(path, "model config.json"), where=str(path))


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict:
  """A JSON object file's content; FileNotFoundError naming `what`, or `error` with file:line for invalid JSON,
  bytes that are not UTF-8, or a top-level value that is not an object."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    d = json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise error(f"{path}: {what} is not valid UTF-8 JSON (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
        from None
  except json.JSONDecodeError as e:
    raise error(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
  except RecursionError:
    raise error(f"{path}: invalid {what}: JSON nested too deeply") from None
  if not isinstance(d, dict):
    raise error(f"{path}: {what}: expected a JSON object, found {type(d).__name__}")
  return d
