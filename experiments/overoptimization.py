r"""Reward over-optimisation on a known gold reward (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"; Llama 2 sections 3.2.2-3.2.3 and 3.4.1, reward hacking): does RL here improve a real model?

  python -m l2jax.launch experiments/overoptimization.py:tiny    # 2 CPU cores, no downloads
  python -m l2jax.launch experiments/overoptimization.py:tiny --set gold=mymodule:score   # your own gold
  python -m l2jax.report runs/overoptimization-tiny                                      # rewrite report.md

The base policy is llama2.c's stories260K (shipped, data/stories260K), continuing story openings it sampled
itself. A gold reward function (l2jax.gold; default `story`: the sentiment lexicon score times the share of
distinct words) labels pairs of its continuations under a Bradley-Terry draw (temperature 0.1: about 84% of the
labels agree with the gold order); proxy reward models are trained on 1024, 4096 and 8192 of those pairs from
the base model; best-of-n (n = 1..64), PPO and rejection-sampling fine-tuning optimise each
proxy; every policy is measured on 128 held-out openings: gold, proxy and KL to the base model. The result is
Gao et al.'s Figure 1 (gold and proxy against sqrt(KL)) with their fitted forms, in RUN_DIR/report.md
(docs/overoptimization.md says how to read it).

Variants: `tiny` and `test` (CI, seconds per phase) are the benchmark; `<size>-compare` runs every method
(best-of-n, PPO, GRPO, RLOO, rejection sampling, DPO) against one proxy (4096 pairs at tiny); `<size>-proxy`,
`-ppo`, `-grpo`, `-rloo`, `-rs` and `-dpo` are the settings it launches for each proxy (the stage sets the paths:
base model, pairs, prompts, proxy), so `--set proxy_sets=...` / `ppo_sets` / ... or a copy of this file changes
them. GRPO and RLOO take PPO's settings with 4 samples per prompt (the same 64 rows per iteration), GRPO's KL in
the loss (k3, DeepSeekMath) and RLOO's in the reward; DPO trains from the base model on the training pairs
relabelled by the proxy (beta 0.1, one epoch).
"""
import dataclasses

from l2jax import config as c
from l2jax.model import presets

