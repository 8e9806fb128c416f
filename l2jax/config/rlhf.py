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


__all__ = ["VersionsEval", "RLHF"]
