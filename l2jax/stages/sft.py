"""Supervised fine-tuning (Llama 2 section 3.1): next-token loss on assistant answers only, dialogs packed whole.

run(cfg, run_dir): reads and validates the dialogs (l2jax/data/dialogs.py), holds out every n-th one, tokenizes
them with the Llama 2 chat format and the answer-only mask, derives the number of steps from the epochs and the
packed size, writes run_dir/data_stats.json, then trains with the shared LM loop (`run_lm`): held-out answer-only
loss every `eval_every` steps and at the end, greedy answers to held-out prompts in run_dir/samples.jsonl at the
end, and the final l2jax model directory in run_dir/final.

Steps: the training dialogs of every epoch are packed into rows of `seq_len` (whole dialogs, first-fit, rows
never mix epochs); steps = ceil(rows of all `epochs` epochs / global_batch). `steps > 0` overrides it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.data import dialogs as dl
from l2jax.data import dialog_packing as dp
from l2jax.stages.common import (Subset, lm_loss_fn, make_eval_hook, micro_batches, model_setup, run_lm,
                                 sharding_report, split_documents)

__all__ = ["run", "open_data", "prepare"]


def open_data(d: c.Dialogs):
  """(train records, held-out records or None) for a Dialogs config."""
  src = dl.open_dialogs(d.kind, d.paths, name=d.name, split=d.split, data_dir=d.data_dir, field=d.field)
  if d.max_dialogs > 0:
    src = Subset(src, np.arange(min(d.max_dialogs, len(src))))
  return split_documents(src, d.eval_every_nth)


@dataclasses.dataclass
class Prepared:
  train: dl.Encoded
  eval: dl.Encoded | None
  eval_records: object | None
  epochs: int          # epochs planned (more than cfg.epochs only when cfg.steps asks for more)
  steps: int
  stats: dict


def prepare(cfg: c.SFT, tokenizer) -> Prepared:
  """Read, validate and tokenize the dialogs; derive the steps; collect the data report."""
  d = cfg.data
  train_src, eval_src = open_data(d)
  kw = dict(seq_len=cfg.seq_len, system=d.system, skip_bad=d.skip_bad)
  enc = dl.encode_dialogs(train_src, tokenizer, **kw)
  ev = dl.encode_dialogs(eval_src, tokenizer, **kw) if eval_src is not None else None
  if len(enc) == 0:
    s = enc.stats
    raise dl.DataError(f"no usable training dialogs in {d.kind} data {list(d.paths) or d.name}: {s['records']} "
                       f"records, {s['skipped_bad']} bad, {s['no_answer']} without an answer, "
                       f"{s['dropped_too_long']} longer than seq_len={cfg.seq_len}")
  epochs, steps = dp.epochs_for_steps(enc, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                                      epochs=cfg.epochs, steps=cfg.steps)
  plan = dp.pack_plan(enc.slots, cfg.seq_len, seed=cfg.seed, epochs=epochs)
  rows_used = min(plan.num_rows, steps * cfg.global_batch)
  stats = {"train": enc.stats, "eval": ev.stats if ev is not None else None,
           "seq_len": cfg.seq_len, "global_batch": cfg.global_batch, "epochs": cfg.epochs, "epochs_planned": epochs,
           "rows_per_epoch": [int(np.sum(plan.row_epoch == e)) for e in range(epochs)],
           "steps": steps, "steps_per_epoch": plan.batches_per_epoch(cfg.global_batch),
           "fill": float(enc.slots.sum() * epochs / max(plan.num_rows * cfg.seq_len, 1)),
           "rows_trained": int(rows_used)}
  return Prepared(enc, ev, eval_src, epochs, steps, stats)


def summary(stats: dict) -> str:
  t = stats["train"]
  ev = stats["eval"]
  bad = f", {t['skipped_bad']} bad records skipped {t['skipped']}" if t["skipped_bad"] else ""
  return (f"sft data: {t['records']} records -> {t['dialogs']} training dialogs "
          f"({t['dropped_too_long']} longer than seq_len={stats['seq_len']} dropped, {t['truncated']} truncated "
          f"by {t['exchanges_dropped']} oldest exchanges, {t['no_answer']} without an answer{bad}); "
          f"{ev['dialogs'] if ev else 0} held out; {t['answer_tokens']} answer tokens of {t['tokens']}; "
          f"{stats['epochs']} epochs -> {stats['steps']} steps of {stats['global_batch']} rows x "
          f"{stats['seq_len']} (fill {stats['fill']:.0%})")


def make_sample_hook(cfg: c.SFT, setup, records, run_dir: Path, steps: int) -> train.Hook | None:
  """Hook at the last step: greedy answers to the first `sample_prompts` held-out prompts -> samples.jsonl."""
  if cfg.sample_prompts <= 0 or records is None:
    return None
  tok, max_len = setup.tokenizer, setup.model_cfg.max_seq_len
  prompts = []  # (history, prompt ids, reference answer)
  for i in range(len(records)):
    if len(prompts) == cfg.sample_prompts:
      break
    try:
      msgs = records[i]
    except dl.RecordError:
      continue
    if not any(m["role"] == "assistant" for m in msgs):
      continue
    history, ids, ref = dl.prompt_for_sampling(tok, msgs, cfg.data.system)
    if len(ids) <= max_len - 16:  # room to answer
      prompts.append((history, ids, ref))
  if not prompts:
    print(f"sft: no held-out prompt fits the context of {max_len} tokens; no samples will be written",
          file=sys.stderr)
    return None

  def hook(step, state):
    from l2jax.sample import Sampler
    sampler = Sampler((setup.graphdef, state["params"], setup.model_cfg), tok, mesh=setup.mesh)
    out = sampler.generate([p[1] for p in prompts], max_new_tokens=cfg.sample_max_new_tokens, temperature=0.0)
    if jax.process_index() == 0:
      with open(run_dir / "samples.jsonl", "w") as f:
        for j, (history, ids, ref) in enumerate(prompts):
          new = out.tokens[j, :out.lengths[j]]
          f.write(json.dumps({"step": step, "messages": history, "answer": sampler.decode_new(ids, new),
                              "reference": ref, "stop_reason": out.stop_reasons[j], "prompt_tokens": len(ids),
                              "new_tokens": int(out.lengths[j])}) + "\n")
    return {"samples_written": len(prompts)}

  return train.Hook(steps, hook, at_end=True)


def run(cfg: c.SFT, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  setup = model_setup(cfg.model, cfg.init, mesh, cfg.data.tokenizer, cfg.seed)
  if cfg.seq_len > setup.model_cfg.max_seq_len:
    raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={setup.model_cfg.max_seq_len}")
  tok = setup.tokenizer
  prep = prepare(cfg, tok)
  print(summary(prep.stats), file=sys.stderr)
  if jax.process_index() == 0:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "data_stats.json").write_text(json.dumps(prep.stats, indent=2) + "\n")
  cfg_run = dataclasses.replace(cfg, steps=prep.steps)
  n_proc = jax.process_count()

  def batches(enc, *, shuffle=True, epochs=prep.epochs, num_batches=prep.steps):
    return dp.make_sft_iterator(enc, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                                epochs=epochs, shuffle=shuffle, num_batches=num_batches,
                                process_index=jax.process_index(), process_count=n_proc, pad_id=tok.pad_id)[0]

  loss_fn = lm_loss_fn(setup.graphdef)   # masked NLL: loss_mask is the answer mask, so answers only
  if check_sharding:
    return sharding_report(cfg_run, setup, loss_fn, batches(prep.train))
  eval_hook = None
  if prep.eval is not None and len(prep.eval) and cfg.eval_every > 0:
    eval_hook = make_eval_hook(loss_fn, setup, lambda: batches(prep.eval, shuffle=False, epochs=1, num_batches=None),
                               cfg.eval_batches, cfg.eval_every, micro_batches(cfg))
  sample_hook = make_sample_hook(cfg, setup, prep.eval_records, Path(run_dir), prep.steps)
  return run_lm(cfg_run, Path(run_dir), setup, loss_fn, batches(prep.train), eval_hook,
                hooks=(sample_hook,) if sample_hook else ())
