r"""GRPO (Shao et al. 2024, DeepSeekMath section 4.1) on the two reward models: PPO's rollout and loop with group
advantages instead of the value model (l2jax/rl/advantages.py; `PPO.estimator`).

  python -m l2jax.launch experiments/grpo.py:tiny   # CPU: builds SFT tiny and both tiny RMs first (as ppo.py:tiny)
  python -m l2jax.launch experiments/grpo.py:70b    # policy runs/rejection-70b/final, RMs runs/rm_*-70b/final

Every setting not named here is experiments/ppo.py's at the same size (its prompts, lr, clip 0.2, temperature 1,
evaluations and early stopping, mesh and memory plan). What GRPO changes: each prompt is sampled group_size
times in one generate call and a response's advantage is (r - mean of its group) / (std of its group + 1e-4)
with r the raw LOGIT(Rc) of Llama 2 section 3.2.3 (the group normalises it: no batch whitening), minus the
missing-EOS penalty; no value model is loaded, trained or saved (no value/); the KL to pi_0 is DeepSeekMath's
k3 term in the loss with beta 0.04 (their section 4.2; `kl_in`), and the loss is the mean over responses of
their token means (the original GRPO objective; `loss_normalization="token"` gives DAPO's). batch_prompts,
minibatch and micro_batch count prompts: the paper sizes take 64 prompts x 8 samples = 512 rows per iteration,
mini-batches of 8 prompts (64 rows, one AdamW step each: 8 per iteration, as PPO) and micro-batches of one
prompt's 8 rows, so generation, scoring and training hold PPO's rows (DeepSeekMath samples 64 per question; 8
keeps 64 distinct prompts per iteration).

`tiny`: ppo.py:tiny's chain and settings (lr 3e-5) with 4 prompts x 4 samples (PPO's 16 rows) and mini-batches
of 2 prompts (8 rows, 2 steps per iteration as PPO); 60 iterations on 2 CPU cores, about a minute after the
chain. Measured once (shared machine): held-out Rc -0.911 at iteration 0 -> -0.726 at iteration 10 (KL 0.24)
-> -0.636 at iteration 60 (final/, the best evaluation) with a KL of 5.1 nats per response (ppo.py:tiny: -0.629
at a KL of 2.91). `test`: ppo.py:test's chain with 4 prompts x 2 samples (CI).
"""
import dataclasses
from pathlib import Path

from l2jax import config as c

PPO_FILE = Path(__file__).with_name("ppo.py")


def get_config(arg: str | None = None) -> c.PPO:
  from l2jax.experiment_refs import load_experiment
  size = arg or "tiny"
  base, _ = load_experiment(f"{PPO_FILE}:{size}")   # the sizes and their errors are ppo.py's
  if size == "tiny":
    group = dict(batch_prompts=4, group_size=4, minibatch=2)
  elif size == "test":
    group = dict(batch_prompts=4, group_size=2, minibatch=2)
  else:
    group = dict(batch_prompts=64, group_size=8, minibatch=8, micro_batch=1)
  return dataclasses.replace(base, name=f"grpo-{size}", estimator="grpo", kl_in="", loss_normalization="",
                             kl_beta=0.04, **group)
