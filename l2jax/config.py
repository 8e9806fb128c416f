"""Configs: frozen dataclasses for every stage, and `--set a.b=VALUE` overrides typed from their fields.

An experiment file's `get_config(arg)` returns one of the stage configs below; the launcher applies the
overrides and runs `l2jax.stages.<config.stage>.run(config, run_dir)`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar

from l2jax.model.config import LlamaConfig


class ConfigError(ValueError):
  """A config value or override is wrong; the message names the key and the valid ones."""


@dataclasses.dataclass(frozen=True)
class Mesh:
  """Device mesh ("data", "fsdp", "tensor"); -1 takes the remaining devices (at most one axis)."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class AdamW:
  """AdamW with global-norm clipping and linear warmup + cosine decay (Llama 2 section 2.2).

  lr: peak learning rate. b1, b2, eps, weight_decay: AdamW. clip: global gradient-norm clip (0 = off).
  warmup_steps: linear warmup from 0. decay_to: final lr as a fraction of peak (0.1 in the paper).
  schedule: "cosine" or "constant" (after warmup).
  """
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  clip: float = 1.0
  warmup_steps: int = 2000
  decay_to: float = 0.1
  schedule: str = "cosine"


@dataclasses.dataclass(frozen=True)
class Data:
  """A document source and its tokenizer.

  kind: "text" (plain files; documents split by `split`), "jsonl" (field `field` of each line) or
  "tfds" (a local TFDS dataset `name`/`split` in `data_dir`, read with tfds.data_source, no TensorFlow).
  paths: files for text/jsonl. split: for text: "paragraph" | "line" | "file"; for tfds: the split name.
  tokenizer: SentencePiece model. eval_every_nth: hold out every n-th document for evaluation (0 = none).
  skip_bad: count and report bad records instead of stopping.
  """
  kind: str = "text"
  paths: tuple[str, ...] = ()
  field: str = "text"
  name: str = ""
  split: str = "paragraph"
  data_dir: str = ""
  tokenizer: str = "data/llama2-tokenizer/tokenizer.model"
  eval_every_nth: int = 0
  skip_bad: bool = False
  worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  """every: save every N steps (and at the end). keep: newest K kept. async_save: write in the background."""
  every: int = 1000
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Pretrain:
  """Pretraining (Llama 2 section 2): next-token loss on packed documents.

  model: the architecture. init: an l2jax checkpoint directory to start from ("" = random init).
  data: the corpus. optim: AdamW + schedule. seq_len: tokens per row. global_batch: rows per step over all
  devices. micro_batch: rows per accumulation step per step (0 = no accumulation). steps: optimizer steps.
  seed: parameter init, data order. log_every / eval_every: in steps. eval_batches: batches per evaluation.
  """
  stage: ClassVar[str] = "pretrain"
  name: str = "pretrain"
  model: LlamaConfig = LlamaConfig()
  init: str = ""
  data: Data = Data()
  optim: AdamW = AdamW()
  seq_len: int = 4096
  global_batch: int = 1024
  micro_batch: int = 0
  steps: int = 1000
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing()
  log_every: int = 10
  eval_every: int = 500
  eval_batches: int = 8
  tensorboard: bool = True


STAGES: dict[str, type] = {"pretrain": Pretrain}


def register(cls: type) -> type:
  """Add a stage config class (its ClassVar `stage` names the module in l2jax.stages)."""
  STAGES[cls.stage] = cls
  return cls


def to_dict(cfg: Any) -> dict:
  d = dataclasses.asdict(cfg)
  if hasattr(type(cfg), "stage"):
    d = {"stage": type(cfg).stage, **d}
  return d


