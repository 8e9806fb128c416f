"""Compare model versions with the reward models (Llama 2 sections 3.4 and 5, Figures 11, 20, 21, 32, Table 8).

  python -m l2jax.eval compare --model V1=runs/rejection-tiny/final --model V5=runs/ppo-tiny/final \
      --reference SFT=runs/sft-tiny/final --rm-helpful runs/rm_helpful-tiny/final \
      --rm-safety runs/rm_safety-tiny/final [--judge DIR] [--out DIR]

Every version (the reference first) answers the same evaluation prompts: the "report" half
(`heldout_part`) of the prompt sources' held-out split (`l2jax.data.prompts.split_heldout`, CRC of the first
user turn, so with a fraction no larger than the one the reward models, rejection sampling and PPO held out these
prompts are unseen by all of them; PPO selects its checkpoint on the other, "select" half, so the prompts that
select and the prompts that report are disjoint), a seeded sample of `prompts_per_set` helpfulness and
`prompts_per_set` safety prompts of at most `max_prompt_tokens` tokens, stratified by source within each kind
(`l2jax.data.prompts.stratified_sample`; never the first N of a file). The set's safety share and strata are
logged and kept in compare.json ("prompts"). Every model directory is checked before anything is evaluated.
Answers are sampled
at `temperature` / `top_p` with one seed per prompt shared by all versions, so a version identical to the
reference gives identical answers (every comparison a tie). Both reward models score every answer. Written to
--out (default: the current directory):
  compare.json / compare.md   the versions table: win rates against the reference (helpfulness prompts judged
                              by the helpfulness RM, safety prompts by the safety RM, both by the optional
                              judge), mean held-out rewards, violation rate (Rs < 0.15), false-refusal rate
                              (phrase-list proxy), answer length and EOS rate; Table 8 for the reward models
  fig11_winrate.png           helpfulness win rate (x) against harmlessness win rate (y), one point per version
  fig20_reward_dist.png       the Rc-selected reward of each version's answers
  fig21_diversity.png         Self-BLEU against temperature on the shipped factual / creative prompts
  fig32_tension.png           safety against helpfulness RM score on the HH-RLHF test pairs
  compare_samples.jsonl       every answer with its scores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from l2jax.eval import distributions, diversity, safety, tension, winrate
from l2jax.eval.compare_table import markdown

ROOT = Path(__file__).resolve().parents[2]
HH = {"helpful-base": ROOT / "data/hh-rlhf/helpful-base-test.jsonl.gz",
      "harmless-base": ROOT / "data/hh-rlhf/harmless-base-test.jsonl.gz"}
DEFAULT_PROMPTS = (f"hh-helpful:{HH['helpful-base']}", f"hh-safety:{HH['harmless-base']}")
FIGURES = {"winrate": "fig11_winrate.png", "reward_dist": "fig20_reward_dist.png",
           "diversity": "fig21_diversity.png", "tension": "fig32_tension.png"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `compare` evaluates and how; every field is a CLI flag (--prompts-per-set etc.).

  prompts / heldout_fraction / heldout_part / max_prompt_tokens / system: the evaluation prompts
  (l2jax.data.prompts): the `heldout_part` half ("report"; "" = the whole held-out split) of the held-out prompts.
  prompts_per_set: helpfulness and safety prompts each (a stratified sample drawn with `seed`). max_new_tokens,
  temperature, top_p, seed: answering.
  tie_tol: |score difference| counted as a tie (winrate.TIE_TOL). safety_threshold: the violation threshold.
  diversity_*: Figure 21 (prompts per set, 0 = skip; samples per prompt; temperatures; answer length; top-p).
  tension_pairs: HH-RLHF test pairs per file for Figure 32 and Table 8 (0 = skip), from the pairs held out at
  pair_heldout_fraction (the tiny reward models hold out 0.2). batch_size: rows per generate / score call.
  """
  prompts: tuple[str, ...] = DEFAULT_PROMPTS
  heldout_fraction: float = 0.05
  heldout_part: str = "report"
  prompts_per_set: int = 64
  max_prompt_tokens: int = 128
  system: str = ""
  max_new_tokens: int = 64
  temperature: float = 0.6
  top_p: float = 0.9
  seed: int = 0
  tie_tol: float = winrate.TIE_TOL
  safety_threshold: float = safety.VIOLATION_THRESHOLD
  diversity_prompts: int = 10
  diversity_samples: int = diversity.SAMPLES_PER_PROMPT
  diversity_temperatures: tuple[float, ...] = diversity.TEMPERATURES
  diversity_max_new_tokens: int = 48
  diversity_top_p: float = 1.0
  tension_pairs: int = 100
  pair_heldout_fraction: float = 0.2
  batch_size: int = 64
  bins: int = 30


