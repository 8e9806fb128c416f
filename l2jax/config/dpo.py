"""Direct Preference Optimization config (Rafailov et al. 2023): DPO, a stage on the reward models' pair data."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import POSITIVE, AdamW, Checkpointing, Mesh, Rule, register
from l2jax.config.reward import Preferences
from l2jax.model.config import LlamaConfig

# the keys of l2jax.losses.MARGINS (Llama 2 Table 27), spelled out so that configs import without jax
MARGIN_TABLES = ("none", "small", "large")


@register
@dataclasses.dataclass(frozen=True)
class DPO:
  """DPO (Rafailov et al. 2023, equation 7) of a chat model on preference pairs, against itself frozen.

  init: the l2jax checkpoint directory (or experiment reference) to start from; it is also the frozen reference
  pi_ref. model: numerics only (dtype, remat, ...; the architecture comes from `init`). data: the preference pairs,
  read, filtered, split and mixed exactly as for the reward models (l2jax.config.Preferences; held-out sets are
  evaluated). beta: the KL strength of the implicit reward r = beta * log(pi / pi_ref) (0.1 in the paper).
  label_smoothing: conservative DPO, the share of preference labels taken to be flipped, in [0, 0.5).
  margin: "none", "small" or "large": Llama 2's Table 27 rating margin subtracted from r_c - r_r (in implicit-reward
  units; unrated pairs get none). seq_len: tokens per row (longer rows keep BOS and their last tokens).
  global_batch: pairs per step (64 in the paper; 2 rows each). micro_batch: pairs per accumulation step (0 =
  none). epochs: passes over the training pairs; steps: 0 = ceil(epochs * pairs / global_batch). eval_every:
  steps between held-out evaluations (0 = only at the end); eval_batch: pairs per evaluation batch (0 =
  global_batch), run in micro_batch chunks.
  """
  stage: ClassVar[str] = "dpo"
  LIMITS: ClassVar[dict] = {"beta": POSITIVE, "label_smoothing": Rule(lo=0, hi=0.5, hi_open=True)}
  name: str = "dpo"
  init: str = ""
  model: LlamaConfig = LlamaConfig()
  data: Preferences = Preferences()
  beta: float = 0.1
  label_smoothing: float = 0.0
  margin: str = "none"
  optim: AdamW = AdamW(lr=5e-7, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, clip=1.0, warmup_steps=150,
                       schedule="constant")
  seq_len: int = 4096
  global_batch: int = 64
  micro_batch: int = 0
  epochs: float = 1.0
  steps: int = 0
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing()
  log_every: int = 10
  eval_every: int = 0
  eval_batch: int = 0
  tensorboard: bool = True

  def __post_init__(self):
    if self.margin not in MARGIN_TABLES:
      raise ValueError(f"margin: expected one of {MARGIN_TABLES} (Llama 2 Table 27), found {self.margin!r}")
    if self.epochs <= 0 and self.steps <= 0:
      raise ValueError(f"epochs={self.epochs}, steps={self.steps}: set a positive number of epochs or steps")
    if self.micro_batch and self.global_batch % self.micro_batch:
      raise ValueError(f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}")
    if self.micro_batch and self.eval_batch % self.micro_batch:
      raise ValueError(f"eval_batch={self.eval_batch} is not a multiple of micro_batch={self.micro_batch}")


__all__ = ["DPO", "MARGIN_TABLES"]
