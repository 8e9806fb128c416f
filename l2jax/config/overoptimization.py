"""The reward over-optimisation benchmark's config (Gao, Schulman & Hilton 2022 on a known gold reward; Llama 2
sections 3.2.2-3.2.3 and 3.4.1 on reward hacking): Overoptimization."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from l2jax.config.core import register

METHODS = ("best-of-n", "ppo", "grpo", "rloo", "rejection", "dpo")
RL_METHODS = ("ppo", "grpo", "rloo")   # the PPO stage with estimator gae / grpo / rloo


@register
@dataclasses.dataclass(frozen=True)
class Overoptimization:
  """Gold reward -> labelled pairs -> proxy reward models -> policies optimised against each proxy -> gold and
  proxy against KL (l2jax/stages/overoptimization.py; docs/overoptimization.md).

  base: the starting policy: "llama2c:MODEL.bin" (converted into RUN_DIR/base with `base_tokenizer`, in the
  "text" chat format of a story model: l2jax.data.tokenizer), an l2jax checkpoint directory or an experiment
  reference. gold: the gold reward, "module:function" (l2jax.gold.load: a callable from a list of texts to
  floats; any module on PYTHONPATH). label_temperature: the Bradley-Terry temperature of the labels (0 =
  noiseless; l2jax.gold.bt_labels). opening_tokens: tokens per sampled story opening (the prompts: sampled from
  the base model itself, so none is training text it completes verbatim). train_prompts / heldout_pairs /
  report_prompts: openings for training (pairs, PPO, rejection sampling), for the held-out pairs that measure
  proxy accuracy, and for every reported measurement (disjoint sets). pairs: the proxies' training-set sizes
  (one proxy each; nested: a proxy's pairs are the first N). max_new_tokens / temperature: continuations of the
  pairs and of best-of-n. measure_samples: continuations per report prompt in each measurement. bon_n: the
  largest n of best-of-n (n = 1, 2, 4, ... bon_n). methods: which optimisations run, of METHODS (grpo and rloo
  are the PPO stage with `estimator` grpo / rloo; dpo trains on pairs of base continuations labelled by the
  proxy). proxy / ppo / grpo / rloo / rejection / dpo: variants of experiments/overoptimization.py that hold the
  sub-runs' settings, launched into RUN_DIR/proxy-<N>, ppo-<N>, grpo-<N>, rloo-<N>, rs-<N>, dpo-<N> with the
  benchmark's paths set; *_sets: more overrides for them (last). seed: openings, labels and measurement samples.
  """
  stage: ClassVar[str] = "overoptimization"
  name: str = "overoptimization"
  base: str = "llama2c:data/stories260K/stories260K.bin"
  base_tokenizer: str = "data/stories260K/tok512.model"
  gold: str = "l2jax.gold:story"
  label_temperature: float = 1.0
  opening_tokens: int = 24
  train_prompts: int = 2048
  heldout_pairs: int = 512
  report_prompts: int = 128
  pairs: tuple[int, ...] = (256, 1024, 2048)
  max_new_tokens: int = 48
  temperature: float = 1.0
  measure_samples: int = 4
  bon_n: int = 64
  methods: tuple[str, ...] = ("best-of-n", "ppo", "rejection")
  proxy: str = "tiny-proxy"
  ppo: str = "tiny-ppo"
  rejection: str = "tiny-rs"
  grpo: str = "tiny-grpo"
  rloo: str = "tiny-rloo"
  dpo: str = "tiny-dpo"
  proxy_sets: tuple[str, ...] = ()
  ppo_sets: tuple[str, ...] = ()
  rejection_sets: tuple[str, ...] = ()
  grpo_sets: tuple[str, ...] = ()
  rloo_sets: tuple[str, ...] = ()
  dpo_sets: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad:
      raise ValueError(f"methods: unknown {bad}; expected some of {METHODS}")
    if not self.pairs or min(self.pairs) < 2:
      raise ValueError(f"pairs: expected proxy training-set sizes >= 2, found {self.pairs}")
    if max(self.pairs) > self.train_prompts:
      raise ValueError(f"pairs: {max(self.pairs)} pairs need as many training openings (one pair each); "
                       f"train_prompts={self.train_prompts}")
    if not self.label_temperature >= 0:
      raise ValueError(f"label_temperature: expected >= 0, found {self.label_temperature}")
    for k in ("opening_tokens", "train_prompts", "heldout_pairs", "report_prompts", "max_new_tokens",
              "measure_samples", "bon_n"):
      if getattr(self, k) < 1:
        raise ValueError(f"{k}: expected >= 1, found {getattr(self, k)}")
    if not self.temperature > 0:
      raise ValueError(f"temperature: expected > 0, found {self.temperature}")
    if ":" not in self.gold:
      raise ValueError(f"gold: expected 'module:function', found {self.gold!r}")


__all__ = ["Overoptimization", "METHODS", "RL_METHODS"]
