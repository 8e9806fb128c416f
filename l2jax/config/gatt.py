"""Ghost Attention configs (Llama 2 section 3.3): Constraints, ConsistencyEval, GAtt."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AdamW, Checkpointing, Mesh, register
from l2jax.config.sft import Dialogs
from l2jax.model.config import LlamaConfig


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
  dialog. keep_truncated: keep dialogs with an answer cut off by max_new_tokens (default False: such a dialog is
  rejected and counted, as is one with an answer sampled empty, always). temperature, top_p, max_new_tokens,
  sample_dtype ("" = the checkpoint's): sampling. batch_dialogs:
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
  keep_truncated: bool = False
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


__all__ = ["GATT_KINDS", "Constraints", "ConsistencyEval", "GAtt"]
