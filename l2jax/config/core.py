"""The config machinery: number rules, `--set a.b=VALUE` overrides typed from the dataclass fields, the stage
registry, and the configs shared by every stage (Mesh, AdamW, Data, Checkpointing) and pretraining's.

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
  """Device mesh ("dcn", "data", "fsdp", "tensor"); -1 takes the remaining devices (at most one of data, fsdp,
  tensor). dcn: data parallelism across TPU slices (multi-slice; 1 on one slice, one host or a GPU cluster)."""
  LIMITS: ClassVar[dict] = {**{k: Rule(lo=1, also=(-1,)) for k in ("data", "fsdp", "tensor")}, "dcn": Rule(lo=1)}
  dcn: int = 1
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


__all__ = ["ConfigError", "ConfigRangeError", "Rule", "ANY", "AT_LEAST_0", "AT_LEAST_1", "POSITIVE", "FRACTION", "NAME_RULES", "DEFAULT_INT", "DEFAULT_FLOAT", "field_rule", "validate", "_validating", "Mesh", "AdamW", "Data", "Checkpointing", "Pretrain", "STAGES", "register", "to_dict", "to_json", "_field_types", "_valid_keys", "_parse_value", "override", "apply_overrides", "from_dict"]
