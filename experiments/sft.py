r"""Supervised fine-tuning on dialogs, loss on answers only (Llama 2, section 3.1).

  python -m l2jax.launch experiments/sft.py:tiny    # CPU, 1-2 minutes: shipped GSM8K, random init
  python -m l2jax.launch experiments/sft.py:tiny --set init=runs/pretrain-tiny/final   # from tiny pretraining
  python -m l2jax.launch experiments/sft.py:7b --set init=CKPT_DIR --set data.paths=my_dialogs.jsonl

The paper's settings for every size: cosine schedule from lr 2e-5 (no warmup, decaying to 0: the paper gives
neither), weight decay 0.1, AdamW(0.9, 0.95, 1e-5) and clipping 1.0 as in pretraining, batch 64 sequences of
4096 tokens, 2 epochs; steps are derived from the epochs and the packed dataset size. `7b` ... `70b` start from
`init` (default runs/pretrain-<size>/final; any l2jax checkpoint directory, e.g. a converted Meta model) and read
`data.kind=messages` JSONL from `data.paths` (or oasst / gsm8k / tfds, see docs/sft.md).

`tiny` fine-tunes the `tiny` preset on 400 GSM8K question/answer dialogs (every 20th held out) for 2 epochs of
8 rows x 256 tokens. It should write runs/sft-tiny/{metrics.jsonl, data_stats.json, samples.jsonl, final/}; the
answer-only training loss falls from about 10.4 to about 4 (held-out: about 4.2).
`test` is the same architecture for 3 steps on 40 dialogs (seconds): the SFT model that the `test` variants of
the later stages (reward models, PPO, rejection sampling, GAtt) start from through "experiments/sft.py:test".
"""
from l2jax import config as c
from l2jax.model import presets

SIZES = {"7b": ("llama2-7b", c.Mesh(fsdp=-1)), "13b": ("llama2-13b", c.Mesh(fsdp=-1)),
         "34b": ("llama2-34b", c.Mesh(fsdp=-1, tensor=8)), "70b": ("llama2-70b", c.Mesh(fsdp=-1, tensor=8))}
TOKENIZER = "data/llama2-tokenizer/tokenizer.model"
PAPER_OPTIM = c.AdamW(lr=2e-5, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=0,
                      decay_to=0.0, schedule="cosine")


def get_config(arg: str | None = None) -> c.SFT:
  size = arg or "tiny"
  if size == "tiny":
    return c.SFT(
        name="sft-tiny", model=presets.get("tiny"), init="",
        data=c.Dialogs(kind="gsm8k", paths=("data/gsm8k/test.jsonl",), tokenizer=TOKENIZER, max_dialogs=400,
                       eval_every_nth=20),
        optim=c.AdamW(lr=3e-3, warmup_steps=5, decay_to=0.1, weight_decay=0.1, clip=1.0),
        seq_len=256, global_batch=8, epochs=2, log_every=5, eval_every=20, eval_batches=2,
        sample_prompts=3, sample_max_new_tokens=48, mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=20, keep=2))
  if size == "test":   # the tiny architecture for a few steps: the start of the test chains of later stages
    return c.SFT(
        name="sft-test", model=presets.get("tiny"), init="",
        data=c.Dialogs(kind="gsm8k", paths=("data/gsm8k/test.jsonl",), tokenizer=TOKENIZER, max_dialogs=40),
        optim=c.AdamW(lr=3e-3, warmup_steps=1, decay_to=0.1, weight_decay=0.1, clip=1.0),
        seq_len=256, global_batch=8, epochs=1, steps=3, log_every=1, eval_every=0, sample_prompts=0,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=3, keep=1), tensorboard=False)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  preset, mesh = SIZES[size]
  return c.SFT(
      name=f"sft-{size}", model=presets.get(preset, dtype="bfloat16", remat="full"),
      init=f"runs/pretrain-{size}/final",
      data=c.Dialogs(kind="messages", paths=(), tokenizer=TOKENIZER, eval_every_nth=100),
      optim=PAPER_OPTIM, seq_len=4096, global_batch=64, epochs=2, log_every=10, eval_every=100, eval_batches=4,
      sample_prompts=8, sample_max_new_tokens=256, mesh=mesh, ckpt=c.Checkpointing(every=200, keep=3))
