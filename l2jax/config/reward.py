"""Reward-model configs (Llama 2 section 3.2.2): Preferences, RewardModel."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AdamW, Checkpointing, Mesh, register
from l2jax.model.config import LlamaConfig

PARTS = ("all", "trainer", "judge")   # l2jax.data.preferences.data_part


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
  part: which half of the training conversations to train on: "all", "trainer" or "judge" (a salted hash of the
  first user turn, l2jax.data.preferences.data_part; held-out sets are evaluated in full whatever the part). The
  reward models that train a policy take "trainer", the held-out judges that score the versions take "judge", so a
  judge never saw a pair its policy was trained towards (section 3.4: the paper checks its RMs with independent
  judges).
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
  part: str = "all"

  def __post_init__(self):
    if self.part not in PARTS:
      raise ValueError(f"data.part: expected one of {PARTS}, found {self.part!r}")
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
  BOS and their last tokens); buckets: a batch is padded to the power-of-two bucket of its longest row, at most
  seq_len (false: every batch to seq_len; the losses are the same). global_batch: pairs per step (512 in the
  paper, 1024 rows). micro_batch: pairs per accumulation step (0 = none). epochs: passes over the training mixture (1 in the paper); steps: 0 =
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
  buckets: bool = True
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



def reward_model_variant(arg: str, sized, sizes) -> RewardModel:
  """The config of experiment variant `arg` of a reward-model experiment: "<size>" trains on the trainer half of
  the preference data (these models train the policy), "<size>-judge" on the judge half (the held-out judges of
  the versions evaluation); `sized(size)` builds the size's config, `sizes` names the paper sizes for errors."""
  size, _, role = arg.partition("-")
  if role not in ("", "judge"):
    raise ValueError(f"unknown variant {arg!r}; choose <size> or <size>-judge (size: tiny, test, {', '.join(sizes)})")
  role = role or "trainer"
  cfg = sized(size)
  return dataclasses.replace(cfg, name=cfg.name + ("-judge" if role == "judge" else ""),
                             data=dataclasses.replace(cfg.data, part=role))


__all__ = ["Preferences", "RewardModel", "reward_model_variant"]
