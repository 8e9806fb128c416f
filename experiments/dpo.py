r"""Direct Preference Optimization of the chat model (Rafailov et al. 2023), on the reward models' preference pairs.

  python -m l2jax.launch experiments/dpo.py:tiny    # CPU, about 5 minutes (+ SFT tiny first)
  python -m l2jax.launch experiments/dpo.py:7b      # also 13b, 70b; from runs/sft-<size>/final

The policy starts from `init` and `init` is also the frozen reference pi_ref. Loss: equation 7 of the DPO paper
(l2jax.losses.dpo_loss), on the answer tokens only; optional label smoothing (conservative DPO) and Llama 2's
Table 27 rating margin (`margin`, off by default). Data: the helpfulness reward model's (experiments/rm_helpful.py):
the pairs are read, filtered, split and mixed by the same code, and every variant trains on the "trainer" half
of the conversations (data.part), so the held-out judges (rm_helpful.py:<size>-judge) never saw a pair it was
trained towards; `--set data.part=all` takes both halves.
Sizes ("paper-like": the DPO paper's Appendix B): beta 0.1, batch 64 pairs, lr 5e-7 (the paper: 1e-6 with
RMSprop; 5e-7 with AdamW as Zephyr's DPO, Tunstall et al. 2023) after 150 warmup steps, then constant; one epoch of
HH-RLHF helpful-base, helpful-online and helpful-rejection-sampled train pairs mixed half and half with
harmless-base and OpenAssistant (place them as experiments/rm_helpful.py says), 1% of each file held out, the
shipped HH test sets evaluated in full; rows of 4096 tokens in micro-batches of 8 pairs (70B: 4, so that the step
fits a v5p-64 slice: 84.6 GiB per chip where 8 pairs need 97.8; `--aot`, docs/tpu.md).
`tiny` runs DPO on experiments/sft.py:tiny (run first when runs/sft-tiny/final is missing) with the data of
rm_helpful.py:tiny: the shipped HH-RLHF helpful test pairs mixed half and half with the harmless test pairs and
100 OASST trees, 20% of each file's conversations held out, rows of 128 tokens, one epoch of 58 steps of 32 pairs
in micro-batches of 8 (on CPU the smaller logits buffers make a step 1.4x faster; a second epoch only overfits:
the held-out accuracy falls back while the training accuracy climbs). It writes runs/dpo-tiny/{metrics.jsonl,
data_summary.json, dpo_eval.json, final/} and reaches about 57% held-out reward accuracy on HH helpful, 62% on
OASST, 46% on HH harmless (docs: l2jax/stages/dpo.py).
`test` is the same for 3 steps from experiments/sft.py:test (seconds), in micro-batches.
"""
from l2jax import config as c
from l2jax.model import presets

TOKENIZER = "data/llama2-tokenizer/tokenizer.model"
HH_TEST = ("hh:data/hh-rlhf/helpful-base-test.jsonl.gz", "hh:data/hh-rlhf/harmless-base-test.jsonl.gz")
OASST_TINY = "oasst:data/oasst/en_100_tree.jsonl"
SIZES = {"7b": ("llama2-7b", c.Mesh(fsdp=-1)), "13b": ("llama2-13b", c.Mesh(fsdp=-1)),
         "70b": ("llama2-70b", c.Mesh(fsdp=-1, tensor=8))}


def get_config(arg: str | None = None) -> c.DPO:
  size = arg or "tiny"
  if size == "tiny":
    return c.DPO(
        name="dpo-tiny", init="experiments/sft.py:tiny", model=presets.get("tiny"),
        data=c.Preferences(sources=(HH_TEST[0],), mix=(HH_TEST[1], OASST_TINY), mix_fraction=0.5,
                           heldout_fraction=0.2, part="trainer", tokenizer=TOKENIZER),
        beta=0.1, optim=c.AdamW(lr=1e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, clip=1.0, warmup_steps=5,
                                decay_to=0.1),
        seq_len=128, global_batch=32, micro_batch=8, epochs=1.0, log_every=5, eval_every=20, eval_batch=64,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=100, keep=1), tensorboard=False)
  if size == "test":   # a few steps from SFT test, in micro-batches
    return c.DPO(
        name="dpo-test", init="experiments/sft.py:test", model=presets.get("tiny"),
        data=c.Preferences(sources=(HH_TEST[0],), mix=(HH_TEST[1],), mix_fraction=0.5, heldout_fraction=0.2,
                           eval_pairs=16, part="trainer", tokenizer=TOKENIZER),
        beta=0.1, optim=c.AdamW(lr=1e-4, warmup_steps=1, weight_decay=0.0, decay_to=0.1),
        seq_len=128, global_batch=8, micro_batch=4, steps=3, log_every=1, eval_every=0, eval_batch=16,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=3, keep=1), tensorboard=False)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  preset, mesh = SIZES[size]
  return c.DPO(
      name=f"dpo-{size}", init=f"runs/sft-{size}/final", model=presets.get(preset, dtype="bfloat16", remat="full"),
      data=c.Preferences(
          sources=tuple(f"hh:data/hh-rlhf/{s}/train.jsonl.gz"
                        for s in ("helpful-base", "helpful-online", "helpful-rejection-sampled")),
          mix=("hh:data/hh-rlhf/harmless-base/train.jsonl.gz", "oasst:data/oasst/*.trees.jsonl"),
          mix_fraction=0.5, heldout_fraction=0.01, eval_sources=HH_TEST, part="trainer", tokenizer=TOKENIZER),
      beta=0.1, label_smoothing=0.0, margin="none",
      optim=c.AdamW(lr=5e-7, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0, clip=1.0, warmup_steps=150,
                    schedule="constant"),
      seq_len=4096, global_batch=64, micro_batch=4 if size == "70b" else 8, epochs=1.0, log_every=10, eval_every=200, eval_batch=64,
      mesh=mesh, ckpt=c.Checkpointing(every=200, keep=2))
