"""Rejection-sampling fine-tuning (Llama 2 section 3.2.3) and safety context distillation (section 4.2.4).

run(cfg, run_dir), two phases in one run directory:
  1. Sampling (l2jax/rl/offline.py: resumable, one shard file per process, merged by process 0).
     best_of_k: K answers per training prompt at temperature T from `sampler`; each scored by both reward models
       and R_c (l2jax.rl.rewards.combine); the best per prompt (l2jax.rl.best_of_n.select_best) is merged into
       the pool of earlier iterations (`pool`, rescored by these RMs with `rescore_pool`): run_dir/samples.jsonl
       (every sample with its scores), run_dir/pool.jsonl (the best answer per prompt over all iterations).
     context_distillation: safety prompts only; one answer with a Table 39 safety preprompt and one without
       (the same seed); the preprompted answer is kept where the safety RM scores it higher than the plain one
       (best_of_n.distill_keep); pool.jsonl holds (the prompt WITHOUT the preprompt, that answer).
  2. Fine-tuning: l2jax.stages.sft.run on pool.jsonl (messages JSONL, answer-only loss) from `init` (default the
     sampler), the SFT checkpoints and resume in run_dir, the model in run_dir/final.
Analysis: held-out prompts answered (one sample at eval_temperature, the same seeds) by the model before (the
sampler, or `init` when only distilling a pool) and after (final/), scored by R_c: heldout_before.jsonl,
heldout_after.jsonl, heldout_reward.png; Figure 7 (figure7.png), Figure 8 (figure8.png) or Figure 16b
(figure16b.png); everything in rejection.json and the line "held-out reward before X -> after Y" in summary.md.
Seeds: sample j of prompt p draws with seed crc32(seed/iteration/tag/key/j), so a resumed or resharded run draws
exactly what an uninterrupted one-device run draws.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from pathlib import Path

import jax
import numpy as np

from l2jax import config as c
from l2jax import sharding as shd
from l2jax.rl import best_of_n as bon
from l2jax.rl import offline

__all__ = ["run", "sft_config", "load_preprompts", "add_preprompt", "Scorer", "sample_records", "distill_records"]


def _log(msg: str) -> None:
  print(f"rejection: {msg}", file=sys.stderr)


def sample_seed(seed: int, iteration: int, tag: str, key: str, j: int) -> int:
  return zlib.crc32(f"{seed}/{iteration}/{tag}/{key}/{j}".encode())


def load_preprompts(path: str | Path) -> list[str]:
  """The generic safety preprompts of a Table 39 JSONL file (records without a risk category)."""
  out = [r["preprompt"] for r in offline.read_jsonl(path) if not r.get("risk_category")]
  if not out:
    raise ValueError(f"{path}: no generic preprompts (records with \"preprompt\" and no \"risk_category\")")
  return out


def add_preprompt(messages, preprompt: str, as_: str = "system") -> list[dict]:
  """The dialog with the safety preprompt before the first user message: as its system prompt (prepended to an
  existing one) or as a prefix of the user message's text (section 4.2.4: "prefixing a safety preprompt")."""
  msgs = [dict(m) for m in messages]
  if as_ == "system":
    if msgs[0]["role"] == "system":
      msgs[0]["content"] = f"{preprompt}\n{msgs[0]['content']}"
      return msgs
    return [{"role": "system", "content": preprompt}] + msgs
  i = next(i for i, m in enumerate(msgs) if m["role"] == "user")
  msgs[i]["content"] = f"{preprompt}\n{msgs[i]['content']}"
  return msgs


class Scorer:
  """Both reward models and R_c: score(dialogs, texts, is_safety) -> (helpful [B], safety [B], combined [B])."""

  def __init__(self, rms: c.RewardModels, batch_size: int):
    from l2jax import reward
    if not rms.helpful or not rms.safety:
      raise ValueError("reward_models.helpful and reward_models.safety must both be set")
    self.helpful, self.safety = reward.load(rms.helpful, batch_size=batch_size), reward.load(rms.safety,
                                                                                            batch_size=batch_size)
    self.threshold = rms.safety_threshold

  def score(self, dialogs, texts, is_safety):
    from l2jax.rl.rewards import combine
    h, s = self.helpful.score(dialogs, texts), self.safety.score(dialogs, texts)
    return h, s, np.asarray(combine(h, s, np.asarray(is_safety, bool), self.threshold))


def _generate(sampler, ids, seeds, cfg: c.Rejection, temperature: float) -> tuple[list[str], list[dict]]:
  out = sampler.generate(ids, max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                         top_k=cfg.top_k, seed=seeds)
  texts = [sampler.decode_new(x, out.tokens[i, :out.lengths[i]]).strip() for i, x in enumerate(ids)]
  info = [{"new_tokens": int(out.lengths[i]), "stop_reason": out.stop_reasons[i]} for i in range(len(ids))]
  return texts, info


