"""Rejection-sampling fine-tuning (Llama 2 section 3.2.3) and safety context distillation (section 4.2.4).

run(cfg, run_dir), two phases in one run directory:
  1. Sampling (l2jax/rl/offline.py: resumable, one shard file per process, merged by process 0).
     best_of_k: K answers per training prompt at temperature T (`temperature`, or Figure 8's best of the run
       `temperature_from`) from `sampler`; each scored by both reward models and R_c (l2jax.rl.rewards.combine),
       a cut-off answer as cut off (no EOS); the best usable one per prompt (l2jax.rl.best_of_n: never empty, not
       cut off unless keep_truncated; a prompt with none gets no entry) is merged into the pool of earlier
       iterations (`pool`, rescored with `rescore_pool`): run_dir/samples.jsonl, run_dir/pool.jsonl.
     context_distillation: safety prompts only; one answer with a Table 39 safety preprompt (the answer template
       of the prompt's risk category where it has one, else a generic one) and one without (the same seed); the
       preprompted answer is kept where the safety RM scores it higher (best_of_n.distill_keep) and it is
       usable; pool.jsonl holds (the prompt WITHOUT the preprompt, that answer).
  2. Fine-tuning: l2jax.stages.sft.run on pool.jsonl (messages JSONL, answer-only loss) from `init` (default the
     sampler), the SFT checkpoints and resume in run_dir, the model in run_dir/final.
Analysis: held-out prompts answered (one sample at eval_temperature, the same seeds) by the model before and
after (final/), scored by R_c: heldout_{before,after}.jsonl, heldout_reward.png; Figure 7, Figure 8 (and the best
temperature) or Figure 16b; sample counts (empty, cut off, prompts without a usable sample) in rejection.json
and summary.md. Every statistic is computed from the merged records, so a resumed run reports what an
uninterrupted one reports.
Seeds: sample j of prompt p draws with seed crc32(seed/iteration/tag/key/j) (row_seeds), so a resumed or
resharded run draws exactly what an uninterrupted one-device run draws.
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
from l2jax.reward import Scorer  # both reward models and R_c (re-exported)

__all__ = ["run", "sft_config", "load_preprompts", "add_preprompt", "Scorer", "sample_records", "distill_records",
           "Preprompts", "prompt_categories", "row_seeds", "sampling_temperature"]


def _log(msg: str) -> None:
  print(f"rejection: {msg}", file=sys.stderr)


def sample_seed(seed: int, iteration: int, tag: str, key: str, j: int) -> int:
  return zlib.crc32(f"{seed}/{iteration}/{tag}/{key}/{j}".encode())


def _norm(category) -> str:
  return " ".join(str(category or "").lower().split())


@dataclasses.dataclass(frozen=True)
class Preprompts:
  """Table 39's safety preprompts: the generic ones, and the answer-template ones per risk category (section 4.2.4:
  "context distillation with answer templates" for prompts of a known risk category)."""
  generic: tuple[str, ...]
  templated: dict  # normalised risk category -> tuple of preprompts

  def pick(self, key: str, category: str = "") -> tuple[str, str]:
    """(preprompt, risk category used or ""): a templated one for a prompt of a category that has templates, a
    generic one otherwise; which one by crc32(key)."""
    group = self.templated.get(_norm(category)) or self.generic
    return group[zlib.crc32(key.encode()) % len(group)], _norm(category) if _norm(category) in self.templated else ""


def load_preprompts(path: str | Path) -> Preprompts:
  """The safety preprompts of a Table 39 JSONL file ({"preprompt", "risk_category": null | str})."""
  generic, templated = [], {}
  for i, r in enumerate(offline.read_jsonl(path), 1):
    if not isinstance(r.get("preprompt"), str) or not r["preprompt"].strip():
      raise ValueError(f"{path}:{i}: expected a non-empty \"preprompt\" string")
    if r.get("risk_category"):
      templated.setdefault(_norm(r["risk_category"]), []).append(r["preprompt"])
    else:
      generic.append(r["preprompt"])
  if not generic:
    raise ValueError(f"{path}: no generic preprompts (records with \"preprompt\" and no \"risk_category\")")
  return Preprompts(tuple(generic), {k: tuple(v) for k, v in templated.items()})


def prompt_categories(prompts) -> dict[str, str]:
  """key -> risk category of the prompts read from `jsonl:` sources whose record has "risk_category" (a string);
  other formats carry none (HH-RLHF and OpenAssistant prompts are untagged)."""
  from l2jax.data.preferences import _lines
  want: dict[str, dict[int, str]] = {}
  for p in prompts:
    if p.source.split(":", 1)[0] == "jsonl":
      path, _, line = p.where.rpartition(":")
      want.setdefault(path, {})[int(line)] = p.key
  out = {}
  for path, keys in want.items():
    for lineno, line in _lines(Path(path)):
      if lineno in keys:
        cat = json.loads(line).get("risk_category")
        if isinstance(cat, str) and cat.strip():
          out[keys[lineno]] = cat
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


def _generate(sampler, ids, seeds, cfg: c.Rejection, temperature: float) -> tuple[list[str], list[dict]]:
  out = sampler.generate(ids, max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=cfg.top_p,
                         top_k=cfg.top_k, seed=seeds)
  texts = [sampler.decode_new(x, out.tokens[i, :out.lengths[i]]).strip() for i, x in enumerate(ids)]
  info = [{"new_tokens": int(out.lengths[i]), "stop_reason": out.stop_reasons[i],
           "finished": out.stop_reasons[i] == "eos"} for i in range(len(ids))]
  return texts, info


def row_seeds(cfg: c.Rejection, prompts, k: int, tag: str) -> list[int]:
  """Seeds of the K rows of each prompt: sample j of the r-th occurrence of a key in this batch draws with
  sample_seed(..., key, r * K + j), so a prompt repeated in one batch never shares samples, and a prompt's first
  occurrence draws the same whatever the batch (resumed, resharded or not)."""
  seen: dict[str, int] = {}
  out = []
  for p in prompts:
    r = seen[p.key] = seen.get(p.key, -1) + 1
    out += [sample_seed(cfg.seed, cfg.iteration, tag, p.key, r * k + j) for j in range(k)]
  return out


def sample_records(sampler, scorer: Scorer, cfg: c.Rejection, ids_by_key: dict, prompts, *, k: int,
                   temperature: float, tag: str, model: str) -> list[dict]:
  """One record per prompt: its K samples with helpful / safety / R_c scores (cut-off ones scored as such), their
  stop reasons, and the index of the best usable one ("chosen", -1 when none; best_of_n.usable)."""
  rows = [(p, j) for p in prompts for j in range(k)]
  seeds = row_seeds(cfg, prompts, k, tag)
  texts, info = _generate(sampler, [ids_by_key[p.key] for p, _ in rows], seeds, cfg, temperature)
  h, s, r = scorer.score([_dialog(cfg, p) for p, _ in rows], texts, [p.is_safety for p, _ in rows],
                         [x["finished"] for x in info])
  out = []
  for i, p in enumerate(prompts):
    samples = [{"text": texts[i * k + j], "helpful": float(h[i * k + j]), "safety": float(s[i * k + j]),
                "reward": float(r[i * k + j]), "seed": seeds[i * k + j], **info[i * k + j]} for j in range(k)]
    out.append({"messages": _dialog(cfg, p), "is_safety": p.is_safety, "source": p.source, "where": p.where,
                "iteration": cfg.iteration, "sampler": model, "temperature": temperature, "samples": samples,
                "chosen": bon.choose(samples, cfg.keep_truncated)})
  return out


def distill_records(sampler, scorer: Scorer, cfg: c.Rejection, tok, preprompts: Preprompts, prompts, model: str,
                    categories: dict | None = None) -> list[dict]:
  """Context distillation: per safety prompt, the plain and the preprompted answer (same seed), both scored on
  the plain prompt, and whether the preprompted one is kept (distill_keep, and usable: not empty, not cut off
  unless keep_truncated). The preprompt: a Table 39 answer template for a prompt of its risk category
  (`categories`: key -> category), a generic one otherwise."""
  from l2jax.data.tokenizer import encode_chat
  categories = categories or {}
  plain = [_dialog(cfg, p) for p in prompts]
  picked = [preprompts.pick(p.key, categories.get(p.key, "")) for p in prompts]
  pre = [add_preprompt(d, t, cfg.preprompt_as) for d, (t, _) in zip(plain, picked)]
  seeds = row_seeds(cfg, prompts, 1, "distill")
  texts, info = _generate(sampler, [encode_chat(tok, d) for d in plain + pre], seeds + seeds, cfg, cfg.temperature)
  h, s, r = scorer.score(plain + plain, texts, [True] * len(texts), [x["finished"] for x in info])
  n = len(prompts)
  keep = bon.distill_keep(s[:n], s[n:])
  side = lambda i: {"text": texts[i], "helpful": float(h[i]), "safety": float(s[i]), **info[i]}
  ok = [bon.usable(side(n + i), cfg.keep_truncated) for i in range(n)]
  return [{"messages": plain[i], "is_safety": True, "source": p.source, "where": p.where, "preprompt": picked[i][0],
           "risk_category": picked[i][1], "preprompt_as": cfg.preprompt_as, "iteration": cfg.iteration,
           "sampler": model, "temperature": cfg.temperature, "plain": side(i), "preprompted": side(n + i),
           "gain": float(s[n + i] - s[i]), "kept": bool(keep[i] and ok[i]), "usable": ok[i]}
          for i, p in enumerate(prompts)]


def _dialog(cfg: c.Rejection, p) -> list[dict]:
  from l2jax.data.dialogs import with_system
  return with_system(list(p.messages), cfg.prompts.system)


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
    train = pr.Prompts(p for p in train if p.is_safety)
    train.stats = getattr(allp, "stats", {})   # the read's counts (skipped_bad) stay with the subset
  ids, train, st_train = pr.encode_prompts(tok, train, cfg.prompts.max_prompt_tokens, cfg.prompts.system)
  if cfg.max_prompts:  # a deterministic mix of the sources: the first N in the order of crc32(key)
    order = sorted(range(len(train)), key=lambda i: zlib.crc32(train[i].key.encode()))[:cfg.max_prompts]
    train, ids = [train[i] for i in order], [ids[i] for i in order]
  ids_h, held, st_held = pr.encode_prompts(tok, held, cfg.prompts.max_prompt_tokens, cfg.prompts.system)
  # the held-out answers before / after fine-tuning: a seeded sample stratified over sources and IS_SAFETY
  # (the held-out list is in source order; its first N can all be one kind of prompt)
  held = [held[i] for i in pr.stratified_sample(held, cfg.prompts.eval_prompts, cfg.seed)]
  st_held = {**st_held, "eval_set": pr.eval_stats(held)}
  ids_by_key = {p.key: x for p, x in zip(train, ids)} | {p.key: x for p, x in zip(held, ids_h)}
  if not train and cfg.sampler:
    raise ValueError(f"no training prompts left from {list(cfg.prompts.sources)} ({st_train})")
  return train, held, ids_by_key, {"train": st_train, "heldout": st_held, "bad_records": errors[:10]}


def sampling_temperature(cfg: c.Rejection) -> tuple[float, str]:
  """(temperature, where it came from): `temperature`, or with `temperature_from` the best temperature of that
  earlier rejection run's Figure 8 (rejection.json["best_temperature"]; best_of_n.best_temperature), the paper's
  temperature rescaling between iterations. temperature_from: a rejection run directory, its final/ (what an
  experiment reference resolves to) or its rejection.json."""
  if not cfg.temperature_from:
    return cfg.temperature, "temperature"
  p = Path(cfg.temperature_from)
  cands = [p] if p.suffix == ".json" else [p / "rejection.json", p.parent / "rejection.json"]
  found = next((x for x in cands if x.is_file()), None)
  if found is None:
    raise FileNotFoundError(f"temperature_from={cfg.temperature_from}: no rejection.json there (give a rejection "
                            f"run directory, its final/ or its rejection.json)")
  best = json.loads(found.read_text()).get("best_temperature")
  if not isinstance(best, dict) or not isinstance(best.get("temperature"), (int, float)):
    raise ValueError(f"{found}: no \"best_temperature\" (that run computed no Figure 8: set its `temperatures`)")
  return float(best["temperature"]), str(found)


def _best_of_k(cfg, sampler, scorer, ids_by_key, train, previous, run_dir, temperature, report) -> list[dict]:
  k = cfg.samples_per_prompt
  work = lambda t: (lambda ps: sample_records(sampler, scorer, cfg, ids_by_key, ps, k=k, temperature=t,
                                              tag="samples", model=cfg.sampler))
  recs = _offline(train, work(temperature), run_dir, "samples", cfg)
  report["samples"] = bon.sample_counts(recs, cfg.keep_truncated)
  rescore = (lambda pool: bon.rescore(pool, scorer)) if cfg.rescore_pool else None
  pool, report["pool_merge"] = bon.build_pool(previous, bon.best_entries(recs, cfg.keep_truncated),
                                              cfg.keep_truncated, rescore)
  report["figure7"] = bon.best_of_n_curves(np.array([[s["reward"] for s in r["samples"]] for r in recs]))
  per_t, rewards, ok = {}, {}, {}
  for t in cfg.temperatures:
    sub = _offline(train[:cfg.fig8_prompts], work(t), run_dir, f"figure8_T{t:g}", cfg)
    rewards[t] = np.array([[s["reward"] for s in r["samples"]] for r in sub])
    ok[t] = np.array([[bon.usable(s, cfg.keep_truncated) for s in r["samples"]] for r in sub])
    per_t[f"{t:g}"] = {**bon.best_of_n_curves(rewards[t]), **bon.sample_counts(sub, cfg.keep_truncated)}
  report["figure8"] = per_t
  if per_t:
    report["best_temperature"] = bon.best_temperature(rewards, ok)
  if jax.process_index() == 0:
    bon.plot_figure7(report["figure7"], run_dir / "figure7.png",
                     f"max / median reward among N ({len(recs)} prompts, T={temperature:g})")
    if per_t:
      bon.plot_figure8(per_t, run_dir / "figure8.png")
  return pool


def _distill(cfg, sampler, scorer, train, run_dir, temperature, report) -> list[dict]:
  preprompts = load_preprompts(cfg.preprompts)
  cats = prompt_categories(train)
  cfg_t = dataclasses.replace(cfg, temperature=temperature)
  recs = _offline(train, lambda ps: distill_records(sampler, scorer, cfg_t, sampler.tokenizer, preprompts, ps,
                                                    cfg.sampler, cats), run_dir, "samples", cfg)
  pool, unreadable = bon.readable([bon.pool_entry(r, r["preprompted"], r["preprompted"]["safety"]) for r in recs
                               if r["kept"]])
  plain = np.array([r["plain"]["safety"] for r in recs])
  gain = np.array([r["gain"] for r in recs])
  keep = np.array([r["kept"] for r in recs], bool)
  report["samples"] = bon.sample_counts([{"samples": [r["preprompted"]]} for r in recs], cfg.keep_truncated)
  report["figure16b"] = {"kept_fraction": float(keep.mean()) if len(keep) else 0.0, "kept": int(keep.sum()),
                         "prompts": len(recs), "mean_gain": float(gain.mean()) if len(gain) else 0.0,
                         "improved_but_unusable": int(sum(r["gain"] > 0 and not r["usable"] for r in recs)),
                         "dropped_unreadable": unreadable}
  report["risk_categories"] = {"tagged_prompts": len(cats), "templated": int(sum(bool(r["risk_category"])
                                                                                 for r in recs)),
                               "categories_with_templates": sorted(preprompts.templated)}
  if jax.process_index() == 0:
    bon.plot_figure16b(plain, gain, keep, run_dir / "figure16b.png")
  return pool


def _summary(cfg, report: dict, temperature: float) -> str:
  lines = [f"# {cfg.name}: {cfg.mode}, iteration {cfg.iteration}", "",
           f"- pool: {report.get('pool_size', 0)} prompts; sampling temperature {temperature:g} "
           f"({report['temperature_from']})"]
  if "samples" in report:
    n = report["samples"]
    lines.append(f"- samples: {n['samples']}, empty {n['empty']}, cut off {n['truncated']} "
                 f"(by stop reason {n['by_stop_reason']}); usable {n['usable']}; {n['prompts_without_usable']} of "
                 f"{n['prompts']} prompts without a usable sample (no pool entry); the highest-R_c sample was empty "
                 f"or cut off for {n['best_unusable']} prompts")
  if "figure7" in report:
    f7 = report["figure7"]
    lines.append(f"- Figure 7: max of N=1 {f7['max'][0]:.4f}, N={f7['n'][-1]} {f7['max'][-1]:.4f}; "
                 f"median of N={f7['n'][-1]} {f7['median'][-1]:.4f}")
  if "best_temperature" in report:
    by = report["best_temperature"]["by_temperature"]
    lines.append(f"- Figure 8: best temperature {report['best_temperature']['temperature']:g}; mean best-of-K usable "
                 "R_c " + ", ".join(f"T={t} {v['best_of_k_usable']:.4f} ({v['coverage']:.0%} of prompts)"
                                    for t, v in by.items()))
  if "figure16b" in report:
    lines.append(f"- context distillation kept {report['figure16b']['kept_fraction']:.1%} of "
                 f"{report['figure16b']['prompts']} safety prompts; {report['risk_categories']['templated']} "
                 f"with an answer-template preprompt")
  if "summary" in report:
    lines.append(f"- {report['summary']}")
  return "\n".join(lines) + "\n"


def _write_report(cfg, run_dir: Path, report: dict, temperature: float) -> None:
  if jax.process_index() == 0:
    (run_dir / "rejection.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "summary.md").write_text(_summary(cfg, report, temperature))


def _unchanged(cfg: c.Rejection, init: str, run_dir: Path, report: dict, temperature: float):
  """No usable answer to fine-tune on: this version is its starting checkpoint `init`, copied to final/ (step 0),
  said in one line and recorded (rejection.json["pool_empty"])."""
  import os
  import shutil
  from l2jax import train
  from l2jax.stages.common import FINAL_STEP
  _log(f"no usable answer in this iteration (rejection.json['samples']): nothing to fine-tune on, so final/ is "
       f"the starting checkpoint {init} unchanged")
  report.update(pool_empty=True, summary="no usable answer: final/ is the starting checkpoint unchanged")
  _write_report(cfg, run_dir, report, temperature)
  if jax.process_index() == 0:
    tmp = run_dir / ".final.tmp-new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    (tmp / FINAL_STEP).write_text(json.dumps({"step": 0}) + "\n")
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    os.replace(tmp, run_dir / "final")
  return train.RunResult(0, "done", None, {})


def run(cfg: c.Rejection, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if not cfg.sampler and not cfg.pool:
    raise ValueError("set `sampler` (a checkpoint to sample from) or `pool` (a pool.jsonl to fine-tune on)")
  if cfg.mode == "context_distillation" and (cfg.pool or not cfg.sampler):
    raise ValueError("mode=context_distillation samples its own answers: set `sampler` and leave `pool` empty")
  if cfg.pool and not Path(cfg.pool).is_file():
    raise FileNotFoundError(f"pool={cfg.pool}: no such pool file (a previous run's run_dir/pool.jsonl)")
  init = cfg.init or cfg.sampler
  before_model = cfg.sampler or init
  pool_path = run_dir / "pool.jsonl"
  if check_sharding:
    from l2jax.stages import sft
    if not pool_path.exists():
      raise ValueError(f"--check-sharding checks the fine-tuning phase: {pool_path} must exist (run once first)")
    return sft.run(sft_config(cfg, init, pool_path), run_dir, check_sharding=True)
  temperature, t_from = sampling_temperature(cfg) if cfg.sampler else (cfg.temperature, "temperature")
  scorer = Scorer(cfg.reward_models, cfg.score_batch)
  sampler = _sampler(before_model, cfg)
  train, held, ids_by_key, stats = _prompts(cfg, sampler.tokenizer)
  _log(f"{len(train)} training prompts, {len(held)} held-out prompts; mode {cfg.mode}, iteration {cfg.iteration}, "
       f"temperature {temperature:g} ({t_from})")
  report: dict = {"mode": cfg.mode, "iteration": cfg.iteration, "sampler": cfg.sampler, "init": init,
                  "temperature": temperature, "temperature_from": t_from, "keep_truncated": cfg.keep_truncated,
                  "samples_per_prompt": cfg.samples_per_prompt, "prompts": stats}
  previous = offline.read_jsonl(cfg.pool) if cfg.pool else []
  if cfg.mode == "context_distillation":
    pool = _distill(cfg, sampler, scorer, train, run_dir, temperature, report)
  elif cfg.sampler:
    pool = _best_of_k(cfg, sampler, scorer, ids_by_key, train, previous, run_dir, temperature, report)
  else:
    pool, report["pool_merge"] = bon.build_pool(previous, [], cfg.keep_truncated)
  report["pool_size"] = len(pool)
  _write_report(cfg, run_dir, report, temperature)
  if not pool and not cfg.sampler:
    raise ValueError(f"the pool is empty: nothing to fine-tune on (no usable answers; {run_dir / 'summary.md'})")
  if not pool:   # every sample empty or cut off: sampling noise must not decide whether a pipeline finishes
    return _unchanged(cfg, init, run_dir, report, temperature)
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
  _write_report(cfg, run_dir, report, temperature)
  return result
