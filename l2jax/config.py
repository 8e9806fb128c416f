"""Configs: frozen dataclasses for every stage, and `--set a.b=VALUE` overrides typed from their fields.

An experiment file's `get_config(arg)` returns one of the stage configs below; the launcher applies the
overrides and runs `l2jax.stages.<config.stage>.run(config, run_dir)`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, ClassVar

from l2jax.model.config import LlamaConfig


class ConfigError(ValueError):
  """A config value or override is wrong; the message names the key and the valid ones."""


# --- validation of numbers: one mechanism for every config -------------------------------------------------

class ConfigRangeError(ConfigError):
  """A number in a config is outside its field's Rule."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """The range of a numeric field: lo <= v (lo < v if lo_open), v <= hi (v < hi if hi_open), or v in `also`.

  Every float must be finite; `Rule(finite=False)` allows inf/nan (never needed so far).
  """
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  also: tuple = ()
  finite: bool = True

  def ok(self, v) -> bool:
    if v in self.also:
      return True
    if isinstance(v, float) and not math.isfinite(v):
      return not self.finite
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return False
    return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

  def describe(self, value=0.0) -> str:
    parts = []
    if self.lo is not None and self.hi is not None:
      parts.append(f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}")
    elif self.lo is not None:
      parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
    elif self.hi is not None:
      parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
    parts += [f"or {a!r}" for a in self.also]
    kind = "an int" if isinstance(value, int) else "a finite float" if self.finite else "a float"
    return " ".join([kind] + parts)


ANY = Rule()                       # any finite number
AT_LEAST_0, AT_LEAST_1, POSITIVE = Rule(lo=0), Rule(lo=1), Rule(lo=0, lo_open=True)
FRACTION = Rule(lo=0, hi=1)
# Rules by field name, for every config class (and classes added later); a class's LIMITS win over these.
NAME_RULES: dict[str, Rule] = {
    "steps": AT_LEAST_0, "seq_len": AT_LEAST_1, "global_batch": AT_LEAST_1, "micro_batch": AT_LEAST_0,
    "log_every": AT_LEAST_1, "seed": AT_LEAST_0, "epochs": AT_LEAST_0,
    "lr": AT_LEAST_0, "b1": Rule(lo=0, hi=1, hi_open=True), "b2": Rule(lo=0, hi=1, hi_open=True),
    "eps": AT_LEAST_0, "weight_decay": AT_LEAST_0, "clip": AT_LEAST_0, "decay_to": FRACTION,
    "warmup_steps": AT_LEAST_0, "norm_eps": POSITIVE, "rope_theta": POSITIVE,
}
# The default for a field without a rule: ints >= 0 (counts, sizes, intervals; 0 = off), floats finite.
DEFAULT_INT, DEFAULT_FLOAT = AT_LEAST_0, ANY


def field_rule(cls: type, name: str, value) -> Rule:
  """The rule for field `name` of config class `cls`: cls.LIMITS, then NAME_RULES, then by suffix
  (*_fraction: [0, 1]), then the default for the value's type."""
  limits = getattr(cls, "LIMITS", {})
  if name in limits:
    return limits[name]
  if name in NAME_RULES:
    return NAME_RULES[name]
  if name.endswith("fraction"):
    return FRACTION
  return DEFAULT_FLOAT if isinstance(value, float) else DEFAULT_INT


def validate(cfg, prefix: str = "") -> None:
  """Check every number of the config tree `cfg` (ints, floats, and those inside tuples) against its Rule.

  Raises ConfigError naming the dotted key, the value and the range. Runs when a stage config is built (every
  class passed to `register` validates its whole tree in __init__, so `dataclasses.replace`, `from_dict` and
  `--set` are covered too). A new config class opts in by being a dataclass field of a registered stage config
  (or being registered itself); a field whose range differs from the defaults (ints >= 0, floats finite,
  NAME_RULES, *_fraction in [0, 1]) declares it in the class: `LIMITS: ClassVar[dict[str, Rule]] = {"field":
  Rule(lo=1)}` (`Rule(also=(-1,))` allows a sentinel, `ANY` any finite number).
  """
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    key = prefix + f.name
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      validate(v, key + ".")
      continue
    items = v if isinstance(v, tuple) else (v,)
    for x in items:
      if isinstance(x, bool) or not isinstance(x, (int, float)):
        continue
      rule = field_rule(type(cfg), f.name, x)
      if not rule.ok(x):
        raise ConfigRangeError(f"{key}: expected {rule.describe(x)}, found {x!r}")


