"""Supervised fine-tuning configs (Llama 2 section 3.1): Dialogs, SFT."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AdamW, Checkpointing, Mesh, register
from l2jax.model.config import LlamaConfig


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


__all__ = ["Dialogs", "SFT"]
