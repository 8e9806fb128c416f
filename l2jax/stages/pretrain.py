"""Pretraining (Llama 2 section 2.2): next-token prediction on packed documents with AdamW + cosine schedule.

run(cfg, run_dir): builds the mesh, the model (random or from `cfg.init`), the data pipeline, the step,
resumes from the newest checkpoint in run_dir, trains, evaluates held-out loss / perplexity, and writes the
final l2jax model directory to run_dir/final.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from l2jax import config as c
from l2jax import sharding as shd
from l2jax.stages.common import (lm_loss_fn, make_eval_hook, micro_batches, model_setup, run_lm, sharding_report,
                                 split_documents)

__all__ = ["run", "lm_loss_fn"]


def batch_iterator(data: c.Data, source, tokenizer, *, seq_len: int, global_batch: int, seed: int,
                   shuffle: bool = True, num_epochs: int | None = None):
  """This process's share of each global batch of packed rows."""
  from l2jax.data.pretrain import make_pretrain_iterator
  n_proc = jax.process_count()
  if global_batch % n_proc:
    raise ValueError(f"global_batch={global_batch} is not divisible by {n_proc} processes")
  return make_pretrain_iterator(source, tokenizer, seq_len=seq_len, batch_size=global_batch // n_proc, seed=seed,
                                shuffle=shuffle, num_epochs=num_epochs, process_index=jax.process_index(),
                                process_count=n_proc, worker_count=data.worker_count)


def open_source(data: c.Data):
  """The whole document source of a Data config (before the held-out split)."""
  from l2jax.data.sources import open_source as open_
  spec = dict(kind=data.kind, paths=data.paths, field=data.field, name=data.name or None,
              split=data.split if data.kind != "tfds" or data.split != "paragraph" else "train",
              data_dir=data.data_dir or None, skip_bad=data.skip_bad)
  return open_(spec)


def open_data(data: c.Data):
  """(train source, held-out source or None) for a Data config."""
  return split_documents(open_source(data), data.eval_every_nth)


def data_stats(source, data: c.Data) -> dict:
  """Documents and bad records skipped (data.skip_bad) of a source, for run_dir/data_stats.json."""
  skipped = dict(getattr(source, "skipped", {}) or {})
  return {"kind": data.kind, "paths": list(data.paths), "documents": len(source), "skip_bad": data.skip_bad,
          "skipped_bad": int(sum(skipped.values())), "skipped": skipped,
          "skipped_examples": list(getattr(source, "skipped_examples", []) or [])}


def run(cfg: c.Pretrain, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  if cfg.seq_len > cfg.model.max_seq_len:
    raise ValueError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
  setup = model_setup(cfg.model, cfg.init, mesh, cfg.data.tokenizer, cfg.seed)
  source = open_source(cfg.data)
  stats = data_stats(source, cfg.data)
  train_src, eval_src = split_documents(source, cfg.data.eval_every_nth)
  loss_fn = lm_loss_fn(setup.graphdef)

  def batches(src, shuffle=True, epochs=None, seed=cfg.seed):
    return batch_iterator(cfg.data, src, setup.tokenizer, seq_len=cfg.seq_len, global_batch=cfg.global_batch,
                          seed=seed, shuffle=shuffle, num_epochs=epochs)

  if check_sharding:
    return sharding_report(cfg, setup, loss_fn, batches(train_src))
  eval_hook = None
  if eval_src is not None and cfg.eval_every > 0:
    eval_hook = make_eval_hook(loss_fn, setup, lambda: batches(eval_src, shuffle=False, epochs=1), cfg.eval_batches,
                               cfg.eval_every, micro_batches(cfg))
  result = run_lm(cfg, run_dir, setup, loss_fn, batches(train_src), eval_hook)
  if jax.process_index() == 0:
    (Path(run_dir) / "data_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    eg = f", e.g. {stats['skipped_examples'][0]}" if stats["skipped_examples"] else ""
    print(f"pretrain data: {stats['documents']} documents; {stats['skipped_bad']} bad records skipped{eg} "
          f"(written to {Path(run_dir) / 'data_stats.json'})", file=sys.stderr)
  return result


