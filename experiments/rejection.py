r"""Rejection-sampling fine-tuning with pooled best-of-K (Llama 2, section 3.2.3); safety context distillation (4.2.4).

  python -m l2jax.launch experiments/rejection.py:tiny   # CPU: builds sft:tiny and both rm:tiny first
  python -m l2jax.launch experiments/rejection.py:70b    # the 70B samples (K=10, T=1.2) and fine-tunes itself
  python -m l2jax.launch experiments/rejection.py:7b     # 7B / 13B distil the 70B's pool (no sampling)
  python -m l2jax.launch experiments/rejection.py:tiny --set mode=context_distillation --run-dir runs/cd-tiny
  # the next iteration pools this one's best answers and samples at its Figure 8 best temperature:
  python -m l2jax.launch experiments/rejection.py:tiny --set iteration=2 --set pool=runs/rejection-tiny/pool.jsonl \
      --set sampler=runs/rejection-tiny/final --set temperature_from=runs/rejection-tiny --run-dir runs/rejection-tiny-2

The paper gives neither K nor the fine-tuning settings: K = 10 (the low end of the "10-100 samples" of Figure 8)
at T = 1.2 (the best range for RLHF models, [1.2, 1.3]), and the SFT settings of section 3.1 (lr 2e-5 cosine to 0,
weight decay 0.1, 64 x 4096, 2 epochs). Prompts: HH-RLHF harmless-base (IS_SAFETY) and helpful-base + OASST, as
PPO reads them (place the train splits under data/hh-rlhf/<subset>/train.jsonl.gz).

`tiny` samples K=8 answers at T=1.2 from sft:tiny for 48 prompts of the shipped HH-RLHF test files and OASST, scores
them with rm_helpful:tiny and rm_safety:tiny, fine-tunes sft:tiny on the pool for 2 epochs, answers 16 held-out
prompts before and after, and writes Figure 7, Figure 8 (T = 0.8, 1.2, 1.6 on 12 prompts) and the held-out
histogram. Cut-off and empty answers never enter the pool (docs/rejection.md): sft:tiny stops by EOS within 48
tokens in about 1 sample of 4, so a few of the 48 prompts get no pool entry (counted in rejection.json["samples"]
and summary.md). `test` is the same at the `test` sizes (a few prompts and steps; for CI); its 3-step sampler
never stops within 8 tokens, so `test` sets keep_truncated=true to run the whole path.
"""
from l2jax import config as c
from l2jax.model import presets

TOKENIZER = "data/llama2-tokenizer/tokenizer.model"
HH_SAFETY, HH_HELPFUL = "hh-safety:data/hh-rlhf/harmless-base-test.jsonl.gz", "hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz"
OASST = "oasst:data/oasst/en_100_tree.jsonl"
PAPER_OPTIM = c.AdamW(lr=2e-5, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=0, decay_to=0.0,
                      schedule="cosine")
BIG = {"7b": ("llama2-7b", c.Mesh(fsdp=-1)), "13b": ("llama2-13b", c.Mesh(fsdp=-1)),
       "70b": ("llama2-70b", c.Mesh(fsdp=-1, tensor=8))}


def _small(size: str) -> c.Rejection:
  tiny = size == "tiny"
  return c.Rejection(
      name=f"rejection-{size}", mode="best_of_k", sampler=f"experiments/sft.py:{size}", init="",
      reward_models=c.RewardModels(helpful=f"experiments/rm_helpful.py:{size}",
                                   safety=f"experiments/rm_safety.py:{size}"),
      prompts=c.Prompts(sources=(HH_SAFETY, HH_HELPFUL, OASST), max_prompt_tokens=128 if tiny else 40,
                        heldout_fraction=0.1, eval_prompts=16 if tiny else 4, skip_bad=True),
      max_prompts=48 if tiny else 6, samples_per_prompt=8 if tiny else 4, temperature=1.2,
      max_new_tokens=48 if tiny else 8, keep_truncated=not tiny, batch_prompts=8 if tiny else 3, score_batch=64,
      temperatures=(0.8, 1.2, 1.6) if tiny else (0.8, 1.6), fig8_prompts=12 if tiny else 2, eval_temperature=1.0,
      model=presets.get("tiny" if tiny else "test"),
      optim=c.AdamW(lr=1e-3, warmup_steps=2, decay_to=0.1, weight_decay=0.1, clip=1.0),
      seq_len=256 if tiny else 64, global_batch=8 if tiny else 2, epochs=2, log_every=2,
      mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=20, keep=1), tensorboard=False)


def get_config(arg: str | None = None) -> c.Rejection:
  size = arg or "tiny"
  if size in ("tiny", "test"):
    return _small(size)
  if size not in BIG:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(BIG)}")
  preset, mesh = BIG[size]
  sampler = "experiments/sft.py:70b" if size == "70b" else ""
  return c.Rejection(
      name=f"rejection-{size}", mode="best_of_k", sampler=sampler,
      init=f"experiments/sft.py:{size}", pool="" if size == "70b" else "runs/rejection-70b/pool.jsonl",
      reward_models=c.RewardModels(helpful="experiments/rm_helpful.py:70b", safety="experiments/rm_safety.py:70b"),
      prompts=c.Prompts(sources=("hh-safety:data/hh-rlhf/harmless-base/train.jsonl.gz",) +
                        tuple(f"hh-helpful:data/hh-rlhf/{s}/train.jsonl.gz" for s in
                              ("helpful-base", "helpful-online", "helpful-rejection-sampled")) +
                        ("oasst:data/oasst/*.trees.jsonl",),
                        max_prompt_tokens=1024, heldout_fraction=0.01, eval_prompts=256, skip_bad=True),
      samples_per_prompt=10, temperature=1.2, max_new_tokens=1024, sample_dtype="bfloat16",
      # 8 prompts x K rows per sampling chunk: 32 did not fit one host's chips at 70B (the TPU compiler: 194 GiB
      # per v5p chip; 8 fit at 75 GiB with mesh.tensor=4, a v5p host's 4 chips; docs/tpu.md)
      batch_prompts=8,
      score_batch=64, temperatures=(0.8, 1.0, 1.2, 1.4), fig8_prompts=256, eval_temperature=1.0,
      model=presets.get(preset, dtype="bfloat16", remat="full"), optim=PAPER_OPTIM, seq_len=4096, global_batch=64,
      epochs=2, log_every=10, mesh=mesh, ckpt=c.Checkpointing(every=200, keep=2))