def _validating(cls: type) -> type:
  """Make `cls(...)` run `validate` on the whole tree after the dataclass __init__ (and its __post_init__)."""
  if getattr(cls, "_l2jax_validating", False):
    return cls
  init = cls.__init__

  @functools.wraps(init)
  def __init__(self, *args, **kw):
    init(self, *args, **kw)
    validate(self)

  cls.__init__ = __init__
  cls._l2jax_validating = True
  return cls


@dataclasses.dataclass(frozen=True)
class Mesh:
  """Device mesh ("data", "fsdp", "tensor"); -1 takes the remaining devices (at most one axis)."""
  LIMITS: ClassVar[dict] = {k: Rule(lo=1, also=(-1,)) for k in ("data", "fsdp", "tensor")}
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
  LIMITS: ClassVar[dict] = {"every": AT_LEAST_1, "keep": AT_LEAST_1}
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
  LIMITS: ClassVar[dict] = {"steps": AT_LEAST_1}
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


STAGES: dict[str, type] = {"pretrain": _validating(Pretrain)}


def register(cls: type) -> type:
  """Add a stage config class (its ClassVar `stage` names the module in l2jax.stages); building one validates
  every number in its tree (`validate`)."""
  STAGES[cls.stage] = _validating(cls)
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
  except ConfigRangeError as e:
    raise ConfigError(f"--set {full}={raw}: {e}") from None
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
    try:
      cfg = override(cfg, key.strip(), raw)
    except ConfigRangeError as e:
      raise ConfigError(f"--set {s}: {e}") from None
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

