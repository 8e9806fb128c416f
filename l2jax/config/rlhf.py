"""Iterative RLHF configs (Llama 2 sections 3.2.3, 3.4): VersionsEval, RLHF."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import AT_LEAST_0, AT_LEAST_1, POSITIVE, Rule, register


@dataclasses.dataclass(frozen=True)
class VersionsEval:
  """The evaluation of every RLHF version against SFT (l2jax/eval/compare.py, whose Settings hold the same names).

  enabled: run it at the end. prompts / heldout_fraction / max_prompt_tokens: held-out prompts (keep the fraction no
  larger than the stages' own, so these prompts stay unseen). prompts_per_set: helpfulness and safety prompts each.
  max_new_tokens, temperature, top_p: answers. tie_tol: |score difference| that is a tie (logits). diversity_*:
  Figure 21 (prompts per shipped set, 0 = skip; samples per prompt; temperatures; answer length). tension_pairs:
  HH-RLHF test pairs per file for Figure 32 / Table 8 (0 = skip). batch_size: rows per call. judge: an optional
  third reward model (directory or experiment reference) judging every prompt. heldout_part: the half of the
  held-out prompts the versions are reported on ("report"; PPO selects on the "select" half, so the two are
  disjoint). seed: the evaluation sample and the answers' seeds. consistency: multi-turn consistency (Table 30) of
  every version from GAtt on, and of the version GAtt started from, with the GAtt experiment's evaluation settings
  (RUN_DIR/eval/consistency.*).
  """
  LIMITS: ClassVar[dict] = {"temperature": AT_LEAST_0, "top_p": Rule(lo=0, hi=1, lo_open=True), "tie_tol": AT_LEAST_0,
                            "diversity_temperatures": POSITIVE, "batch_size": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
                            "max_prompt_tokens": AT_LEAST_1, "diversity_samples": Rule(lo=2)}
  enabled: bool = True
  prompts: tuple[str, ...] = ("hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz",
                              "hh-safety:data/hh-rlhf/harmless-base-test.jsonl.gz")
  heldout_fraction: float = 0.05
  heldout_part: str = "report"
  seed: int = 0
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
  consistency: bool = True

  def __post_init__(self):
    if self.heldout_part not in ("", "select", "report"):
      raise ValueError(f"eval.heldout_part: expected 'report', 'select' or '' (all), found {self.heldout_part!r}")


FINAL_STAGES = ("ppo", "grpo", "rloo")   # experiments/<name>.py, the RL stage of the last version


@register
@dataclasses.dataclass(frozen=True)
class RLHF:
  """Iterative RLHF (Llama 2 sections 3.2.3, 3.3): SFT -> reward models -> rejection-sampling versions V1..VN ->
  GAtt after V`gatt_after` -> V N+1 = one more rejection-sampling iteration, then PPO on its checkpoint (section
  3.2.3: "applying PPO on top of the resulted Rejection Sampling checkpoint"), then the evaluation of every version
  against SFT by held-out judges and the report (docs/rlhf.md). Every stage is an experiment run through the
  launcher.

  sft, rm_helpful, rm_safety: checkpoint directories or experiment references (resolved by the launcher); the two
  reward models train the policy (rejection sampling, PPO). judge_helpful, judge_safety: the reward models that
  score the versions evaluation, trained on the other half of the preference data (Preferences.part "judge", so
  they never saw a pair the training RMs saw); "" = the training RMs judge (compare.md then says so).
  rejection_arg, gatt_arg, ppo_arg: the variant (ARG) of experiments/rejection.py, gatt.py, ppo.py each stage starts
  from; the composition overrides its sampler / init / policy, reward models, pool, iteration and name, then
  `*_sets` ("key=value" overrides, as --set) are applied. rs_versions: N rejection-sampling versions; version n
  samples from version n-1 (V0 = SFT; after GAtt, from the GAtt model) and fine-tunes it. pool_from: versions
  n >= pool_from pool the best answers of all earlier iterations (the paper pooled from V3 on; 1 = always).
  gatt_after: GAtt fine-tunes version n = gatt_after (0 = no GAtt). ppo: make V N+1 with the RL stage
  `final_stage`: "ppo" (the paper's), "grpo" or "rloo" (experiments/grpo.py, rloo.py: PPO's rollout and loop with
  group advantages and no value model); ppo_arg, ppo_sets and ppo_iterations (0 = the experiment's) apply to it.
  ppo_after_rs: V N+1 first runs one more rejection-sampling iteration (V N+1-RS, from V N) and the RL stage starts
  from its checkpoint, as the paper's last version (false: straight on V N). dpo: also make V N+1-DPO,
  experiments/dpo.py:<dpo_arg> (with dpo_sets) from the same checkpoint, beside the RL version (its init is its
  frozen reference; its pairs are the helpfulness reward model's trainer half), evaluated with every version;
  RUN_DIR/final stays the RL version's (the DPO version's when ppo is false).
  rescale_temperature: every rejection-sampling iteration after the first samples at the best temperature of the
  previous iteration's Figure 8 (the rejection config's temperature_from; the paper's "temperature rescaling").
  Sub-runs live in RUN_DIR/v<n>-<stage>; one whose final/ exists is never redone. eval: the versions evaluation
  (RUN_DIR/eval).
  """
  LIMITS: ClassVar[dict] = {"rs_versions": AT_LEAST_1, "pool_from": AT_LEAST_1}
  stage: ClassVar[str] = "rlhf"
  name: str = "rlhf"
  sft: str = ""
  rm_helpful: str = ""
  rm_safety: str = ""
  judge_helpful: str = ""
  judge_safety: str = ""
  rejection_arg: str = "tiny"
  gatt_arg: str = "tiny"
  ppo_arg: str = "tiny"
  rs_versions: int = 4
  pool_from: int = 2
  gatt_after: int = 3
  ppo: bool = True
  ppo_after_rs: bool = True
  ppo_iterations: int = 0
  final_stage: str = "ppo"
  dpo: bool = False
  dpo_arg: str = "tiny"
  dpo_sets: tuple[str, ...] = ()
  rescale_temperature: bool = True
  rejection_sets: tuple[str, ...] = ()
  gatt_sets: tuple[str, ...] = ()
  ppo_sets: tuple[str, ...] = ()
  eval: VersionsEval = VersionsEval()

  def __post_init__(self):
    if self.gatt_after > self.rs_versions:
      raise ValueError(f"gatt_after={self.gatt_after}: expected 0 (no GAtt) or a version 1..{self.rs_versions}")
    if self.final_stage not in FINAL_STAGES:
      raise ValueError(f"final_stage: expected one of {', '.join(FINAL_STAGES)}, found {self.final_stage!r}")
    for s in self.rejection_sets + self.gatt_sets + self.ppo_sets + self.dpo_sets:
      if "=" not in s:
        raise ValueError(f"stage override {s!r}: expected KEY=VALUE (as --set)")


__all__ = ["VersionsEval", "RLHF"]
