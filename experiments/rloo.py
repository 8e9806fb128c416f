r"""RLOO, REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics", section 3.2) on the two reward models:
PPO's rollout and loop with leave-one-out advantages instead of the value model (l2jax/rl/advantages.py).

  python -m l2jax.launch experiments/rloo.py:tiny   # CPU: builds SFT tiny and both tiny RMs first (as ppo.py:tiny)
  python -m l2jax.launch experiments/rloo.py:70b    # policy runs/rejection-70b/final, RMs runs/rm_*-70b/final

Every setting not named here is experiments/ppo.py's at the same size (its prompts, lr, clip 0.2, temperature 1,
beta 0.01 / 0.005, evaluations and early stopping, mesh and memory plan). What RLOO changes: each prompt is
sampled group_size times in one generate call; a response's sequence reward is r = LOGIT(Rc) - beta * sum_t
(log pi - log pi_0) (k1 summed over the response: the KL in the reward as in Ahmadian et al. and TRL's
RLOOTrainer; `kl_in`), with the raw LOGIT(Rc) of Llama 2 section 3.2.3 (no batch whitening: the baseline is the
group's), minus the missing-EOS penalty; its advantage is r - the mean of the other k - 1 rewards of its group;
no value model is loaded, trained or saved (no value/). The update is PPO's clipped surrogate (clip 0.2, as TRL's
RLOOTrainer; Ahmadian et al.'s plain REINFORCE is its first, unclipped step) averaged over the mini-batch's
response tokens. batch_prompts,
minibatch and micro_batch count prompts: the paper sizes take 64 prompts x 8 samples = 512 rows per iteration,
mini-batches of 8 prompts (64 rows, one AdamW step each: 8 per iteration, as PPO) and micro-batches of one
prompt's 8 rows, PPO's rows in every phase (Ahmadian et al. use k = 2 and 4; 8 is GRPO's setting here too, so
the two compare on equal rollouts; `--set group_size=4 --set batch_prompts=128 --set minibatch=16` for theirs).

`tiny`: ppo.py:tiny's chain and settings (lr 3e-5, beta 0.05) with 4 prompts x 4 samples (PPO's 16 rows) and
mini-batches of 2 prompts (8 rows, 2 steps per iteration as PPO); 60 iterations on 2 CPU cores, under a minute
after the chain. Measured once (shared machine): held-out Rc -0.911 at iteration 0 -> -0.675 at iteration 50
(final/, the best evaluation) with a KL of 0.84 nats per response (ppo.py:tiny: -0.629 at a KL of 2.91).
`test`: ppo.py:test's chain with 4 prompts x 2 samples (CI).
"""
import dataclasses
from pathlib import Path

from l2jax import config as c

PPO_FILE = Path(__file__).with_name("ppo.py")


def get_config(arg: str | None = None) -> c.PPO:
  from l2jax.experiment_refs import load_experiment
  size = arg or "tiny"
  base, _ = load_experiment(f"{PPO_FILE}:{size}")   # the sizes, beta per size and their errors are ppo.py's
  if size == "tiny":
    group = dict(batch_prompts=4, group_size=4, minibatch=2)
  elif size == "test":
    group = dict(batch_prompts=4, group_size=2, minibatch=2)
  else:
    group = dict(batch_prompts=64, group_size=8, minibatch=8, micro_batch=1)
  return dataclasses.replace(base, name=f"rloo-{size}", estimator="rloo", kl_in="", loss_normalization="", **group)
