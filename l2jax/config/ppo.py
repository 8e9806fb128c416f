"""PPO configs (Llama 2 section 3.2.3): RewardModels, Prompts, PPO (also GRPO and RLOO: `PPO.estimator`)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AdamW, Checkpointing, Mesh, register
from l2jax.model.config import LlamaConfig


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
  heldout_fraction: share held out (deterministic by conversation) for evaluation, in two disjoint halves
  (l2jax.data.prompts.heldout_part): "select" picks checkpoints, "report" reports results. eval_prompts: how
  many held-out prompts each evaluation answers (0 = all); PPO draws them from the "select" half as a seeded
  sample stratified by source and IS_SAFETY. system: a system prompt for every prompt ("" = none).
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
  `temperature`; the log-probabilities of the PPO ratio, the KL and the entropy are those of the distribution
  sampled, softmax(logits / temperature), for the policy and the reference alike, as TRL and OpenRLHF do.
  top_p must stay 1: a truncated nucleus would make them off-policy, so it is refused), scores them and
  takes `ppo_epochs * batch_prompts / minibatch` AdamW steps for the policy (optim) and for the value model
  (value_optim); micro_batch splits a mini-batch for gradient
  accumulation (0 = none); generate_chunks: responses are decoded in this many sequential chunks of rows (the
  KV cache shrinks by that factor; the tokens are the same).
  kl_beta: beta of R = R~c - beta * KL (0.01 for 7B/13B, 0.005 for 34B/70B). clip: PPO ratio clip.
  value_clip: clip of the value loss around the old values. gamma, lam: GAE. missing_eos_penalty: subtracted
  from the whitened score of a response that ends without EOS (0 = off).
  iterations: PPO iterations (the loop's steps). eval_every: held-out evaluation every N iterations (and at
  the end; 0 = none). patience: stop after this many evaluations without a better held-out mean Rc (0 = never
  stop early); final/ is the best evaluated policy when evaluations ran, else the last; value/ the last value
  model (also after an early stop). The evaluations answer `prompts.eval_prompts` of the held-out "select"
  half (a seeded sample stratified by source and IS_SAFETY; the versions evaluation reports on the other half).
  samples_logged: responses written to samples.jsonl per iteration. snapshots: also save the policy at every
  evaluation (the starting one included) as an l2jax model directory run_dir/snapshots/<iteration>/, for
  measurements along the run (experiments/overoptimization.py measures gold reward against KL on them).
  prompt_buckets: pad each iteration's prompts to the power-of-two bucket (from 16, at most
  prompts.max_prompt_tokens) of its longest prompt, not to max_prompt_tokens (fewer padded positions to decode
  and score; one compilation per bucket met; the results equal the padded ones up to float rounding, since the
  rows are [prompt | response | padding] and causal attention never reads trailing padding).
  device_memory_gib / plan_devices: `--check-sharding` checks the per-device memory plan against this much
  accelerator memory on `plan_devices` devices (0 = the devices present).
  Group estimators (docs/ppo.md; l2jax/rl/advantages.py), the same rollout, masks, reference and loop:
  estimator: "gae" (PPO as above), "grpo" (DeepSeekMath section 4.1.2) or "rloo" (Ahmadian et al. 2024). For
  grpo / rloo each prompt is sampled `group_size` (k >= 2) times in the one generate call, rows of a prompt
  contiguous (row = prompt * k + sample; an iteration has batch_prompts * k rows); no value model is loaded,
  trained or saved (value_init, value_optim, value_clip, gamma, lam and whiten_advantages are PPO's alone); the
  sequence reward is the raw LOGIT(Rc) (not whitened over the batch: the estimator centres, and GRPO scales,
  within each group, which batch whitening would not change for GRPO and would couple groups for RLOO), minus
  missing_eos_penalty, minus kl_beta * sum_t k1_t when kl_in = "reward"; its group advantage is put on every
  response token and the update is the clipped surrogate (clip) of `advantages.policy_loss`.
  minibatch and micro_batch count prompts like batch_prompts: a mini-batch holds minibatch * k rows (drawn
  from a permutation of the iteration's rows), so an iteration takes ppo_epochs * batch_prompts / minibatch
  steps whatever k is. kl_in: "reward" (k1 per token in the reward, Llama 2 / Stiennon et al.; RLOO's sequence
  reward R - beta * sum k1 as in Ahmadian et al. and TRL's RLOOTrainer) or "loss" (DeepSeekMath's k3 term,
  + kl_beta * k3 per token in the loss); "" = the estimator's paper default ("loss" for grpo, "reward" else;
  gae takes "reward" only). loss_normalization: "sequence" (mean over responses of their token means, the
  original GRPO) or "token" (every response token weighs the same, DAPO; PPO's); "" = "sequence" for grpo,
  "token" else (gae takes "token" only). `kl_placement` and `normalization` give the resolved values.
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
  snapshots: bool = False
  device_memory_gib: float = 80.0
  plan_devices: int = 0
  seed: int = 0
  mesh: Mesh = Mesh()
  ckpt: Checkpointing = Checkpointing(every=10, keep=2)
  log_every: int = 1
  tensorboard: bool = True
  prompt_buckets: bool = True
  estimator: str = "gae"
  group_size: int = 1
  kl_in: str = ""
  loss_normalization: str = ""

  ESTIMATORS: ClassVar[tuple[str, ...]] = ("gae", "grpo", "rloo")

  @property
  def grouped(self) -> bool:
    """True for the group estimators (grpo, rloo): k samples per prompt, no value model."""
    return self.estimator != "gae"

  @property
  def kl_placement(self) -> str:
    """kl_in resolved: "reward" or "loss" ("" = "loss" for grpo, DeepSeekMath; "reward" for gae and rloo)."""
    return self.kl_in or ("loss" if self.estimator == "grpo" else "reward")

  @property
  def normalization(self) -> str:
    """loss_normalization resolved: "sequence" or "token" ("" = "sequence" for grpo, "token" else)."""
    return self.loss_normalization or ("sequence" if self.estimator == "grpo" else "token")

  @property
  def rows(self) -> int:
    """Rows of one iteration's rollout: batch_prompts * group_size."""
    return self.batch_prompts * self.group_size

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
    if not (self.temperature > 0 and self.temperature != float("inf")):
      raise ValueError(f"temperature: expected a finite number > 0, found {self.temperature}")
    if self.top_p != 1.0:
      raise ValueError(f"top_p={self.top_p}: PPO samples from the whole distribution (top_p=1); a nucleus would "
                       f"make the ratio and KL off-policy (docs/ppo.md); use temperature instead")
    for k in ("kl_beta", "clip", "value_clip", "missing_eos_penalty", "eval_every", "patience", "samples_logged",
              "device_memory_gib", "plan_devices"):
      v = getattr(self, k)
      if not v >= 0:  # also rejects NaN
        raise ValueError(f"{k}: expected >= 0, found {v}")
    if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"gamma={self.gamma}, lam={self.lam}: expected 0 < gamma <= 1 and 0 <= lam <= 1")
    if self.estimator not in self.ESTIMATORS:
      raise ValueError(f"estimator: expected one of {', '.join(self.ESTIMATORS)}, found {self.estimator!r}")
    if self.kl_in not in ("", "reward", "loss"):
      raise ValueError(f"kl_in: expected 'reward', 'loss' or '' (the estimator's default), found {self.kl_in!r}")
    if self.loss_normalization not in ("", "token", "sequence"):
      raise ValueError(f"loss_normalization: expected 'token', 'sequence' or '' (the estimator's default), found "
                       f"{self.loss_normalization!r}")
    if not self.grouped:
      if self.group_size != 1:
        raise ValueError(f"group_size={self.group_size}: estimator='gae' samples one response per prompt (1); "
                         f"set estimator='grpo' or 'rloo' for groups")
      if self.kl_placement != "reward":
        raise ValueError(f"kl_in={self.kl_in!r}: estimator='gae' (PPO) takes the KL in the reward only ('reward'); "
                         f"'loss' is for estimator 'grpo' or 'rloo'")
      if self.normalization != "token":
        raise ValueError(f"loss_normalization={self.loss_normalization!r}: estimator='gae' (PPO) takes the token-mean "
                         f"loss only ('token'); 'sequence' is for estimator 'grpo' or 'rloo'")
    elif self.group_size < 2:
      raise ValueError(f"group_size={self.group_size}: estimator={self.estimator!r} needs >= 2 samples per prompt "
                       f"(the baseline comes from the other samples of the same prompt)")


__all__ = ["RewardModels", "Prompts", "PPO"]
