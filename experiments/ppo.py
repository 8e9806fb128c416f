r"""PPO on the two reward models (Llama 2, section 3.2.3): the main job of l2jax.

  python -m l2jax.launch experiments/ppo.py:tiny   # CPU: builds SFT tiny and both tiny RMs first, then PPO
  python -m l2jax.launch experiments/ppo.py:70b    # policy runs/rejection-70b/final, RMs runs/rm_*-70b/final

The paper's settings for every size: AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, gradient clipping 1.0,
constant lr 1e-6; 512 prompts per iteration, one response each; mini-batches of 64 with one gradient step each;
PPO clip 0.2; beta = 0.01 (7B, 13B) / 0.005 (34B, 70B); 200 iterations with held-out evaluations (every 10
iterations) for early stopping. Where the paper is silent (docs/ppo.md): KL as a per-token reward (k1), GAE
gamma 1 / lambda 0.95, advantages whitened per batch, clipped value loss 0.2, the value model initialised from
the helpfulness RM with lr 9e-6 (OpenRLHF's critic default), one PPO epoch, responses of at most 1024 tokens
after prompts of at most 1024 (the HH-RLHF train splits + OpenAssistant trees, placed as data/README.md says, as
rejection sampling reads them; point prompts.sources at your own JSONL). Sampling at temperature 1 from the whole
distribution (top_p is refused: docs/ppo.md). The evaluation set that early-stops and selects final/ is a
stratified sample of the held-out "select" half; the versions evaluation reports on the other half.
Memory plan (`--check-sharding` prints and checks it): the policy and the value model are trained fully sharded
(fp32 master weights + AdamW over fsdp x tensor), the reference and both reward models are frozen in bf16, and
the policy is consolidated to the sampling layout for generation.

`tiny` starts from experiments/sft.py:tiny with the tiny reward models (themselves initialised from SFT tiny, as
the paper initialises RMs from the chat model): 60 iterations of 16 prompts (HH-RLHF test prompts + OASST),
responses of at most 32 tokens, on 2 CPU cores (about 3 minutes after the chain). A model this small needs a
larger step than the paper's: lr 3e-5 for the policy and 1e-3 for the value model; beta 0.05 keeps the KL to
about 1.5 nats per response (with lr 1e-4 and beta 0.01 the reward rises further but the KL reaches 25 nats,
the entropy doubles and EOS disappears: the tiny reward models get gamed). `test` is the same chain at the
smallest size (CI).
"""
from l2jax import config as c
from l2jax.model import presets

# tiny / test: the shipped files (the HH-RLHF test splits, data/README.md); never for the paper sizes
PROMPTS = ("hh-safety:data/hh-rlhf/harmless-base-test.jsonl.gz", "hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz",
           "oasst:data/oasst/en_100_tree.jsonl")
# the paper sizes: the HH-RLHF *train* splits and the OpenAssistant trees, as experiments/rejection.py reads them
# (the test splits are the reward models' evaluation set, and only ~4.5k prompts: 200 x 512 rollouts would be
# ~22 passes over each)
PAPER_PROMPTS = (("hh-safety:data/hh-rlhf/harmless-base/train.jsonl.gz",) +
                 tuple(f"hh-helpful:data/hh-rlhf/{s}/train.jsonl.gz" for s in
                       ("helpful-base", "helpful-online", "helpful-rejection-sampled")) +
                 ("oasst:data/oasst/*.trees.jsonl",))
# (beta, mesh, devices of the memory plan (80 GiB each): one 8-GPU node for 7B, 2 nodes for 13B, 4 for 34B,
# 8 for 70B; generation in 4 chunks of 128 prompts keeps the KV cache of the MHA models (7B, 13B) in bounds)
SIZES = {"7b": (0.01, c.Mesh(fsdp=-1), 8), "13b": (0.01, c.Mesh(fsdp=-1, tensor=2), 16),
         "34b": (0.005, c.Mesh(fsdp=-1, tensor=8), 32), "70b": (0.005, c.Mesh(fsdp=-1, tensor=8), 64)}
PAPER_OPTIM = c.AdamW(lr=1e-6, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=0,
                      schedule="constant")


def get_config(arg: str | None = None) -> c.PPO:
  size = arg or "tiny"
  if size in ("tiny", "test"):
    dep = f"experiments/{{}}.py:{size}"
    small = size == "test"
    return c.PPO(
        name=f"ppo-{size}", policy=dep.format("sft"),
        reward_models=c.RewardModels(helpful=dep.format("rm_helpful"), safety=dep.format("rm_safety")),
        value_init="helpful", model=presets.get("tiny"), frozen_dtype="float32",
        prompts=c.Prompts(sources=PROMPTS, max_prompt_tokens=64 if small else 96, heldout_fraction=0.05,
                          eval_prompts=16 if small else 48, skip_bad=True),
        max_new_tokens=16 if small else 32, temperature=1.0, top_p=1.0, kl_beta=0.05,
        optim=c.AdamW(lr=3e-5, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=1.0),
        value_optim=c.AdamW(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=1.0),
        batch_prompts=8 if small else 16, minibatch=4 if small else 8, iterations=2 if small else 60,
        eval_every=2 if small else 10, patience=0, samples_logged=2, mesh=c.Mesh(fsdp=-1),
        ckpt=c.Checkpointing(every=1 if small else 10, keep=2), log_every=1, tensorboard=not small)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  beta, mesh, devices = SIZES[size]
  return c.PPO(
      name=f"ppo-{size}", policy=f"runs/rejection-{size}/final",
      reward_models=c.RewardModels(helpful=f"runs/rm_helpful-{size}/final", safety=f"runs/rm_safety-{size}/final",
                                   safety_threshold=0.15),
      value_init="helpful", model=presets.get(f"llama2-{size}", dtype="bfloat16", remat="full"),
      frozen_dtype="bfloat16",
      prompts=c.Prompts(sources=PAPER_PROMPTS, max_prompt_tokens=1024, heldout_fraction=0.05, eval_prompts=256,
                        skip_bad=True),
      max_new_tokens=1024, temperature=1.0, top_p=1.0, kl_beta=beta, optim=PAPER_OPTIM,
      value_optim=c.AdamW(lr=9e-6, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=0,
                          schedule="constant"),
      batch_prompts=512, minibatch=64, micro_batch=8, generate_chunks=4, ppo_epochs=1, iterations=200, eval_every=10, patience=3,
      device_memory_gib=80.0, plan_devices=devices, mesh=mesh, ckpt=c.Checkpointing(every=10, keep=2), log_every=1)