def sample_records(sampler, scorer: Scorer, cfg: c.Rejection, ids_by_key: dict, prompts, *, k: int,
                   temperature: float, tag: str, model: str) -> list[dict]:
  """One record per prompt: its K samples with helpful / safety / R_c scores and the index of the best."""
  rows = [(p, j) for p in prompts for j in range(k)]
  seeds = [sample_seed(cfg.seed, cfg.iteration, tag, p.key, j) for p, j in rows]
  texts, info = _generate(sampler, [ids_by_key[p.key] for p, _ in rows], seeds, cfg, temperature)
  h, s, r = scorer.score([_dialog(cfg, p) for p, _ in rows], texts, [p.is_safety for p, _ in rows])
  best = bon.select_best(r.reshape(len(prompts), k))
  out = []
  for i, p in enumerate(prompts):
    samples = [{"text": texts[i * k + j], "helpful": float(h[i * k + j]), "safety": float(s[i * k + j]),
                "reward": float(r[i * k + j]), "seed": seeds[i * k + j], **info[i * k + j]} for j in range(k)]
    out.append({"messages": _dialog(cfg, p), "is_safety": p.is_safety, "source": p.source, "where": p.where,
                "iteration": cfg.iteration, "sampler": model, "temperature": temperature, "samples": samples,
                "chosen": int(best[i])})
  return out


def distill_records(sampler, scorer: Scorer, cfg: c.Rejection, tok, preprompts, prompts, model: str) -> list[dict]:
  """Context distillation: per safety prompt, the plain and the preprompted answer (same seed), both scored on
  the plain prompt, and whether the preprompted one is kept (distill_keep)."""
  from l2jax.data.tokenizer import encode_chat
  plain = [_dialog(cfg, p) for p in prompts]
  pre_text = [preprompts[zlib.crc32(p.key.encode()) % len(preprompts)] for p in prompts]
  pre = [add_preprompt(d, t, cfg.preprompt_as) for d, t in zip(plain, pre_text)]
  seeds = [sample_seed(cfg.seed, cfg.iteration, "distill", p.key, 0) for p in prompts]
  texts, info = _generate(sampler, [encode_chat(tok, d) for d in plain + pre], seeds + seeds, cfg, cfg.temperature)
  h, s, r = scorer.score(plain + plain, texts, [True] * len(texts))
  n = len(prompts)
  keep = bon.distill_keep(s[:n], s[n:])
  side = lambda i: {"text": texts[i], "helpful": float(h[i]), "safety": float(s[i]), **info[i]}
  return [{"messages": plain[i], "is_safety": True, "source": p.source, "where": p.where, "preprompt": pre_text[i],
           "preprompt_as": cfg.preprompt_as, "iteration": cfg.iteration, "sampler": model,
           "temperature": cfg.temperature, "plain": side(i), "preprompted": side(n + i),
           "gain": float(s[n + i] - s[i]), "kept": bool(keep[i])} for i, p in enumerate(prompts)]


def _dialog(cfg: c.Rejection, p) -> list[dict]:
  from l2jax.data.dialogs import with_system
  return with_system(list(p.messages), cfg.prompts.system)


def pool_entry(rec: dict, text: str, helpful: float, safety: float, reward: float) -> dict:
  """A pool.jsonl line: messages JSONL for the SFT reader (prompt + the chosen answer) and where it came from."""
  return {"key": rec["key"], "messages": rec["messages"] + [{"role": "assistant", "content": text}],
          "reward": reward, "helpful": helpful, "safety": safety, "is_safety": rec["is_safety"],
          "source": rec.get("source", ""), "iteration": rec["iteration"], "sampler": rec["sampler"],
          "temperature": rec["temperature"]}


def best_entries(records) -> list[dict]:
  out = []
  for rec in records:
    b = rec["samples"][rec["chosen"]]
    out.append(pool_entry(rec, b["text"], b["helpful"], b["safety"], b["reward"]))
  return out


def rescore(pool: list[dict], scorer: Scorer) -> list[dict]:
  """Previous pool answers scored again by the current reward models (scores of different RMs do not compare)."""
  if not pool:
    return pool
  h, s, r = scorer.score([e["messages"][:-1] for e in pool], [e["messages"][-1]["content"] for e in pool],
                         [e["is_safety"] for e in pool])
  return [{**e, "helpful": float(h[i]), "safety": float(s[i]), "reward": float(r[i]), "rescored": True}
          for i, e in enumerate(pool)]


