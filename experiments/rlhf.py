r"""Iterative RLHF: Llama 2-Chat's versions V1..V5 as one composition of the stages (sections 3.2.3, 3.3; Figure 11).

  python -m l2jax.launch experiments/rlhf.py:tiny     # CPU, 2 cores: the whole chain, then the evaluation
  python -m l2jax.report runs/rlhf-tiny               # (rlhf.py already wrote it; rewrite it any time)
  python -m l2jax.launch experiments/rlhf.py:70b      # the paper's settings of every stage at 70B

SFT -> both reward models (initialised from SFT, trained on the "trainer" half of the preference data) and the two
held-out judges (the same experiments on the "judge" half: rm_helpful.py:<size>-judge, rm_safety.py:<size>-judge)
-> rejection sampling V1 (samples from SFT) -> V2 (from V1, pooling V1's best answers, at the best temperature of
V1's Figure 8) -> V3 -> Ghost Attention on V3 -> V4 (from V3+GAtt) -> V5 = one more rejection-sampling iteration
from V4 (V5-RS) and PPO on its checkpoint, as the paper's last version. Every stage is its experiment file at the
same size (experiments/{sft,rm_helpful,rm_safety,rejection,gatt,ppo}.py:<size>), so each runs with the paper's
settings of that stage as its file documents them; sub-runs go to runs/rlhf-<size>/v<n>-<stage>/ (SFT, the RMs and
the judges to their usual runs/<exp>-<size>/, shared with the standalone commands). Rerunning resumes where it
stopped; a finished stage is never redone. At the end, every version is evaluated against SFT by the held-out
judges on the "report" half of the held-out prompts (runs/rlhf-<size>/eval: win rates, reward distributions,
Self-BLEU, safety rates), multi-turn consistency (Table 30) is measured for V3 and every version from GAtt on, and
runs/rlhf-<size>/report.md is written. The paper pooled from V3 on; we pool from V2 (`pool_from`).
`--set final_stage=grpo` (or rloo) trains the last version with experiments/grpo.py (rloo.py) instead of PPO;
`--set dpo=true` adds V5-DPO, experiments/dpo.py:<size> from V5-RS's checkpoint, evaluated with the others.

`tiny`: the tiny stages (PPO shortened to 30 iterations), the evaluation on at most 64 + 64 held-out prompts (the
"report" half holds fewer) and Self-BLEU at T = 0.1 ... 1.5 with 25 samples per prompt on the 10 + 10 shipped
prompts; about 45 minutes on 2 shared cores after SFT and the four reward models (docs/rlhf.md). `test`: two rejection-sampling versions, GAtt after V1,
V3 = one more rejection-sampling iteration + PPO for 1 iteration, at the `test` sizes (CI).
"""
from l2jax import config as c

TEMPS = tuple(round(0.1 * k, 1) for k in range(1, 16))


def get_config(arg: str | None = None) -> c.RLHF:
  size = arg or "tiny"
  refs = dict(sft=f"experiments/sft.py:{size}", rm_helpful=f"experiments/rm_helpful.py:{size}",
              rm_safety=f"experiments/rm_safety.py:{size}", judge_helpful=f"experiments/rm_helpful.py:{size}-judge",
              judge_safety=f"experiments/rm_safety.py:{size}-judge", rejection_arg=size, gatt_arg=size, ppo_arg=size,
              dpo_arg=size)
  if size == "tiny":
    return c.RLHF(name="rlhf-tiny", **refs, rs_versions=4, pool_from=2, gatt_after=3, ppo=True, ppo_iterations=30,
                  eval=c.VersionsEval(prompts_per_set=64, max_new_tokens=48, temperature=0.6, top_p=0.9,
                                      diversity_prompts=10, diversity_samples=25, diversity_temperatures=TEMPS,
                                      diversity_max_new_tokens=32, tension_pairs=100, batch_size=64))
  if size == "test":
    return c.RLHF(name="rlhf-test", **refs, rs_versions=2, pool_from=2, gatt_after=1, ppo=True, ppo_iterations=1,
                  eval=c.VersionsEval(prompts_per_set=4, max_new_tokens=8, temperature=0.6, top_p=1.0,
                                      diversity_prompts=2, diversity_samples=3, diversity_temperatures=(0.5, 1.5),
                                      diversity_max_new_tokens=8, tension_pairs=8, batch_size=16))
  if size not in ("7b", "13b", "34b", "70b"):
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, 7b, 13b, 34b, 70b")
  return c.RLHF(name=f"rlhf-{size}", **refs, rs_versions=4, pool_from=3, gatt_after=3, ppo=True,
                eval=c.VersionsEval(prompts_per_set=256, max_prompt_tokens=1024, max_new_tokens=512, batch_size=64,
                                    diversity_max_new_tokens=256, tension_pairs=500))