@dataclasses.dataclass(frozen=True)
class RewardModels:
  """The two reward models of Llama 2 (section 3.2.2) and the combination rule of section 3.2.3.

  helpful / safety: reward-model directories (written by the reward stage) or experiment references
  ("experiments/rm_helpful.py:7b"). safety_threshold: Rc uses the safety score when sigmoid(Rs) < threshold
  (0.15 in the paper) or the prompt is a safety prompt.
  """
  helpful: str = ""
  safety: str = ""
  safety_threshold: float = 0.15

  def __post_init__(self):
    if not 0.0 < self.safety_threshold < 1.0:
      raise ValueError(f"reward_models.safety_threshold: expected a probability in (0, 1), found "
                       f"{self.safety_threshold}")


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Prompts for RL (l2jax/data/prompts.py): "FORMAT:PATH" sources with their IS_SAFETY flag.

  FORMAT: hh-safety (HH-RLHF transcripts, safety prompts), hh-helpful, oasst (helpfulness), jsonl
  ({"messages": [...], "safety": bool}). max_prompt_tokens: longer prompts are dropped and counted.
  heldout_fraction: share held out (deterministic by prompt) for evaluation; eval_prompts: how many of them
  each evaluation answers (0 = all). system: a system prompt for every prompt ("" = none).
  """
  sources: tuple[str, ...] = ()
  max_prompt_tokens: int = 256
  heldout_fraction: float = 0.05
  eval_prompts: int = 256
  system: str = ""
  skip_bad: bool = False

  def __post_init__(self):
    if self.max_prompt_tokens < 1:
      raise ValueError(f"prompts.max_prompt_tokens: expected >= 1, found {self.max_prompt_tokens}")
    if not 0.0 <= self.heldout_fraction < 1.0:
      raise ValueError(f"prompts.heldout_fraction: expected a value in [0, 1), found {self.heldout_fraction}")
    if self.eval_prompts < 0:
      raise ValueError(f"prompts.eval_prompts: expected >= 0, found {self.eval_prompts}")


@register
@dataclasses.dataclass(frozen=True)
class PPO:
  """PPO on the combined safety / helpfulness reward (Llama 2 section 3.2.3; docs/ppo.md).

  policy: the l2jax checkpoint PPO starts from (pi_0, also the frozen reference) or an experiment reference.
  value_init: "helpful" (the value model starts as the helpfulness reward model, Stiennon et al. 2020) or
  "policy" (the policy's backbone with a fresh head). model: numerics (dtype, param_dtype, remat) of the
  trained policy and value model; the architecture comes from the checkpoints. frozen_dtype: dtype in which
  the reference and both reward models are held (frozen, never trained).
  Each iteration samples `batch_prompts` prompts, one response each (at most `max_new_tokens` tokens at
  `temperature` / `top_p`: 1.0 / 1.0 samples from the policy itself, so the KL and the PPO ratio are those of
  the sampled distribution), scores them and takes `ppo_epochs * batch_prompts / minibatch` AdamW steps for
  the policy (optim) and for the value model (value_optim); micro_batch splits a mini-batch for gradient
  accumulation (0 = none); generate_chunks: responses are decoded in this many sequential chunks of rows (the
  KV cache shrinks by that factor; the tokens are the same).
  kl_beta: beta of R = R~c - beta * KL (0.01 for 7B/13B, 0.005 for 34B/70B). clip: PPO ratio clip.
  value_clip: clip of the value loss around the old values. gamma, lam: GAE. missing_eos_penalty: subtracted
  from the whitened score of a response that ends without EOS (0 = off).
  iterations: PPO iterations (the loop's steps). eval_every: held-out evaluation every N iterations (and at
  the end; 0 = none). patience: stop after this many evaluations without a better held-out mean Rc (0 = never
  stop early); final/ is the best evaluated policy when evaluations ran, else the last.
  samples_logged: responses written to samples.jsonl per iteration.
  device_memory_gib / plan_devices: `--check-sharding` checks the per-device memory plan against this much
  accelerator memory on `plan_devices` devices (0 = the devices present).
  """
  stage: ClassVar[str] = "ppo"
  name: str = "ppo"
  policy: str = ""
  reward_models: RewardModels = RewardModels()
  value_init: str = "helpful"
  model: LlamaConfig = LlamaConfig()
  frozen_dtype: str = "bfloat16"
  prompts: Prompts = Prompts()
  max_new_tokens: int = 512
  temperature: float = 1.0
  top_p: float = 1.0
  kl_beta: float = 0.01
  clip: float = 0.2
  value_clip: float = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  missing_eos_penalty: float = 0.0
  optim: AdamW = AdamW(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=1.0)
  value_optim: AdamW = AdamW(lr=9e-6, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=1.0)
  batch_prompts: int = 512
  minibatch: int = 64
  micro_batch: int = 0
  generate_chunks: int = 1
  ppo_epochs: int = 1
  iterations: int = 200
  eval_every: int = 10
  patience: int = 0
  samples_logged: int = 4
  device_memory_gib: float = 80.0
  plan_devices: int = 0
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing(every=10, keep=2)
  log_every: int = 1
  tensorboard: bool = True

  def __post_init__(self):
    if self.value_init not in ("helpful", "policy"):
      raise ValueError(f"value_init: expected 'helpful' or 'policy', found {self.value_init!r}")
    if self.frozen_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"frozen_dtype: expected float32, bfloat16 or float16, found {self.frozen_dtype!r}")
    for k in ("batch_prompts", "minibatch", "ppo_epochs", "iterations", "max_new_tokens"):
      if getattr(self, k) < 1:
        raise ValueError(f"{k}: expected >= 1, found {getattr(self, k)}")
    if self.batch_prompts % self.minibatch:
      raise ValueError(f"batch_prompts={self.batch_prompts} is not a multiple of minibatch={self.minibatch}")
    if self.generate_chunks < 1 or self.batch_prompts % self.generate_chunks:
      raise ValueError(f"generate_chunks={self.generate_chunks} must divide batch_prompts={self.batch_prompts}")
    if self.micro_batch < 0 or (self.micro_batch and self.minibatch % self.micro_batch):
      raise ValueError(f"micro_batch={self.micro_batch} must be 0 or divide minibatch={self.minibatch}")
    if not (self.temperature > 0 and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"temperature={self.temperature}, top_p={self.top_p}: expected temperature > 0 and "
                       f"0 < top_p <= 1")
    for k in ("kl_beta", "clip", "value_clip", "missing_eos_penalty", "eval_every", "patience", "samples_logged",
              "device_memory_gib", "plan_devices"):
      v = getattr(self, k)
      if not v >= 0:  # also rejects NaN
        raise ValueError(f"{k}: expected >= 0, found {v}")
    if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"gamma={self.gamma}, lam={self.lam}: expected 0 < gamma <= 1 and 0 <= lam <= 1")


# --- Rejection sampling and safety context distillation (issue 11) ------------------------------------------

@register
@dataclasses.dataclass(frozen=True)
class Rejection:
  """Rejection-sampling fine-tuning (Llama 2 section 3.2.3) or safety context distillation (4.2.4); docs/rejection.md.

  mode: "best_of_k" (K samples per prompt, the best by R_c, pooled over iterations) or "context_distillation"
  (safety prompts only: one answer with a Table 39 safety preprompt and one without; the preprompted answer is
  kept where the safety RM scores it higher). Phase 1 samples and scores (run_dir/samples.jsonl, pool.jsonl);
  phase 2 fine-tunes `init` on the pool with the SFT loop and loss (answer tokens only) into run_dir/final.
  sampler: the checkpoint that samples (dir or experiment reference); "" = no sampling, fine-tune `init` on
  `pool` only (how 7B / 13B distil the 70B's pool). init: where fine-tuning starts ("" = the sampler).
  reward_models: the two RMs and R_c's threshold. prompts: RL prompt sources (prompts.eval_prompts held-out
  prompts are answered before and after fine-tuning). max_prompts: use the first N training prompts (0 = all).
  iteration: recorded in every record. pool: a previous iteration's run_dir/pool.jsonl ("" = none); with
  rescore_pool its answers are scored again by these reward models before the best per prompt is kept.
  samples_per_prompt (K), temperature, top_p, top_k, max_new_tokens: sampling. sample_dtype: "" = the checkpoint's.
  batch_prompts: prompts per sampling chunk (each chunk is K x batch_prompts rows; the unit of resumption).
  score_batch: rows per reward-model call. temperatures: Figure 8's temperatures (() = no Figure 8), on the
  first fig8_prompts training prompts. eval_temperature: sampling temperature of the held-out answers.
  preprompts: JSONL of safety preprompts ({"preprompt", "risk_category"}; those without a category are used).
  preprompt_as: "system" (the <<SYS>> block of the first [INST]) or "prefix" (prepended to the user message).
  Fine-tuning (as config.SFT): model (numerics), optim, seq_len, global_batch, micro_batch, epochs, steps,
  seed (also the sampling seed), mesh, ckpt, log_every, tensorboard.
  """
  stage: ClassVar[str] = "rejection"
  name: str = "rejection"
  mode: str = "best_of_k"
  sampler: str = ""
  init: str = ""
  reward_models: RewardModels = RewardModels()
  prompts: Prompts = Prompts()
  max_prompts: int = 0
  iteration: int = 1
  pool: str = ""
  rescore_pool: bool = True
  samples_per_prompt: int = 10
  temperature: float = 1.2
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 512
  sample_dtype: str = ""
  batch_prompts: int = 16
  score_batch: int = 64
  temperatures: tuple[float, ...] = ()
  fig8_prompts: int = 64
  eval_temperature: float = 1.0
  preprompts: str = "data/safety-preprompts/table39.jsonl"
  preprompt_as: str = "system"
  model: LlamaConfig = LlamaConfig()
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
  tensorboard: bool = True

  def __post_init__(self):
    if self.mode not in ("best_of_k", "context_distillation"):
      raise ValueError(f"mode: expected 'best_of_k' or 'context_distillation', found {self.mode!r}")
    if self.preprompt_as not in ("system", "prefix"):
      raise ValueError(f"preprompt_as: expected 'system' or 'prefix', found {self.preprompt_as!r}")
    if self.sample_dtype not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"sample_dtype: expected '', float32, bfloat16 or float16, found {self.sample_dtype!r}")
    for k in ("samples_per_prompt", "iteration", "max_new_tokens", "batch_prompts", "score_batch", "epochs",
              "global_batch"):
      if not getattr(self, k) >= 1:
        raise ValueError(f"{k}: expected >= 1, found {getattr(self, k)}")
    for k in ("max_prompts", "fig8_prompts", "steps", "micro_batch", "top_k"):
      if not getattr(self, k) >= 0:
        raise ValueError(f"{k}: expected >= 0, found {getattr(self, k)}")
    if not (self.temperature > 0 and self.eval_temperature >= 0 and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"temperature={self.temperature}, eval_temperature={self.eval_temperature}, "
                       f"top_p={self.top_p}: expected temperature > 0, eval_temperature >= 0, 0 < top_p <= 1")
    if any(not t > 0 for t in self.temperatures):
      raise ValueError(f"temperatures: expected values > 0, found {self.temperatures}")



# --- Ghost Attention (issue 12) -----------------------------------------------------------------------------

GATT_KINDS = ("hobby", "language", "figure", "start_word", "capitals", "end_sign")


@dataclasses.dataclass(frozen=True)
class Constraints:
  """GAtt instructions (Llama 2 section 3.3; l2jax/data/gatt.py): random combinations of synthetic constraints.

  kinds: the constraint kinds drawn from (hobby, language, figure: the paper's; start_word, capitals, end_sign:
  rule-checkable ones a small model can learn). max_per_instruction: 1..N constraints of distinct kinds per
  instruction. short_prob: share of shortened instructions ("Figure: Napoleon."; 0.5 in the paper). lists_dir:
  the value lists. placement: where the training example keeps the instruction, "system" (system prompt, inside
  the first [INST]) or "user" (prepended to the first user message).
  """
  kinds: tuple[str, ...] = ("hobby", "language", "figure")
  max_per_instruction: int = 3
  short_prob: float = 0.5
  lists_dir: str = "data/gatt"
  placement: str = "system"

  def __post_init__(self):
    bad = [k for k in self.kinds if k not in GATT_KINDS]
    if not self.kinds or bad:
      raise ValueError(f"constraints.kinds: expected a non-empty subset of {GATT_KINDS}, found {self.kinds}")
    if not 1 <= self.max_per_instruction <= len(self.kinds):
      raise ValueError(f"constraints.max_per_instruction: expected 1..{len(self.kinds)} (the number of kinds), "
                       f"found {self.max_per_instruction}")
    if not 0.0 <= self.short_prob <= 1.0:
      raise ValueError(f"constraints.short_prob: expected a value in [0, 1], found {self.short_prob}")
    if self.placement not in ("system", "user"):
      raise ValueError(f"constraints.placement: expected 'system' or 'user', found {self.placement!r}")


@dataclasses.dataclass(frozen=True)
class ConsistencyEval:
  """Multi-turn consistency (Table 30) and attention to the instruction (Figure 10) on held-out dialogs.

  dialogs: held-out dialogs of `turns` user turns (0 = no evaluation); each gets an instruction with an automatic
  checker in its first turn only. max_new_tokens, temperature (0 = greedy): answers. seed: instructions and
  sampling. baseline: the model compared with the GAtt model ("" = `init`). attention_bins: bins of Figure 10.
  """
  dialogs: int = 50
  turns: int = 20
  max_new_tokens: int = 128
  temperature: float = 0.0
  seed: int = 1
  baseline: str = ""
  attention_bins: int = 20

  def __post_init__(self):
    if self.dialogs < 0 or self.turns < 1 or self.max_new_tokens < 1 or self.attention_bins < 1:
      raise ValueError(f"eval: expected dialogs >= 0, turns >= 1, max_new_tokens >= 1, attention_bins >= 1; found "
                       f"{self.dialogs}, {self.turns}, {self.max_new_tokens}, {self.attention_bins}")
    if self.temperature < 0:
      raise ValueError(f"eval.temperature: expected >= 0, found {self.temperature}")


@register
@dataclasses.dataclass(frozen=True)
class GAtt:
  """Ghost Attention (Llama 2 section 3.3): sample multi-turn dialogs with the instruction on every user turn,
  keep those whose answers all pass the checker, fine-tune with the instruction in the first turn only and the
  loss on the last answer only (the SFT loss and loop), then evaluate consistency over 20 turns. docs/gatt.md.

  sampler: the checkpoint that samples the answers (dir or experiment reference; "" = `init`). init: where
  fine-tuning starts. data: the dialogs whose user turns are used (kind, paths, max_dialogs, eval_every_nth:
  every n-th dialog is held out for the evaluation). constraints: the instructions. turns: user turns per
  sampled dialog (a dialog's own, then follow-ups drawn from the other dialogs' user turns). max_user_words: cut
  user messages to N words (0 = as is). instructions_per_dialog: dialogs sampled per source dialog, each with its
  own instruction. repair: enforce the rule kinds (start_word, capitals, end_sign) on the sampled answers
  (docs/gatt.md). all_prefixes: one example per turn k of a kept dialog (trained on answer k) instead of one per
  dialog. temperature, top_p, max_new_tokens, sample_dtype ("" = the checkpoint's): sampling. batch_dialogs:
  dialogs per sampling chunk (the unit of resumption). eval: the evaluation.
  Fine-tuning (as config.SFT): model (numerics), optim, seq_len, global_batch, micro_batch, epochs, steps, seed
  (also instructions and sampling), mesh, ckpt, log_every, tensorboard.
  """
  stage: ClassVar[str] = "gatt"
  name: str = "gatt"
  sampler: str = ""
  init: str = ""
  data: Dialogs = Dialogs(kind="oasst", paths=("data/oasst/en_100_tree.jsonl",), eval_every_nth=10)
  constraints: Constraints = Constraints()
  turns: int = 4
  max_user_words: int = 0
  instructions_per_dialog: int = 1
  repair: bool = False
  all_prefixes: bool = False
  temperature: float = 0.7
  top_p: float = 0.9
  max_new_tokens: int = 256
  sample_dtype: str = ""
  batch_dialogs: int = 16
  eval: ConsistencyEval = ConsistencyEval()
  model: LlamaConfig = LlamaConfig()
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
  tensorboard: bool = True

  def __post_init__(self):
    for k in ("turns", "instructions_per_dialog", "max_new_tokens", "batch_dialogs", "epochs", "global_batch"):
      if not getattr(self, k) >= 1:
        raise ValueError(f"{k}: expected >= 1, found {getattr(self, k)}")
    for k in ("max_user_words", "steps", "micro_batch"):
      if not getattr(self, k) >= 0:
        raise ValueError(f"{k}: expected >= 0, found {getattr(self, k)}")
    if not (self.temperature >= 0 and 0.0 < self.top_p <= 1.0):
      raise ValueError(f"temperature={self.temperature}, top_p={self.top_p}: expected temperature >= 0, "
                       f"0 < top_p <= 1")
    if self.sample_dtype not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"sample_dtype: expected '', float32, bfloat16 or float16, found {self.sample_dtype!r}")



# --- Iterative RLHF (issue 13) ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VersionsEval:
  """The evaluation of every RLHF version against SFT (l2jax/eval/compare.py, whose Settings hold the same names).

  enabled: run it at the end. prompts / heldout_fraction / max_prompt_tokens: held-out prompts (keep the fraction no
  larger than the stages' own, so these prompts stay unseen). prompts_per_set: helpfulness and safety prompts each.
  max_new_tokens, temperature, top_p: answers. tie_tol: |score difference| that is a tie (logits). diversity_*:
  Figure 21 (prompts per shipped set, 0 = skip; samples per prompt; temperatures; answer length). tension_pairs:
  HH-RLHF test pairs per file for Figure 32 / Table 8 (0 = skip). batch_size: rows per call. judge: an optional
  third reward model (directory or experiment reference) judging every prompt.
  """
  LIMITS: ClassVar[dict] = {"temperature": AT_LEAST_0, "top_p": Rule(lo=0, hi=1, lo_open=True), "tie_tol": AT_LEAST_0,
                            "diversity_temperatures": POSITIVE, "batch_size": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                            "max_prompt_tokens": AT_LEAST_1, "diversity_samples": Rule(lo=2)}
  enabled: bool = True
  prompts: tuple[str, ...] = ("hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz",
                              "hh-safety:data/hh-rlhf/harmless-base-test.jsonl.gz")
  heldout_fraction: float = 0.05
  max_prompt_tokens: int = 128
  prompts_per_set: int = 64
  max_new_tokens: int = 64
  temperature: float = 0.6
  top_p: float = 0.9
  tie_tol: float = 0.05
  diversity_prompts: int = 10
  diversity_samples: int = 25
  diversity_temperatures: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 16))
  diversity_max_new_tokens: int = 48
  tension_pairs: int = 100
  batch_size: int = 64
  judge: str = ""


@register
@dataclasses.dataclass(frozen=True)
class RLHF:
  """Iterative RLHF (Llama 2 sections 3.2.3, 3.3): SFT -> reward models -> rejection-sampling versions V1..VN ->
  GAtt after V`gatt_after` -> PPO on the last rejection-sampling checkpoint (V N+1), then the evaluation of every
  version against SFT and the report (docs/rlhf.md). Every stage is an experiment run through the launcher.

  sft, rm_helpful, rm_safety: checkpoint directories or experiment references (resolved by the launcher).
  rejection_arg, gatt_arg, ppo_arg: the variant (ARG) of experiments/rejection.py, gatt.py, ppo.py each stage starts
  from; the composition overrides its sampler / init / policy, reward models, pool, iteration and name, then
  `*_sets` ("key=value" overrides, as --set) are applied. rs_versions: N rejection-sampling versions; version n
  samples from version n-1 (V0 = SFT; after GAtt, from the GAtt model) and fine-tunes it. pool_from: versions
  n >= pool_from pool the best answers of all earlier iterations (the paper pooled from V3 on; 1 = always).
  gatt_after: GAtt fine-tunes version n = gatt_after (0 = no GAtt). ppo: run PPO on the last rejection-sampling
  version; ppo_iterations: its iterations (0 = the experiment's). Sub-runs live in RUN_DIR/v<n>-<stage>; one whose
  final/ exists is never redone. eval: the versions evaluation (RUN_DIR/eval).
  """
  LIMITS: ClassVar[dict] = {"rs_versions": AT_LEAST_1, "pool_from": AT_LEAST_1}
  stage: ClassVar[str] = "rlhf"
  name: str = "rlhf"
  sft: str = ""
  rm_helpful: str = ""
  rm_safety: str = ""
  rejection_arg: str = "tiny"
  gatt_arg: str = "tiny"
  ppo_arg: str = "tiny"
  rs_versions: int = 4
  pool_from: int = 2
  gatt_after: int = 3
  ppo: bool = True
  ppo_iterations: int = 0
  rejection_sets: tuple[str, ...] = ()
  gatt_sets: tuple[str, ...] = ()
  ppo_sets: tuple[str, ...] = ()
  eval: VersionsEval = VersionsEval()

  def __post_init__(self):
    if self.gatt_after > self.rs_versions:
      raise ValueError(f"gatt_after={self.gatt_after}: expected 0 (no GAtt) or a version 1..{self.rs_versions}")
    for s in self.rejection_sets + self.gatt_sets + self.ppo_sets:
      if "=" not in s:
        raise ValueError(f"stage override {s!r}: expected KEY=VALUE (as --set)")