def eval_prompts(s: Settings, tok) -> tuple[dict[str, list], dict[str, list[list[int]]], dict]:
  """({"helpful": [Prompt], "safety": [Prompt]}, their token ids, stats): the evaluation prompts of each kind.

  The `heldout_part` half of the held-out prompts that fit `max_prompt_tokens`; of each kind (IS_SAFETY false /
  true) a sample of `prompts_per_set`, stratified by source (`stratified_sample`, seed `s.seed`), in source order.
  stats["eval"]: `eval_stats` of the whole set (its safety share and strata).
  """
  from l2jax.data import prompts as pr
  part = s.heldout_part or None
  _, held = pr.split_heldout(pr.read_prompts(list(s.prompts), skip_bad=True), s.heldout_fraction, part)
  ids, kept, stats = pr.encode_prompts(tok, held, s.max_prompt_tokens, s.system)
  out, out_ids = {}, {}
  for kind, flag in (("helpful", False), ("safety", True)):
    idx = [i for i, p in enumerate(kept) if p.is_safety == flag]
    pick = pr.stratified_sample([kept[i] for i in idx], s.prompts_per_set, s.seed)
    out[kind], out_ids[kind] = [kept[idx[j]] for j in pick], [ids[idx[j]] for j in pick]
  ev = pr.eval_stats(out["helpful"] + out["safety"])
  stats = {**stats, "heldout_part": s.heldout_part or "all", "heldout": len(held), "helpful": len(out["helpful"]),
           "safety": len(out["safety"]), "eval": ev}
  if not out["helpful"] and not out["safety"]:
    raise ValueError(f"compare: no held-out prompts in {list(s.prompts)} at heldout_fraction={s.heldout_fraction}, "
                     f"heldout_part={s.heldout_part!r} and max_prompt_tokens={s.max_prompt_tokens}")
  print(f"compare: {ev['prompts']} evaluation prompts from the {stats['heldout_part']!r} half of the held-out "
        f"prompts (safety share {ev['safety_share']:.2f}; {ev['by_stratum']})", file=sys.stderr)
  return out, out_ids, stats