def sft_config(cfg: c.Rejection, init: str, pool_path: Path) -> c.SFT:
  """Phase 2 as an SFT run: the pool as messages JSONL, answer-only loss, this config's optimiser and sizes."""
  return c.SFT(name=cfg.name, model=cfg.model, init=init,
               data=c.Dialogs(kind="messages", paths=(str(pool_path),)), optim=cfg.optim, seq_len=cfg.seq_len,
               global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, epochs=cfg.epochs, steps=cfg.steps,
               seed=cfg.seed, mesh=cfg.mesh, ckpt=cfg.ckpt, log_every=cfg.log_every, eval_every=0,
               sample_prompts=0, tensorboard=cfg.tensorboard)


def _heldout(sampler, scorer, cfg, ids_by_key, prompts, run_dir, name, model) -> np.ndarray:
  work = lambda ps: sample_records(sampler, scorer, cfg, ids_by_key, ps, k=1, temperature=cfg.eval_temperature,
                                   tag="heldout", model=model)
  recs = _offline(prompts, work, run_dir, name, cfg)
  return np.array([r["samples"][0]["reward"] for r in recs], np.float64)


def _offline(items, work, run_dir, name, cfg):
  return offline.run(items, key=lambda p: p.key, work=work, out_dir=run_dir, name=name, chunk=cfg.batch_prompts,
                     process_index=jax.process_index(), process_count=jax.process_count(), log=_log)


def _sampler(ckpt: str, cfg: c.Rejection):
  """A sampler on this process's devices (each process samples its own share of the prompts)."""
  from l2jax.sample import load_sampler
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=jax.local_devices())
  return load_sampler(ckpt, dtype=cfg.sample_dtype or None, mesh=mesh)


def _prompts(cfg: c.Rejection, tok):
  from l2jax.data import prompts as pr
  errors: list[str] = []
  allp = pr.read_prompts(cfg.prompts.sources, skip_bad=cfg.prompts.skip_bad, errors=errors)
  train, held = pr.split_heldout(allp, cfg.prompts.heldout_fraction)
  if cfg.mode == "context_distillation":
    train = [p for p in train if p.is_safety]
  ids, train, st_train = pr.encode_prompts(tok, train, cfg.prompts.max_prompt_tokens, cfg.prompts.system)
  if cfg.max_prompts:  # a deterministic mix of the sources: the first N in the order of crc32(key)
    order = sorted(range(len(train)), key=lambda i: zlib.crc32(train[i].key.encode()))[:cfg.max_prompts]
    train, ids = [train[i] for i in order], [ids[i] for i in order]
  ids_h, held, st_held = pr.encode_prompts(tok, held, cfg.prompts.max_prompt_tokens, cfg.prompts.system)
  held = held[:cfg.prompts.eval_prompts] if cfg.prompts.eval_prompts else held
  ids_by_key = {p.key: x for p, x in zip(train, ids)} | {p.key: x for p, x in zip(held, ids_h)}
  if not train and cfg.sampler:
    raise ValueError(f"no training prompts left from {list(cfg.prompts.sources)} ({st_train})")
  return train, held, ids_by_key, {"train": st_train, "heldout": st_held, "bad_records": errors[:10]}


