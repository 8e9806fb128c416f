r"""Ghost Attention: multi-turn instruction following (Llama 2, section 3.3), then Table 30 / Figure 10.

  python -m l2jax.launch experiments/gatt.py:tiny    # CPU, a few minutes (runs sft.py:tiny first if missing)
  python -m l2jax.launch experiments/gatt.py:7b --set init=runs/rlhf-7b/final

Samples dialogs whose user turns come from the shipped OpenAssistant trees, with the instruction appended to
every user turn, keeps those whose answers all pass the checker, fine-tunes `init` on them with the instruction
in the first turn only and the loss on the last answer only (the SFT loss and loop), and evaluates consistency
over 20 held-out turns against `init`. Writes run_dir/{samples.jsonl, gatt_stats.json, examples.jsonl,
metrics.jsonl, final/, consistency.{json,md,png}, attention.{json,png}}.

`tiny` starts from experiments/sft.py:tiny with the rule-checkable kinds (start word, capitals, end sign), one
per instruction; the tiny sampler cannot follow an instruction, so those kinds are enforced on its answers
(`repair=true`, docs/gatt.md), nor does it stop by EOS within 24 tokens four turns in a row, so `tiny` and `test`
keep cut-off answers (`keep_truncated=true`; counted in gatt_stats.json); empty answers are always rejected. `test`
is the same at the smallest size for CI. `7b`..`70b` use the paper's
constraints (hobby, language, public figure; only language has an automatic checker) and the SFT settings,
sampling with `init` (the paper samples with its latest RLHF model: pass it as init or sampler).
"""
from l2jax import config as c
from l2jax.model import presets

SIZES = {"7b": ("llama2-7b", c.Mesh(fsdp=-1)), "13b": ("llama2-13b", c.Mesh(fsdp=-1)),
         "34b": ("llama2-34b", c.Mesh(fsdp=-1, tensor=8)), "70b": ("llama2-70b", c.Mesh(fsdp=-1, tensor=8))}
TOKENIZER = "data/llama2-tokenizer/tokenizer.model"
OASST = ("data/oasst/en_100_tree.jsonl",)
RULES = c.Constraints(kinds=("start_word", "capitals", "end_sign"), max_per_instruction=1, short_prob=0.5)
PAPER_OPTIM = c.AdamW(lr=2e-5, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip=1.0, warmup_steps=0,
                      decay_to=0.0, schedule="cosine")


def get_config(arg: str | None = None) -> c.GAtt:
  size = arg or "tiny"
  if size == "tiny":
    return c.GAtt(
        name="gatt-tiny", sampler="", init="experiments/sft.py:tiny", model=presets.get("tiny"),
        data=c.Dialogs(kind="oasst", paths=OASST, tokenizer=TOKENIZER, eval_every_nth=10),
        constraints=RULES, turns=4, max_user_words=8, instructions_per_dialog=4, repair=True, all_prefixes=True,
        keep_truncated=True,
        temperature=0.7, top_p=0.9, max_new_tokens=24, batch_dialogs=32,
        eval=c.ConsistencyEval(dialogs=30, turns=20, max_new_tokens=32, temperature=0.0, seed=1, attention_bins=20),
        optim=c.AdamW(lr=1e-3, warmup_steps=5, decay_to=0.1, weight_decay=0.1, clip=1.0),
        seq_len=256, global_batch=16, epochs=3, log_every=10, mesh=c.Mesh(fsdp=-1),
        ckpt=c.Checkpointing(every=50, keep=2))
  if size == "test":
    return c.GAtt(
        name="gatt-test", sampler="", init="experiments/sft.py:test", model=presets.get("tiny"),
        data=c.Dialogs(kind="oasst", paths=OASST, tokenizer=TOKENIZER, max_dialogs=12, eval_every_nth=4),
        constraints=RULES, turns=2, max_user_words=6, instructions_per_dialog=1, repair=True, all_prefixes=True,
        keep_truncated=True,
        temperature=0.7, top_p=0.9, max_new_tokens=6, batch_dialogs=8,
        eval=c.ConsistencyEval(dialogs=2, turns=3, max_new_tokens=6, temperature=0.0, seed=1, attention_bins=4),
        optim=c.AdamW(lr=1e-3, warmup_steps=0, decay_to=0.1), seq_len=128, global_batch=4, epochs=1, steps=2,
        log_every=1, mesh=c.Mesh(fsdp=-1), ckpt=c.Checkpointing(every=2, keep=1), tensorboard=False)
  if size not in SIZES:
    raise ValueError(f"unknown variant {size!r}; choose tiny, test, {', '.join(SIZES)}")
  preset, mesh = SIZES[size]
  return c.GAtt(
      name=f"gatt-{size}", sampler="", init=f"runs/sft-{size}/final",
      model=presets.get(preset, dtype="bfloat16", remat="full"),
      data=c.Dialogs(kind="oasst", paths=OASST, tokenizer=TOKENIZER, eval_every_nth=10),
      constraints=c.Constraints(kinds=("hobby", "language", "figure"), max_per_instruction=3, short_prob=0.5),
      turns=6, instructions_per_dialog=4, repair=False, all_prefixes=False, temperature=0.7, top_p=0.9,
      max_new_tokens=256, sample_dtype="bfloat16", batch_dialogs=64,
      eval=c.ConsistencyEval(dialogs=50, turns=20, max_new_tokens=128, temperature=0.0, seed=1),
      optim=PAPER_OPTIM, seq_len=4096, global_batch=64, epochs=2, log_every=10, mesh=mesh,
      ckpt=c.Checkpointing(every=200, keep=3))
