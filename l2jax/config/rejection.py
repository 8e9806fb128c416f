"""Rejection sampling and safety context distillation configs (Llama 2 sections 3.2.3, 4.2.4)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AdamW, Checkpointing, Mesh, register
from l2jax.config.ppo import Prompts, RewardModels
from l2jax.model.config import LlamaConfig


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
  temperature_from: "" (sample at `temperature`) or an earlier rejection run (its directory, its final/ or an
  experiment reference, or its rejection.json): sample at the best temperature of that run's Figure 8
  (rejection.json["best_temperature"]: the grid temperature with the highest mean best-of-K R_c among usable
  samples), the paper's temperature rescaling between iterations (section 3.2.3, Figure 8).
  keep_truncated: let answers cut off by max_new_tokens into the pool (default False: they are scored without
  EOS, counted, and never chosen; the SFT format would close them with an EOS). Empty answers never enter.
  batch_prompts: prompts per sampling chunk (each chunk is K x batch_prompts rows; the unit of resumption).
  score_batch: rows per reward-model call. temperatures: Figure 8's temperatures (() = no Figure 8), on the
  first fig8_prompts training prompts. eval_temperature: sampling temperature of the held-out answers.
  preprompts: JSONL of safety preprompts ({"preprompt", "risk_category"}): a prompt tagged with a risk category
  that has preprompts (a `jsonl:` prompt record's "risk_category") gets one of those answer templates, every other
  safety prompt a generic one (no category).
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
  temperature_from: str = ""
  keep_truncated: bool = False
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


__all__ = ["Rejection"]
