r"""Pretraining (Llama 2 section 2.2).

  python -m l2jax.launch experiments/pretrain.py:tiny   # CPU, about two minutes: shipped Shakespeare + Llama 2 tokenizer
  python -m l2jax.launch experiments/pretrain.py:7b --set data.kind=tfds --set data.name=my_corpus ...

The paper's settings for every size: AdamW(b1 0.9, b2 0.95, eps 1e-5), weight decay 0.1, gradient clipping
1.0, cosine schedule with 2000 warmup steps decaying to 10% of peak; peak lr 3e-4 (7B, 13B) and 1.5e-4
(34B, 70B); global batch 4M tokens (1024 rows of 4096); context 4096. `tiny` is a small CPU model whose loss
clearly falls within its 300 steps (about two minutes on 2 cores). `test` is the `test` preset (vocabulary
128) for 3 steps: what the test suite compiles for TPU slices (`--aot v5e-8`) in seconds.
"""
from l2jax import config as c
from l2jax.model import presets

SIZES = {"7b": ("llama2-7b", 3e-4, c.Mesh(fsdp=-1)), "13b": ("llama2-13b", 3e-4, c.Mesh(fsdp=-1)),
         "34b": ("llama2-34b", 1.5e-4, c.Mesh(fsdp=-1, tensor=8)),
         "70b": ("llama2-70b", 1.5e-4, c.Mesh(fsdp=-1, tensor=8))}
TOKENIZER = "data/llama2-tokenizer/tokenizer.model"


def get_config(arg: str | None = None) -> c.Pretrain:
  size = arg or "tiny"
  if size == "tiny":
    return c.Pretrain(
        name="pretrain-tiny", model=presets.get("tiny"),
        data=c.Data(kind="text", paths=("data/pretrain-text/tinyshakespeare.txt",), split="paragraph",
                    tokenizer=TOKENIZER, eval_every_nth=20),
        optim=c.AdamW(lr=3e-3, warmup_steps=10, decay_to=0.1),
        seq_len=128, global_batch=8, steps=300, log_every=10, eval_every=100, eval_batches=4,
        mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=100, keep=2))
  if size == "test":
    return c.Pretrain(
        name="pretrain-test", model=presets.get("test"),
        data=c.Data(kind="text", paths=("data/pretrain-text/tinyshakespeare.txt",), split="paragraph",
                    tokenizer=TOKENIZER, eval_every_nth=20),
        optim=c.AdamW(lr=3e-3, warmup_steps=1, decay_to=0.1), seq_len=64, global_batch=8, steps=3, log_every=1,
        eval_every=3, eval_batches=1, mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=3, keep=1),
        tensorboard=False)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  preset, lr, mesh = SIZES[size]
  return c.Pretrain(
      name=f"pretrain-{size}", model=presets.get(preset, dtype="bfloat16", remat="full"),
      data=c.Data(kind="tfds", name="", split="train", tokenizer=TOKENIZER, eval_every_nth=1000),
      optim=c.AdamW(lr=lr, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=2000,
                    decay_to=0.1),
      seq_len=4096, global_batch=1024, micro_batch=0, steps=500_000, log_every=10, eval_every=1000,
      mesh=mesh, ckpt=c.Checkpointing(every=1000, keep=3))