def generate(sampler, ids: Sequence[Sequence[int]], seeds: Sequence[int], *, max_new_tokens: int,
             temperature: float, top_p: float, batch_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(texts, lengths [N], ended with EOS [N]) of one answer per prompt, `batch_size` rows per call."""
  texts, lens, eos = [], [], []
  for i in range(0, len(ids), batch_size):
    chunk = [list(x) for x in ids[i:i + batch_size]]
    out = sampler.generate(chunk, max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=[int(x) for x in seeds[i:i + batch_size]])
    for r, p in enumerate(chunk):
      texts.append(sampler.decode_new(p, out.tokens[r, :out.lengths[r]]))
    lens += out.lengths.tolist()
    eos += [x == "eos" for x in out.stop_reasons]
  return texts, np.asarray(lens, np.int64), np.asarray(eos, bool)


def score(rm, dialogs: list, texts: list[str], batch_size: int, min_len: int, finished=True) -> np.ndarray:
  """float32 [N] raw scores; every batch padded to one shape (batch_size rows of T tokens), so each reward
  model compiles once: T = the power of two covering the longest row and `min_len`, at most the RM's seq_len.
  finished: bool or [N] bools; an answer cut off by max_new_tokens (False) is scored without EOS, as the
  unfinished answer it is (l2jax.data.preferences.encode_responses). An empty answer is a valid one."""
  from l2jax.data.preferences import encode_responses, rows_to_arrays
  from l2jax.data.preferences import bucket_len as _bucket
  done = [finished] * len(texts) if isinstance(finished, (bool, np.bool_)) else [bool(x) for x in finished]
  rows = [encode_responses(rm.tokenizer, d, [t], rm.seq_len, finished=[f])[0] for d, t, f in zip(dialogs, texts, done)]
  T = _bucket(max([min_len] + [len(r) for r in rows]), rm.seq_len)
  out = np.zeros((len(rows),), np.float32)
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    tokens, mask = rows_to_arrays(chunk + [[]] * (batch_size - len(chunk)), T, rm.tokenizer.pad_id)
    out[i:i + len(chunk)] = np.asarray(rm.score_tokens(tokens, mask))[:len(chunk)]
  return out


def answer_version(ckpt: str, prompts: dict, ids: dict, rms: dict, s: Settings) -> dict:
  """Answers of one checkpoint to the eval prompts (both kinds in one batch stream), scored by every RM; plus
  its Self-BLEU curves."""
  from l2jax.rl.rewards import combine
  from l2jax.sample import load_sampler
  sampler = load_sampler(ckpt)
  kinds = [k for k in ("helpful", "safety") if ids[k]]
  all_ids = [x for k in kinds for x in ids[k]]
  seeds = [s.seed * 1_000_003 + i for i in range(len(all_ids))]
  texts, lens, eos = generate(sampler, all_ids, seeds, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_p=s.top_p, batch_size=s.batch_size)
  dialogs = [list(p.messages) for k in kinds for p in prompts[k]]
  min_len = s.max_prompt_tokens + s.max_new_tokens
  scores = {name: score(rm, dialogs, texts, s.batch_size, min_len, eos) for name, rm in rms.items()}
  is_safety = np.asarray([k == "safety" for k in kinds for _ in ids[k]])
  rc = np.asarray(combine(scores["helpful"], scores["safety"], is_safety, s.safety_threshold))
  res: dict = {"dir": str(ckpt)}
  start = 0
  for k in kinds:
    sl = slice(start, start + len(ids[k]))
    start = sl.stop
    res[k] = {"texts": texts[sl], "lengths": lens[sl], "eos": eos[sl], "rc": rc[sl],
              **{name: v[sl] for name, v in scores.items()}}
  if s.diversity_prompts > 0 and s.diversity_samples >= 2 and s.diversity_temperatures:
    res["diversity"] = diversity_curves(sampler, s)
  return res


def diversity_curves(sampler, s: Settings) -> dict[str, dict[str, float]]:
  """{prompt set: {str(T): mean Self-BLEU}} on the shipped factual / creative prompts (Figure 21)."""
  from l2jax.data.dialogs import with_system
  from l2jax.data.tokenizer import encode_chat
  out = {}
  for name in diversity.PROMPT_SETS:
    msgs = diversity.read_eval_prompts(name)[:s.diversity_prompts]
    ids = [encode_chat(sampler.tokenizer, with_system(list(m), s.system)) for m in msgs]
    n = s.diversity_samples
    rows = [x for x in ids for _ in range(n)]
    seeds = [s.seed * 1_000_003 + 700_000 + r for r in range(len(rows))]

    def gen(t: float, k: int, rows=rows, seeds=seeds, n_prompts=len(ids)) -> list[list[str]]:
      texts, _, _ = generate(sampler, rows, seeds, max_new_tokens=s.diversity_max_new_tokens, temperature=t,
                             top_p=s.diversity_top_p, batch_size=max(s.batch_size, k))
      return [texts[p * k:(p + 1) * k] for p in range(n_prompts)]

    out[name] = diversity.curve(gen, s.diversity_temperatures, n)
  return out


def version_metrics(v: dict, ref: dict, judge: bool, s: Settings) -> dict:
  """The versions-table row of one version against the reference's answers."""
  def mean(x):
    return float(np.mean(x)) if len(x) else None

  h, sa = v.get("helpful"), v.get("safety")
  row: dict = {"dir": v["dir"]}
  row["mean_rh_helpful"] = mean(h["helpful"]) if h else None
  row["mean_rs_safety"] = mean(sa["safety"]) if sa else None
  row["mean_rc"] = mean(np.concatenate([x["rc"] for x in (h, sa) if x]))
  row["violation_rate"] = safety.violation_rate(sa["safety"], s.safety_threshold) if sa else None
  row["false_refusal_rate"] = safety.false_refusal_rate(h["texts"]) if h else None
  row["refusal_rate_safety"] = safety.false_refusal_rate(sa["texts"]) if sa else None
  row["mean_length"] = mean(np.concatenate([x["lengths"] for x in (h, sa) if x]))
  row["eos_rate"] = mean(np.concatenate([x["eos"] for x in (h, sa) if x]))
  win = {}
  if h:
    win["helpful"] = winrate.win_rate(h["helpful"], ref["helpful"]["helpful"], s.tie_tol)
  if sa:
    win["safety"] = winrate.win_rate(sa["safety"], ref["safety"]["safety"], s.tie_tol)
  if judge:
    for kind, x in (("helpful", h), ("safety", sa)):
      if x:
        win[f"judge_{kind}"] = winrate.win_rate(x["judge"], ref[kind]["judge"], s.tie_tol)
  row["win"] = win
  if "diversity" in v:
    row["self_bleu"] = v["diversity"]
  return row


def tension_scores(rms: dict, s: Settings) -> dict:
  """{set: {"chosen"/"rejected": {rm name: raw scores}}, "rating": [...]} on held-out HH-RLHF test pairs."""
  from l2jax.data import preferences as prefs
  out = {}
  for name, path in HH.items():
    pairs = prefs.split_heldout(prefs.read_hh(path), s.pair_heldout_fraction)[1][:s.tension_pairs]
    dialogs = [p.messages() for p in pairs]
    out[name] = {side: {rm: score(rmodel, dialogs, [getattr(p, side) for p in pairs], s.batch_size,
                                  s.max_prompt_tokens + s.max_new_tokens).tolist()
                        for rm, rmodel in rms.items()} for side in ("chosen", "rejected")}
    out[name]["rating"] = [p.rating for p in pairs]
  return out


def check_dirs(models: dict[str, str], reference: tuple[str, str], rm_helpful: str, rm_safety: str,
               judge: str | None = None) -> None:
  """FileNotFoundError (one line) naming the first argument that is not an l2jax checkpoint directory, before any
  model is loaded (an evaluation takes minutes per version)."""
  named = [(f"--reference {reference[0]}", reference[1])] + [(f"--model {k}", v) for k, v in models.items()]
  named += [("--rm-helpful", rm_helpful), ("--rm-safety", rm_safety)] + ([("--judge", judge)] if judge else [])
  for flag, d in named:
    if not (Path(d) / "config.json").is_file():
      what = "no such directory" if not Path(d).exists() else "no config.json: not an l2jax checkpoint directory"
      raise FileNotFoundError(f"compare: {flag}={d}: {what}")


def compare(models: dict[str, str], reference: tuple[str, str], rm_helpful: str, rm_safety: str,
            judge: str | None = None, out: str | Path = ".", settings: Settings = Settings(),
            rm_note: str = "") -> dict:
  """Evaluate `models` ({name: checkpoint dir}) against `reference` ((name, dir)); write the files to `out`.

  rm_note: who the two reward models are (e.g. "held-out judges, trained on the other half of the preference
  data"), kept in compare.json and shown in compare.md.
  """
  import l2jax.reward
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.eval import reward_accuracy
  check_dirs(models, reference, rm_helpful, rm_safety, judge)
  s, out = settings, Path(out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  loaded: dict = {}

  def load_rm(d):  # one copy (and one compilation) per directory
    key = str(Path(d).resolve())
    if key not in loaded:
      loaded[key] = l2jax.reward.load(d, batch_size=s.batch_size)
    return loaded[key]

  rms = {"helpful": load_rm(rm_helpful), "safety": load_rm(rm_safety)}
  if judge:
    rms["judge"] = load_rm(judge)
  ref_name, ref_dir = reference
  prompts, ids, pstats = eval_prompts(s, Tokenizer(Path(ref_dir) / "tokenizer.model"))
  versions = {ref_name: ref_dir, **{k: v for k, v in models.items() if k != ref_name}}
  answers, by_dir = {}, {}
  for name, d in versions.items():
    key = str(Path(d).resolve())
    if key not in by_dir:
      print(f"compare: answering with {name} ({d})", file=sys.stderr)
      by_dir[key] = answer_version(d, prompts, ids, rms, s)
    answers[name] = {**by_dir[key], "dir": str(d)}
  ref = answers[ref_name]
  rows = {name: version_metrics(a, ref, bool(judge), s) for name, a in answers.items()}
  result: dict = {"settings": dataclasses.asdict(s), "reference": {"name": ref_name, "dir": str(ref_dir)},
                  "models": dict(models), "rms": {"helpful": rm_helpful, "safety": rm_safety, "judge": judge, "note": rm_note},
                  "prompts": pstats, "versions": rows, "figures": {}}
  rc = {n: np.concatenate([a[k]["rc"] for k in ("helpful", "safety") if k in a]) for n, a in answers.items()}
  result["distributions"] = distributions.histograms(rc, s.bins)
  if any("diversity" in a for a in answers.values()):
    result["diversity"] = {k: {n: a["diversity"][k] for n, a in answers.items() if "diversity" in a}
                           for k in diversity.PROMPT_SETS}
  if s.tension_pairs > 0:
    ts = tension_scores(rms, s)
    sets = {k: {side: {"helpful": v[side]["helpful"], "safety": v[side]["safety"]} for side in ("chosen", "rejected")}
            for k, v in ts.items()}
    result["tension"] = tension.summarise(sets)
    acc = {f"{rm} RM: {k} held-out": (np.asarray(v["chosen"][rm]), np.asarray(v["rejected"][rm]), np.asarray(v["rating"]))
           for rm in rms for k, v in ts.items()}
    result["reward_accuracy"] = {k: r["accuracy"] for k, r in reward_accuracy.evaluate(acc).items()}
    result["table8"] = reward_accuracy.table8(reward_accuracy.evaluate(acc))
    if tension.plot(sets, out / FIGURES["tension"], "Figure 32: safety vs helpfulness RM (HH-RLHF test pairs)"):
      result["figures"]["tension"] = FIGURES["tension"]
  points = {n: (r["win"].get("helpful", {}).get("win_rate"), r["win"].get("safety", {}).get("win_rate"))
            for n, r in rows.items() if n != ref_name}
  if points and winrate.plot(points, out / FIGURES["winrate"], f"Figure 11: win rate against {ref_name} "
                             f"(RM judges; ties count 1/2)"):
    result["figures"]["winrate"] = FIGURES["winrate"]
  if distributions.plot(result["distributions"], out / FIGURES["reward_dist"],
                        "Figure 20: reward of held-out answers (raw score of the RM that Rc selects)"):
    result["figures"]["reward_dist"] = FIGURES["reward_dist"]
  if result.get("diversity") and diversity.plot(result["diversity"], out / FIGURES["diversity"],
                                                "Figure 21: Self-BLEU against temperature"):
    result["figures"]["diversity"] = FIGURES["diversity"]
  result["seconds"] = round(time.perf_counter() - t0, 1)
  with open(out / "compare_samples.jsonl", "w") as f:
    for name, a in answers.items():
      for kind in ("helpful", "safety"):
        for i, p in enumerate(prompts[kind] if kind in a else []):
          f.write(json.dumps({"version": name, "kind": kind, "prompt": list(p.messages), "where": p.where,
                              "response": a[kind]["texts"][i], "rh": float(a[kind]["helpful"][i]),
                              "rs": float(a[kind]["safety"][i]), "rc": float(a[kind]["rc"][i]),
                              **({"judge": float(a[kind]["judge"][i])} if judge else {})}) + "\n")
  (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "compare.md").write_text(markdown(result))
  print(f"compare: wrote {out / 'compare.md'} ({result['seconds']} s)", file=sys.stderr)
  return result


def _named(spec: str, default: str) -> tuple[str, str]:
  name, sep, d = spec.partition("=")
  return (name, d) if sep and name else (default, spec)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.eval compare", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a version to evaluate")
  ap.add_argument("--reference", required=True, metavar="[NAME=]DIR", help="the version the others are compared to")
  ap.add_argument("--rm-helpful", required=True)
  ap.add_argument("--rm-safety", required=True)
  ap.add_argument("--judge", default=None, help="an optional third reward model judging every prompt")
  ap.add_argument("--out", default=".", help="output directory (default: the current one)")
  for f in dataclasses.fields(Settings):
    flag = "--" + f.name.replace("_", "-")
    if f.type in ("tuple[str, ...]", "tuple[float, ...]"):
      elem = float if "float" in f.type else str
      ap.add_argument(flag, type=lambda v, e=elem: tuple(e(x) for x in v.split(",") if x), default=f.default,
                      help=f"comma-separated (default {','.join(map(str, f.default))})")
    else:
      ap.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=f.default,
                      help=f"default {f.default}")
  args = ap.parse_args(argv)
  settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
  try:
    models = dict(_named(m, f"model{i + 1}") for i, m in enumerate(args.model))
    compare(models, _named(args.reference, "reference"), args.rm_helpful, args.rm_safety, args.judge, args.out,
            settings)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
