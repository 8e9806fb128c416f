"""Ghost Attention (Llama 2 section 3.3): sample offline, reject, fine-tune with the SFT loss, evaluate.

run(cfg, run_dir), each phase resumable:
  1. plan: for every training dialog (and each of `instructions_per_dialog`), an instruction (l2jax.data.gatt)
     and `turns` user messages, all from the seed;
  2. sample (l2jax.rl.offline, chunks of `batch_dialogs` dialogs, run_dir/samples.jsonl): the sampler answers
     the turns one after another with the instruction concatenated to every user message, the live dialogs
     batched at every turn; with `repair` the rule kinds are enforced on each answer before it enters the
     history; a dialog stops at its first failing answer, or one sampled empty or cut off by max_new_tokens;
  3. reject and build (run_dir/examples.jsonl, gatt_stats.json): keep the dialogs whose answers all pass the
     checker and none was sampled empty or (unless keep_truncated) cut off (counted: answers_empty,
     answers_truncated, stops); each becomes a dialog with the instruction in the first turn only and
     `"train": false` on every answer but the last (loss only on the last answer and its EOS);
  4. fine-tune `init` on examples.jsonl with THE SFT stage (l2jax.stages.sft.run) in the same run directory;
  5. evaluate run_dir/final against the baseline (`eval.baseline`, default `init`) on held-out dialogs of
     `eval.turns` turns: consistency.{json,md,png}, attention.{json,png} (l2jax.eval.consistency).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from l2jax import config as c
from l2jax.data import dialogs as dl
from l2jax.data import gatt as gd
from l2jax.stages.common import Subset, split_documents

__all__ = ["run", "plan", "sft_config", "held_out_users", "sample_stats"]


def _sources(cfg: c.GAtt):
  d = cfg.data
  src = dl.open_dialogs(d.kind, d.paths, name=d.name, split=d.split, data_dir=d.data_dir, field=d.field)
  if d.max_dialogs > 0:
    src = Subset(src, np.arange(min(d.max_dialogs, len(src))))
  return split_documents(src, d.eval_every_nth)


def held_out_users(cfg: c.GAtt) -> list[list[str]]:
  held = _sources(cfg)[1]
  if held is None:
    raise ValueError("GAtt evaluation needs held-out dialogs: set data.eval_every_nth > 0")
  return gd.user_turns(held, cfg.data.skip_bad)


def plan(cfg: c.GAtt, lists: gd.Lists) -> list[dict]:
  """The sampling items: {"key", "index", "instruction", "users"}, deterministic in cfg.seed."""
  users = gd.user_turns(_sources(cfg)[0], cfg.data.skip_bad)
  if not users:
    raise ValueError(f"no training dialogs with a user message in {cfg.data.kind} data {list(cfg.data.paths)}")
  pool = [u for us in users for u in us]
  k = cfg.constraints
  items = []
  for i, own in enumerate(users):
    for r in range(cfg.instructions_per_dialog):
      rng = np.random.default_rng([cfg.seed, i, r])
      inst = gd.sample_instruction(rng, lists, k.kinds, k.max_per_instruction, k.short_prob)
      items.append({"key": f"{i}-{r}", "index": i * cfg.instructions_per_dialog + r, "instruction": inst.to_json(),
                    "users": gd.dialog_users(own, pool, cfg.turns, rng, cfg.max_user_words)})
  return items


def sft_config(cfg: c.GAtt, examples: Path) -> c.SFT:
  """The SFT run that fine-tunes `init` on the GAtt examples (answer mask from their "train" keys)."""
  return c.SFT(name=cfg.name, model=cfg.model, init=cfg.init,
               data=c.Dialogs(kind="messages", paths=(str(examples),), tokenizer=cfg.data.tokenizer),
               optim=cfg.optim, seq_len=cfg.seq_len, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
               epochs=cfg.epochs, steps=cfg.steps, seed=cfg.seed, mesh=cfg.mesh, ckpt=cfg.ckpt,
               log_every=cfg.log_every, eval_every=0, sample_prompts=0, tensorboard=cfg.tensorboard)


def _sample_and_build(cfg: c.GAtt, run_dir: Path, lists: gd.Lists, examples: Path) -> dict:
  from l2jax import sharding as shd
  from l2jax.rl import offline
  from l2jax.sample import load_sampler
  items = plan(cfg, lists)
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) if jax.device_count() > 1 else None
  sampler = load_sampler(cfg.sampler or cfg.init, dtype=cfg.sample_dtype or None, mesh=mesh)

  def work(batch: list[dict]) -> list[dict]:
    outs = gd.converse(sampler, [gd.Instruction.from_json(x["instruction"]) for x in batch],
                       [x["users"] for x in batch], mode="appended", repair=cfg.repair, lists=lists,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                       seed=cfg.seed, ids=[x["index"] for x in batch], stop_on_fail=True,
                       keep_truncated=cfg.keep_truncated)
    return [{"instruction": x["instruction"], "users": x["users"], **o,
             "repaired": [a != s for a, s in zip(o["answers"], o["sampled"])]} for x, o in zip(batch, outs)]

  records = offline.run(items, key=lambda x: x["key"], work=work, out_dir=run_dir, name="samples",
                        chunk=cfg.batch_dialogs, process_index=jax.process_index(),
                        process_count=jax.process_count(), log=lambda m: print(f"gatt: {m}", file=sys.stderr))
  del sampler
  kept, dropped = gd.rejection_filter(records, lists, cfg.keep_truncated)
  exs, unreadable = gd.build_examples(kept, cfg.constraints.placement, cfg.all_prefixes)
  stats = sample_stats(records, kept, dropped, cfg)
  stats.update(examples=len(exs), examples_dropped_unreadable=unreadable)
  print(f"gatt: {len(records)} dialogs sampled, {len(kept)} kept, {len(dropped)} rejected "
        f"(failed checks by kind: {stats['failed_checks_by_kind']}; answers sampled empty "
        f"{stats['answers_empty']}, cut off {stats['answers_truncated']}); {len(exs)} examples; "
        f"{stats['answers_repaired']} of {stats['answers']} answers repaired", file=sys.stderr)
  if not exs:
    raise ValueError(f"GAtt: every one of the {len(records)} sampled dialogs was rejected (stops {stats['stops']}, "
                     f"failed checks {stats['failed_checks_by_kind']}); use a stronger sampler, repair=true for the "
                     "rule kinds, more max_new_tokens, or fewer turns")
  if jax.process_index() == 0:
    (run_dir / "gatt_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    offline.write_jsonl_atomic(examples, [{"messages": m} for m in exs])
  return stats


def sample_stats(records: list[dict], kept: list[dict], dropped: list[dict], cfg: c.GAtt) -> dict:
  """gatt_stats.json, from the merged records alone (so a resumed run reports what an uninterrupted one does)."""
  failed_kinds: dict = {}
  for r in dropped:
    for chk in r["checks"]:
      for kind, ok in chk.items():
        failed_kinds[kind] = failed_kinds.get(kind, 0) + int(not ok)
  empty = sum(not a.strip() for r in records for a in r.get("sampled", r["answers"]))
  cut = sum(x != "eos" for r in records for x in r.get("stop_reasons", []))
  return {"dialogs_sampled": len(records), "dialogs_kept": len(kept), "dialogs_rejected": len(dropped),
          "answers": sum(len(r["answers"]) for r in records),
          "answers_repaired": int(sum(sum(r["repaired"]) for r in records)),
          "answers_empty": empty, "answers_truncated": cut,
          "failed_checks_by_kind": failed_kinds,
          "stops": {s: sum(r["stop"] == s for r in records) for s in ("done", "failed", "empty", "truncated",
                                                                       "context")},
          "shortened_instructions": int(sum(r["instruction"]["short"] for r in records)),
          "checkers": {k: gd.CHECKERS[k] for k in cfg.constraints.kinds}, "repair": cfg.repair,
          "keep_truncated": cfg.keep_truncated}


def run(cfg: c.GAtt, run_dir: Path, check_sharding: bool = False):
  from l2jax import sharding as shd
  from l2jax.stages import sft
  if not cfg.init:
    raise ValueError("init: GAtt fine-tunes a chat model; give a checkpoint directory or an experiment reference")
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  examples = run_dir / "examples.jsonl"
  if check_sharding:
    if not examples.exists():
      raise ValueError(f"--check-sharding needs {examples}: run the stage once first (it checks the SFT step)")
    return sft.run(sft_config(cfg, examples), run_dir, check_sharding=True)
  lists = gd.load_lists(cfg.constraints.lists_dir)
  if not examples.exists():
    _sample_and_build(cfg, run_dir, lists, examples)
  result = sft.run(sft_config(cfg, examples), run_dir)
  if getattr(result, "status", "done") != "done" or cfg.eval.dialogs == 0:
    return result
  if jax.process_index() == 0 and not (run_dir / "consistency.json").exists():
    from l2jax.eval import consistency
    e, k = cfg.eval, cfg.constraints
    summary = consistency.run_eval(
        {"GAtt": run_dir / "final", "baseline": e.baseline or cfg.init}, held_out_users(cfg), out_dir=run_dir,
        n=e.dialogs, turns=e.turns, kinds=k.kinds, lists=lists, placement=k.placement,
        max_per_instruction=k.max_per_instruction, short_prob=k.short_prob, max_user_words=cfg.max_user_words,
        max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=e.seed, bins=e.attention_bins,
        meta={"run_dir": str(run_dir), "config": dataclasses.asdict(e)})
    print((run_dir / "consistency.md").read_text(), file=sys.stderr, end="")
    del summary
  return result
