r"""Safety reward model (Llama 2 section 3.2.2).

  python -m l2jax.launch experiments/rm_safety.py:tiny   # CPU, a few minutes (+ SFT tiny first)
  python -m l2jax.launch experiments/rm_safety.py:tiny-judge   # the held-out judge (the other half of the pairs)
  python -m l2jax.launch experiments/rm_safety.py:7b     # also 13b, 70b; backbone from runs/sft-<size>/final

Data ("Data Composition"): all safety data and Anthropic harmless data, mixed with helpfulness and open-source
helpfulness data in a 90/10 proportion (mix_fraction 0.1). Pairs whose chosen response is labelled unsafe
while the rejected one is labelled safe are dropped (data.safety_filter; needs per-response labels, e.g.
"chosen_safe" / "rejected_safe" in generic JSONL). Without Meta's safety data the sizes use Anthropic
harmless-base as the safety data (add yours as "jsonl:PATH" to data.sources) and HH helpful subsets plus
OpenAssistant as the helpfulness part; place them under data/hh-rlhf/<subset>/train.jsonl.gz and data/oasst/.
The shipped HH test sets are evaluated in full.
Training: as the helpfulness RM (one epoch; lr 1e-5, 5e-6 for 70B; cosine to 10%; warmup 3% of the steps, at
least 5; 512 pairs per batch; the small margin of Table 27). `tiny` starts from
experiments/sft.py:tiny (run first when runs/sft-tiny/final is missing; the paper initialises reward models
from the chat model) and trains its 4-layer, 128-wide backbone with a fresh head
for one epoch over rows of 128 tokens built from the shipped HH-RLHF test files and OASST trees, holding out
20% of the conversations of each file for its accuracy table (run_dir/reward_eval.*); see docs/reward.md.
`test` is the same for 3 steps from experiments/sft.py:test (seconds), for the test chains of later stages.
Every variant trains on the "trainer" half of the training conversations (data.part; the reward models that
train policies); `<size>-judge` (e.g. `tiny-judge`) is the same on the "judge" half: the held-out judge that
scores the iterative-RLHF versions (docs/rlhf.md). `--set data.part=all` trains on both halves.
"""

from l2jax import config as c
from l2jax.model import presets

TOKENIZER = "data/llama2-tokenizer/tokenizer.model"
SIZES = {"7b": ("llama2-7b", 1e-5, c.Mesh(fsdp=-1)), "13b": ("llama2-13b", 1e-5, c.Mesh(fsdp=-1)),
         "70b": ("llama2-70b", 5e-6, c.Mesh(fsdp=-1, tensor=8))}
HH_TEST = ("hh:data/hh-rlhf/helpful-base-test.jsonl.gz", "hh:data/hh-rlhf/harmless-base-test.jsonl.gz")


def get_config(arg: str | None = None) -> c.RewardModel:
  return c.reward_model_variant(arg or "tiny", _sized, SIZES)


def _sized(size: str) -> c.RewardModel:
  if size == "tiny":
    return c.RewardModel(
        name="rm-safety-tiny", objective="safety", model=presets.get("tiny"), init="experiments/sft.py:tiny",
        data=c.Preferences(sources=(HH_TEST[1],), mix=(HH_TEST[0], "oasst:data/oasst/en_100_tree.jsonl"),
                           mix_fraction=0.1, heldout_fraction=0.2, tokenizer=TOKENIZER),
        margin="small", optim=c.AdamW(lr=1e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, decay_to=0.1),
        seq_len=128, global_batch=32, epochs=1.0, log_every=5, eval_batch=64,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=100, keep=1), tensorboard=False)
  if size == "test":   # a few steps from SFT test: the reward model of the later stages' test chains
    return c.RewardModel(
        name="rm-safety-test", objective="safety", model=presets.get("tiny"), init="experiments/sft.py:test",
        data=c.Preferences(sources=(HH_TEST[1],), mix=(HH_TEST[0],), mix_fraction=0.1, heldout_fraction=0.2,
                           eval_pairs=16, tokenizer=TOKENIZER),
        margin="small", optim=c.AdamW(lr=1e-3, warmup_steps=1, decay_to=0.1),
        seq_len=128, global_batch=8, steps=3, warmup_fraction=0.0, log_every=1, eval_batch=16,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=3, keep=1), tensorboard=False)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  preset, lr, mesh = SIZES[size]
  return c.RewardModel(
      name=f"rm-safety-{size}", objective="safety", init=f"runs/sft-{size}/final",
      model=presets.get(preset, dtype="bfloat16", remat="full"),
      data=c.Preferences(
          sources=("hh:data/hh-rlhf/harmless-base/train.jsonl.gz",),
          mix=tuple(f"hh:data/hh-rlhf/{s}/train.jsonl.gz"
                    for s in ("helpful-base", "helpful-online", "helpful-rejection-sampled"))
              + ("oasst:data/oasst/*.trees.jsonl",),
          mix_fraction=0.1, heldout_fraction=0.01, eval_sources=HH_TEST, safety_filter=True, tokenizer=TOKENIZER),
      margin="small", optim=c.AdamW(lr=lr, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, decay_to=0.1),
      seq_len=4096, global_batch=512, micro_batch=64, epochs=1.0, warmup_fraction=0.03, min_warmup=5,
      log_every=10, eval_every=200, eval_batch=64, mesh=mesh, ckpt=c.Checkpointing(every=200, keep=2))