def to_json(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
  keys = []
  for name, tp in _field_types(cls).items():
    if typing.get_origin(tp) is ClassVar:
      continue
    if dataclasses.is_dataclass(tp):
      keys += _valid_keys(tp, f"{prefix}{name}.")
    else:
      keys.append(prefix + name)
  return keys


def _parse_value(raw: str, tp: Any, key: str) -> Any:
  """`raw` (the text after '=') as type `tp`."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if raw.lower() in ("none", "null") and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _parse_value(raw, a, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"--set {key}={raw}: cannot parse as {tp}")
  if origin is tuple:
    items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s != ""]
    elem = args[0] if args else str
    return tuple(_parse_value(str(x), elem, key) for x in items)
  if tp is bool:
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--set {key}={raw}: expected a bool (true/false)")
  if tp is int:
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"--set {key}={raw}: expected an int") from None
  if tp is float:
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"--set {key}={raw}: expected a float") from None
  if tp is str:
    return raw
  raise ConfigError(f"--set {key}: fields of type {tp} cannot be set from the command line")


def override(cfg: Any, key: str, raw: str, _prefix: str = "") -> Any:
  """A copy of `cfg` with the dotted `key` set from the string `raw`, typed by the dataclass field."""
  full = _prefix + key
  head, _, rest = key.partition(".")
  types_ = _field_types(type(cfg))
  if head not in types_ or typing.get_origin(types_[head]) is ClassVar:
    raise ConfigError(f"unknown config key {full!r}; valid keys:\n  "
                      + "\n  ".join(_valid_keys(type(cfg), _prefix)))
  tp = types_[head]
  if rest:
    if not dataclasses.is_dataclass(tp):
      raise ConfigError(f"config key {full!r}: {_prefix + head!r} has no sub-keys")
    return dataclasses.replace(cfg, **{head: override(getattr(cfg, head), rest, raw, f"{_prefix}{head}.")})
  if dataclasses.is_dataclass(tp):
    raise ConfigError(f"config key {full!r} is a group; set one of: {_valid_keys(tp, full + '.')}")
  try:
    return dataclasses.replace(cfg, **{head: _parse_value(raw, tp, full)})
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:  # a dataclass __post_init__ rejected the value
    raise ConfigError(f"--set {full}={raw}: {e}") from None


def apply_overrides(cfg: Any, sets: list[str]) -> Any:
  """Apply `a.b=VALUE` strings in order."""
  for s in sets:
    if "=" not in s:
      raise ConfigError(f"--set {s!r}: expected KEY=VALUE")
    key, raw = s.split("=", 1)
    cfg = override(cfg, key.strip(), raw)
  return cfg


def from_dict(cls: type, d: dict) -> Any:
  """Rebuild a config from `to_dict` output (used to compare a resumed run with its saved config)."""
  kw = {}
  for name, tp in _field_types(cls).items():
    if typing.get_origin(tp) is ClassVar or name not in d:
      continue
    v = d[name]
    if dataclasses.is_dataclass(tp):
      v = from_dict(tp, v)
    elif typing.get_origin(tp) is tuple or (isinstance(v, list)):
      v = tuple(v)
    kw[name] = v
  return cls(**kw)


# --- SFT (issue 5) configs: Dialogs, SFT --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dialogs:
  """Dialogs for supervised fine-tuning (l2jax/data/dialogs.py; docs/sft.md).

  kind: "messages" (JSONL {"messages": [{"role", "content"}, ...]}), "oasst" (OpenAssistant message trees, one
  dialog per tree along the best-ranked replies), "gsm8k" (JSONL {"question", "answer"}) or "tfds" (a local
  TFDS dataset `name`/`split` in `data_dir`, read with tfds.data_source, no TensorFlow). paths: JSONL files or
  globs. field: the messages key (JSONL) or feature (TFDS). system: a system prompt given to dialogs that
  have none ("" = none). max_dialogs: use only the first N records (0 = all). eval_every_nth: hold out every
  n-th record for evaluation and sampling (0 = none). skip_bad: count and report bad records instead of stopping.
  """
  kind: str = "messages"
  paths: tuple[str, ...] = ()
  field: str = "messages"
  name: str = ""
  split: str = "train"
  data_dir: str = ""
  system: str = ""
  tokenizer: str = "data/llama2-tokenizer/tokenizer.model"
  max_dialogs: int = 0
  eval_every_nth: int = 0
  skip_bad: bool = False

  def __post_init__(self):
    kinds = ("messages", "oasst", "gsm8k", "tfds")
    if self.kind not in kinds:
      raise ValueError(f"data.kind: expected one of {kinds}, found {self.kind!r}")


@register
@dataclasses.dataclass(frozen=True)
class SFT:
  """Supervised fine-tuning (Llama 2 section 3.1): next-token loss on answer tokens only, dialogs packed whole.

  The paper: cosine schedule from lr 2e-5, weight decay 0.1, batch 64 sequences of 4096 tokens, 2 epochs.
  model: the architecture (from `init` when given; numerics from here). init: an l2jax checkpoint directory
  ("" = random init). epochs: passes over the training dialogs. steps: 0 = every batch of `epochs` epochs
  (derived from the packed dataset size); N > 0 = exactly N steps (going on into further epochs if needed).
  eval_every / eval_batches: held-out answer-only loss. sample_prompts: held-out prompts answered greedily at
  the end into run_dir/samples.jsonl (0 = none), with at most sample_max_new_tokens new tokens.
  """
  stage: ClassVar[str] = "sft"
  name: str = "sft"
  model: LlamaConfig = LlamaConfig()
  init: str = ""
  data: Dialogs = Dialogs()
  optim: AdamW = AdamW(lr=2e-5, warmup_steps=0, decay_to=0.0, weight_decay=0.1)
  seq_len: int = 4096
  global_batch: int = 64
  micro_batch: int = 0
  epochs: int = 2
  steps: int = 0
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing()
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  sample_prompts: int = 4
  sample_max_new_tokens: int = 128
  tensorboard: bool = True

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1, found {self.epochs}")
    if self.steps < 0:
      raise ValueError(f"steps must be >= 0 (0 = derived from epochs), found {self.steps}")



# --- Reward model (issue 6) configs: Preferences, RewardModel -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preferences:
  """Preference pairs for a reward model and their mixture (Llama 2 section 3.2.2, "Data Composition").

  Sources are "FORMAT:PATH" strings (FORMAT: hh | oasst | jsonl, see l2jax.data.preferences; PATH may be a glob).
  sources: used in full. mix: pooled and sampled uniformly to make `mix_fraction` of the training mixture
  (helpfulness RM: 0.5, "equal parts" of safety and open-source data; safety RM: 0.1, the "90/10" mix).
  heldout_fraction: share of conversations of every source and mix file held out for evaluation
  (deterministic, by a hash of the first user turn). eval_sources: more sets evaluated in full, never trained on.
  eval_pairs: evaluate at most this many pairs of each held-out set (0 = all).
  safety_filter: drop pairs whose chosen response is labelled unsafe while the rejected one is labelled safe.
  tokenizer: SentencePiece model (an `init` checkpoint's own tokenizer.model wins).
  skip_bad: skip and report bad records instead of stopping at the first.
  """
  sources: tuple[str, ...] = ()
  mix: tuple[str, ...] = ()
  mix_fraction: float = 0.0
  heldout_fraction: float = 0.05
  eval_sources: tuple[str, ...] = ()
  eval_pairs: int = 0
  safety_filter: bool = True
  tokenizer: str = "data/llama2-tokenizer/tokenizer.model"
  skip_bad: bool = False

  def __post_init__(self):
    if not 0.0 <= self.mix_fraction < 1.0:
      raise ValueError(f"data.mix_fraction: expected a value in [0, 1), found {self.mix_fraction}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"data.heldout_fraction: expected a value in [0, 1), found {self.heldout_fraction}")
    for s in self.sources + self.mix + self.eval_sources:
      fmt, sep, path = s.partition(":")
      if not sep or fmt not in ("hh", "oasst", "jsonl") or not path:
        raise ValueError(f"preference source {s!r}: expected FORMAT:PATH with FORMAT one of hh, oasst, jsonl")


@register
@dataclasses.dataclass(frozen=True)
class RewardModel:
  """A reward model (Llama 2 section 3.2.2): Llama backbone + scalar head, binary ranking loss with margin.

  objective: "helpfulness" or "safety" (recorded in head.json). model: the architecture (taken from `init` when
  set). init: an l2jax chat / SFT checkpoint directory for the backbone ("" = random); the head starts fresh.
  margin: "none", "small" or "large" (Table 27). seq_len: tokens per row (a pair is two rows; longer rows keep
  BOS and their last tokens). global_batch: pairs per step (512 in the paper, 1024 rows). micro_batch: pairs
  per accumulation step (0 = none). epochs: passes over the training mixture (1 in the paper); steps: 0 =
  ceil(epochs * pairs / global_batch). warmup_fraction, min_warmup: warmup = max(min_warmup,
  ceil(warmup_fraction * steps)) (3% with a minimum of 5 in the paper); warmup_fraction 0 keeps
  optim.warmup_steps. eval_every: steps between held-out evaluations (always at the end); eval_batch: pairs
  per evaluation batch (0 = global_batch).
  """
  stage: ClassVar[str] = "reward"
  name: str = "rm"
  objective: str = "helpfulness"
  model: LlamaConfig = LlamaConfig()
  init: str = ""
  data: Preferences = Preferences()
  margin: str = "small"
  optim: AdamW = AdamW(lr=1e-5, warmup_steps=5, decay_to=0.1)
  seq_len: int = 4096
  global_batch: int = 512
  micro_batch: int = 0
  epochs: float = 1.0
  steps: int = 0
  warmup_fraction: float = 0.03
  min_warmup: int = 5
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing()
  log_every: int = 10
  eval_every: int = 0
  eval_batch: int = 0
  tensorboard: bool = True

  def __post_init__(self):
    if self.objective not in ("helpfulness", "safety"):
      raise ValueError(f"objective: expected 'helpfulness' or 'safety', found {self.objective!r}")
    if self.margin not in ("none", "small", "large"):
      raise ValueError(f"margin: expected 'none', 'small' or 'large' (Table 27), found {self.margin!r}")
    if self.epochs <= 0 and self.steps <= 0:
      raise ValueError(f"epochs={self.epochs}, steps={self.steps}: set a positive number of epochs or steps")


# --- PPO (issue 10) -----------------------------------------------------------------------------------------


# --- Rejection sampling and safety context distillation (issue 11) ------------------------------------------


# --- Ghost Attention (issue 12) -----------------------------------------------------------------------------


# --- Iterative RLHF (issue 13) ------------------------------------------------------------------------------