def run(cfg: c.Rejection, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if not cfg.sampler and not cfg.pool:
    raise ValueError("set `sampler` (a checkpoint to sample from) or `pool` (a pool.jsonl to fine-tune on)")
  if cfg.mode == "context_distillation" and (cfg.pool or not cfg.sampler):
    raise ValueError("mode=context_distillation samples its own answers: set `sampler` and leave `pool` empty")
  init = cfg.init or cfg.sampler
  before_model = cfg.sampler or init
  pool_path = run_dir / "pool.jsonl"
  if check_sharding:
    from l2jax.stages import sft
    if not pool_path.exists():
      raise ValueError(f"--check-sharding checks the fine-tuning phase: {pool_path} must exist (run once first)")
    return sft.run(sft_config(cfg, init, pool_path), run_dir, check_sharding=True)
  scorer = Scorer(cfg.reward_models, cfg.score_batch)
  sampler = _sampler(before_model, cfg)
  train, held, ids_by_key, stats = _prompts(cfg, sampler.tokenizer)
  _log(f"{len(train)} training prompts, {len(held)} held-out prompts; mode {cfg.mode}, iteration {cfg.iteration}")
  report: dict = {"mode": cfg.mode, "iteration": cfg.iteration, "sampler": cfg.sampler, "init": init,
                  "temperature": cfg.temperature, "samples_per_prompt": cfg.samples_per_prompt, "prompts": stats}
  previous = offline.read_jsonl(cfg.pool) if cfg.pool else []
  if cfg.pool and not Path(cfg.pool).is_file():
    raise FileNotFoundError(f"pool={cfg.pool}: no such pool file (a previous run's run_dir/pool.jsonl)")
  if cfg.mode == "context_distillation":
    preprompts = load_preprompts(cfg.preprompts)
    recs = _offline(train, lambda ps: distill_records(sampler, scorer, cfg, sampler.tokenizer, preprompts, ps,
                                                      cfg.sampler), run_dir, "samples", cfg)
    pool = [pool_entry(r, r["preprompted"]["text"], r["preprompted"]["helpful"], r["preprompted"]["safety"],
                       r["preprompted"]["safety"]) for r in recs if r["kept"]]
    plain = np.array([r["plain"]["safety"] for r in recs])
    gain = np.array([r["gain"] for r in recs])
    keep = np.array([r["kept"] for r in recs], bool)
    report["figure16b"] = {"kept_fraction": float(keep.mean()) if len(keep) else 0.0, "kept": int(keep.sum()),
                           "prompts": len(recs), "mean_gain": float(gain.mean()) if len(gain) else 0.0}
    if jax.process_index() == 0:
      bon.plot_figure16b(plain, gain, keep, run_dir / "figure16b.png")
  elif cfg.sampler:
    k = cfg.samples_per_prompt
    work = lambda t: (lambda ps: sample_records(sampler, scorer, cfg, ids_by_key, ps, k=k, temperature=t,
                                                tag="samples", model=cfg.sampler))
    recs = _offline(train, work(cfg.temperature), run_dir, "samples", cfg)
    if cfg.rescore_pool:
      previous = rescore(previous, scorer)
    pool, counts = bon.merge_pool(previous, best_entries(recs))
    report["pool_merge"] = counts
    rewards = np.array([[s["reward"] for s in r["samples"]] for r in recs])
    report["figure7"] = bon.best_of_n_curves(rewards)
    per_t = {}
    for t in cfg.temperatures:
      sub = _offline(train[:cfg.fig8_prompts], work(t), run_dir, f"figure8_T{t:g}", cfg)
      per_t[f"{t:g}"] = bon.best_of_n_curves(np.array([[s["reward"] for s in r["samples"]] for r in sub]))
    report["figure8"] = per_t
    if jax.process_index() == 0:
      bon.plot_figure7(report["figure7"], run_dir / "figure7.png",
                       f"max / median reward among N ({len(recs)} prompts, T={cfg.temperature:g})")
      if per_t:
        bon.plot_figure8(per_t, run_dir / "figure8.png")
  else:
    pool = previous
  report["pool_size"] = len(pool)
  if not pool:
    raise ValueError("the pool is empty: nothing to fine-tune on (no kept answers)")
  if jax.process_index() == 0:
    offline.write_jsonl_atomic(pool_path, pool)
  before = _heldout(sampler, scorer, cfg, ids_by_key, held, run_dir, "heldout_before", before_model) if held else None
  del sampler
  offline._barrier("l2jax-rejection-pool", jax.process_count())

  from l2jax.stages import sft
  result = sft.run(sft_config(cfg, init, pool_path), run_dir)
  if getattr(result, "status", "done") != "done":
    return result
  if held:
    after = _heldout(_sampler(str(run_dir / "final"), cfg), scorer, cfg, ids_by_key, held, run_dir, "heldout_after",
                     str(run_dir / "final"))
    report["heldout"] = {"prompts": len(held), "temperature": cfg.eval_temperature,
                         "before": {"mean": float(before.mean()), "std": float(before.std())},
                         "after": {"mean": float(after.mean()), "std": float(after.std())}}
    line = f"held-out reward before {before.mean():.4f} -> after {after.mean():.4f} ({len(held)} prompts, R_c logit)"
    report["summary"] = line
    _log(line)
    if jax.process_index() == 0:
      bon.plot_histograms(before, after, run_dir / "heldout_reward.png")
  if jax.process_index() == 0:
    (run_dir / "rejection.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {cfg.name}: {cfg.mode}, iteration {cfg.iteration}", "", f"- pool: {len(pool)} prompts"]
    if "figure7" in report:
      f7 = report["figure7"]
      lines.append(f"- Figure 7: max of N=1 {f7['max'][0]:.4f}, N={f7['n'][-1]} {f7['max'][-1]:.4f}; "
                   f"median of N={f7['n'][-1]} {f7['median'][-1]:.4f}")
    if "figure16b" in report:
      lines.append(f"- context distillation kept {report['figure16b']['kept_fraction']:.1%} of "
                   f"{report['figure16b']['prompts']} safety prompts")
    if "summary" in report:
      lines.append(f"- {report['summary']}")
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
  return result