STORY = presets.get("stories260k", dtype="float32")
BASE = "llama2c:data/stories260K/stories260K.bin"


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  size, _, part = arg.partition("-")
  parts = ("", "compare", "proxy", "ppo", "grpo", "rloo", "rs", "dpo")
  if size not in ("tiny", "test") or part not in parts:
    raise ValueError(f"unknown variant {arg!r}; choose tiny, test, or <tiny|test>-<{'|'.join(parts[1:])}>")
  test = size == "test"
  if part in ("grpo", "rloo"):   # PPO's settings with group advantages: the same rows per iteration, no value model
    ppo = get_config(f"{size}-ppo")
    k = 4 if not test else 2
    return dataclasses.replace(ppo, name=f"overoptimization-{size}-{part}", estimator=part, group_size=k,
                               batch_prompts=ppo.batch_prompts // k, minibatch=max(ppo.minibatch // k, 1))
  if part == "dpo":
    return c.DPO(
        name=f"overoptimization-{size}-dpo", init="", model=STORY,
        data=c.Preferences(sources=(), heldout_fraction=0.05, safety_filter=False,
                           tokenizer="data/stories260K/tok512.model"),
        beta=0.1, margin="none", optim=c.AdamW(lr=1e-4, warmup_steps=2, decay_to=0.1, weight_decay=0.0, clip=1.0),
        seq_len=96 if not test else 48, global_batch=32 if not test else 8, epochs=1.0, log_every=10,
        eval_batch=64 if not test else 8, mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=1000, keep=1),
        tensorboard=False)
  if part == "proxy":
    return c.RewardModel(
        name=f"overoptimization-{size}-proxy", objective="helpfulness", model=STORY, init="",
        data=c.Preferences(sources=(), heldout_fraction=0.0, eval_pairs=0, safety_filter=False,
                           tokenizer="data/stories260K/tok512.model"),
        margin="none", optim=c.AdamW(lr=5e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, decay_to=0.1),
        seq_len=96 if not test else 48, global_batch=32 if not test else 8, epochs=2.0, warmup_fraction=0.03,
        min_warmup=2, log_every=10, eval_batch=128 if not test else 16, mesh=c.Mesh(fsdp=-1),
        ckpt=c.Checkpointing(every=1000, keep=1), tensorboard=False)
  if part == "ppo":
    return c.PPO(
        name=f"overoptimization-{size}-ppo", policy="", model=STORY, frozen_dtype="float32", value_init="helpful",
        prompts=c.Prompts(sources=(), max_prompt_tokens=64, heldout_fraction=0.05, eval_prompts=32 if not test else 4),
        max_new_tokens=48 if not test else 16, temperature=1.0, kl_beta=0.02,
        optim=c.AdamW(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0, clip=1.0),
        value_optim=c.AdamW(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, clip=1.0),
        batch_prompts=64 if not test else 8, minibatch=16 if not test else 4, iterations=60 if not test else 2,
        eval_every=4 if not test else 1, patience=0, samples_logged=2, snapshots=True, mesh=c.Mesh(fsdp=-1),
        ckpt=c.Checkpointing(every=4 if not test else 1, keep=2), log_every=1, tensorboard=False)
  if part == "rs":
    return c.Rejection(
        name=f"overoptimization-{size}-rs", mode="best_of_k", sampler="", init="",
        prompts=c.Prompts(sources=(), max_prompt_tokens=64, heldout_fraction=0.05, eval_prompts=16 if not test else 2),
        max_prompts=512 if not test else 8, samples_per_prompt=16 if not test else 4, temperature=1.0,
        max_new_tokens=48 if not test else 16, keep_truncated=True, batch_prompts=32 if not test else 4,
        score_batch=128, temperatures=(), eval_temperature=1.0, model=STORY,
        optim=c.AdamW(lr=1e-3, warmup_steps=2, decay_to=0.1, weight_decay=0.0, clip=1.0),
        seq_len=96 if not test else 48, global_batch=32 if not test else 8, epochs=2, log_every=5,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=1000, keep=1), tensorboard=False)
  if part == "compare":   # every method against one proxy (issue: GRPO, RLOO and DPO judged on the gold task)
    return c.Overoptimization(
        name=f"overoptimization-{size}-compare", base=BASE, gold="l2jax.gold:story", label_temperature=0.1,
        train_prompts=64 if test else 4096, heldout_pairs=32 if test else 512, report_prompts=8 if test else 128,
        pairs=(64,) if test else (4096,), opening_tokens=16 if test else 24, max_new_tokens=16 if test else 48,
        measure_samples=2 if test else 4, bon_n=8 if test else 64, methods=c.METHODS,
        **{m: f"{size}-{v}" for m, v in (("proxy", "proxy"), ("ppo", "ppo"), ("grpo", "grpo"), ("rloo", "rloo"),
                                         ("rejection", "rs"), ("dpo", "dpo"))})
  if test:
    return c.Overoptimization(
        name="overoptimization-test", base=BASE, gold="l2jax.gold:story", label_temperature=0.1,
        opening_tokens=16, train_prompts=64, heldout_pairs=32, report_prompts=8, pairs=(16, 64), max_new_tokens=16,
        measure_samples=2, bon_n=8, proxy="test-proxy", ppo="test-ppo", rejection="test-rs", grpo="test-grpo",
        rloo="test-rloo", dpo="test-dpo")
  return c.Overoptimization(name="overoptimization-tiny", base=BASE, gold="l2jax.gold:story", label_temperature=0.1,
                            train_prompts=8192, pairs=(1024, 4096, 8192), proxy="tiny-proxy", ppo="tiny-ppo",
                            rejection="tiny-rs")
