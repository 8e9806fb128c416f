"""The reward over-optimisation benchmark (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization"; Llama 2 sections 3.2.2-3.2.3, and 3.4.1 on reward hacking): does RL here improve a model on
a reward that nobody optimises directly?

run(cfg, run_dir), each phase resumable (its outputs are written atomically and reused by a rerun):
  base/          the starting policy (llama2.c's stories260K converted, "text" chat format)
  prompts/       story openings sampled from the base model: train.jsonl, heldout.jsonl, report.jsonl (disjoint)
  pairs/         two base continuations per opening, labelled by the gold reward under a Bradley-Terry draw
                 (label_temperature), gold scores kept: train.jsonl, heldout.jsonl, train-<N>.jsonl (first N)
  proxy-<N>/     a reward model per training-set size N (the reward stage, initialised from the base model as
                 the paper initialises its RMs from the chat model); proxies.json: accuracy on the held-out pairs
                 against their labels and against the noiseless gold order
  bon.json       best-of-n on the report openings for n = 1, 2, 4 .. bon_n: gold and proxy of the proxy's pick
                 (the exact expectation over n-subsets of bon_n samples), KL = log n - (n - 1) / n
  ppo-<N>/       PPO against proxy N (the PPO stage, snapshots at every evaluation); gold.json: each snapshot
                 measured on the report openings (grpo-<N>/, rloo-<N>/: the same with estimator grpo / rloo)
  rs-<N>/        rejection-sampling fine-tuning against proxy N (the rejection stage); gold.json
  dpo-<N>/       DPO from the base model on the training pairs relabelled by proxy N (pairs/proxy-<N>.jsonl)
  curves.json, table.md, overoptimization.png (l2jax.eval.overoptimization), report.md (l2jax.report)
Every measurement (l2jax.eval.gold_task.measure): `measure_samples` continuations per report opening at
temperature 1 from the policy, the mean gold score, each proxy's mean raw score and the KL to the base model
(k1 per response, on the policy's own samples).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from l2jax import checkpoint as ckpt_lib
from l2jax import config as c

EXPERIMENT = "experiments/overoptimization.py"


def _log(msg: str) -> None:
  print(f"overoptimization: {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  tmp.replace(path)


def _done(d: Path) -> bool:
  return (d / "final" / ckpt_lib.CONFIG).is_file()


def base_dir(cfg: c.Overoptimization, run_dir: Path) -> Path:
  """The starting policy's checkpoint: converted from llama2.c into RUN_DIR/base, or cfg.base itself."""
  if not cfg.base.startswith("llama2c:"):
    return Path(cfg.base)
  out = run_dir / "base"
  if not (out / ckpt_lib.CONFIG).is_file():
    from l2jax.convert.llama2c import llama2c_to_l2jax
    from l2jax.data.tokenizer import CHAT_FORMAT_FILE
    tmp = run_dir / ".base.tmp"
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    llama2c_to_l2jax(cfg.base.partition(":")[2], cfg.base_tokenizer, tmp, dtype="float32")
    (tmp / CHAT_FORMAT_FILE).write_text("text\n")   # a story model continues text; it has no chat format
    tmp.replace(out)
    _log(f"base policy {cfg.base} -> {out}")
  return out


def prompts(cfg, run_dir: Path, sampler) -> dict[str, list[str]]:
  from l2jax.eval import gold_task
  d = run_dir / "prompts"
  parts = {"train": cfg.train_prompts, "heldout": cfg.heldout_pairs, "report": cfg.report_prompts}
  if not all((d / f"{k}.jsonl").is_file() for k in parts):
    d.mkdir(exist_ok=True)
    texts = gold_task.openings(sampler, sum(parts.values()), cfg.opening_tokens, cfg.seed)
    at = 0
    for k, n in parts.items():
      gold_task.write_prompts(d / f"{k}.jsonl", texts[at:at + n])
      at += n
    _log(f"{len(texts)} story openings sampled from the base model -> {d}")
  return {k: gold_task.read_prompts(d / f"{k}.jsonl") for k in parts}


def pairs(cfg, run_dir: Path, sampler, gold, texts: dict) -> dict:
  from l2jax.eval import gold_task
  d = run_dir / "pairs"
  stats_path = d / "labels.json"
  if stats_path.is_file():
    return json.loads(stats_path.read_text())
  d.mkdir(exist_ok=True)
  stats = {}
  for part, salt in (("train", 1), ("heldout", 2)):
    t = texts[part][:max(cfg.pairs)] if part == "train" else texts[part]
    conts = gold_task.continuations(sampler, t, 2, cfg.max_new_tokens, cfg.temperature, cfg.seed * 10 + salt)
    recs, stats[part] = gold_task.label_pairs(t, conts, gold, cfg.label_temperature,
                                              np.random.default_rng([cfg.seed, salt]))
    gold_task.write_pairs(d / f"{part}.jsonl", recs)
    if part == "train":
      for n in cfg.pairs:
        gold_task.write_pairs(d / f"train-{n}.jsonl", recs[:n])
  stats["label_temperature"] = cfg.label_temperature
  _write_json(stats_path, stats)
  _log(f"labelled pairs: {stats['train']['pairs']} train, {stats['heldout']['pairs']} held out; labels agree with "
       f"the gold order on {stats['train']['label_gold_agreement']:.1%} (expected "
       f"{stats['train']['expected_agreement']:.1%} at temperature {cfg.label_temperature:g})")
  return stats


def _launch(spec: str, sets: list[str], d: Path) -> bool:
  """Run a sub-experiment into d unless its final/ exists; its wall time goes to d/wall.json when it ran from
  start to end in one go (a resumed sub-run's time is unknown: none is recorded)."""
  import time

  from l2jax import launch
  if not _done(d):
    fresh = not d.exists()
    _log(f"{spec} into {d}")
    t0 = time.perf_counter()
    launch.launch(spec, sets, d)
    if fresh and _done(d):
      _write_json(d / "wall.json", {"seconds": time.perf_counter() - t0})
  return _done(d)


def _wall(d: Path) -> float | None:
  f = d / "wall.json"
  return json.loads(f.read_text())["seconds"] if f.is_file() else None


def proxies(cfg, run_dir: Path, base: Path) -> dict[str, Path]:
  out = {}
  for n in cfg.pairs:
    d = run_dir / f"proxy-{n}"
    train, held = [f"jsonl:{run_dir}/pairs/train-{n}.jsonl"], [f"jsonl:{run_dir}/pairs/heldout.jsonl"]
    sets = [f"name={cfg.name}-proxy-{n}", f"init={base}", f"data.sources={json.dumps(train)}",
            f"data.eval_sources={json.dumps(held)}", "data.heldout_fraction=0"]
    if not _launch(f"{EXPERIMENT}:{cfg.proxy}", sets + list(cfg.proxy_sets), d):
      return {}
    out[f"{n} pairs"] = d / "final"
  return out


def proxy_accuracy(run_dir: Path, rms: dict) -> dict:
  """Each proxy on the held-out pairs: accuracy against their (noisy) labels and against the gold order."""
  path = run_dir / "proxies.json"
  if path.is_file():
    return json.loads(path.read_text())
  recs = [json.loads(x) for x in (run_dir / "pairs" / "heldout.jsonl").read_text().splitlines() if x]
  prompts_ = [r["prompt"] for r in recs]
  differ = np.array([r["gold_chosen"] != r["gold_rejected"] for r in recs])
  chosen_is_gold_better = np.array([r["gold_chosen"] > r["gold_rejected"] for r in recs])
  out = {}
  for label, rm in rms.items():
    sc = rm.score(prompts_, [r["chosen"] for r in recs], [r["chosen_finished"] for r in recs])
    sr = rm.score(prompts_, [r["rejected"] for r in recs], [r["rejected_finished"] for r in recs])
    right = sc > sr
    out[label] = {"pairs": len(recs), "accuracy_vs_labels": float(right.mean()),
                  "accuracy_vs_gold": float((right == chosen_is_gold_better)[differ].mean())}
  _write_json(path, out)
  return out


def best_of_n(cfg, run_dir: Path, sampler, rms: dict, gold, report: list[str]) -> list[dict]:
  from l2jax.eval import gold_task
  from l2jax.eval import overoptimization as ov
  path = run_dir / "bon.json"
  if not path.is_file():
    import time
    K = cfg.bon_n
    t0 = time.perf_counter()
    conts = gold_task.continuations(sampler, report, K, cfg.max_new_tokens, cfg.temperature, cfg.seed * 10 + 3)
    t_sample = time.perf_counter() - t0
    g_pk = np.asarray(gold(conts["texts"]), np.float64).reshape(len(report), K)
    ns = sorted({1 << i for i in range(K.bit_length()) if 1 << i <= K} | {K})
    curves = []
    for label, rm in rms.items():
      t0 = time.perf_counter()
      p_pk = gold_task.proxy_scores(rm, conts, sampler.tokenizer.eos_id).reshape(len(report), K)
      t_all = t_sample + time.perf_counter() - t0   # n of the K samples per prompt cost n / K of it
      curves.append({"method": "best-of-n", "proxy": label, "n": ns, "kl": [float(ov.bon_kl(n)) for n in ns],
                     "wall_s": [t_all * n / K for n in ns],
                     "gold": [ov.bon_expectation(p_pk, g_pk, n) for n in ns],
                     "proxy_score": [ov.bon_expectation(p_pk, p_pk, n) for n in ns]})
    _write_json(path, curves)
  return json.loads(path.read_text())


def _measure_dirs(cfg, out_path: Path, dirs: dict, ctx) -> dict:
  """{key: measurement} of each model directory, cached in out_path (one entry at a time, so a rerun resumes)."""
  from l2jax.eval import gold_task
  from l2jax.sample import load_sampler
  got = json.loads(out_path.read_text()) if out_path.is_file() else {}
  for key, d in dirs.items():
    if key in got:
      continue
    s = load_sampler(str(d))
    got[key] = gold_task.measure(s, gold_task.LM.load(d), ctx["base_lm"], ctx["rms"], ctx["gold"], ctx["report"],
                                 samples_per_prompt=cfg.measure_samples, max_new_tokens=cfg.max_new_tokens,
                                 seed=cfg.seed * 10 + 4)
    _write_json(out_path, got)
  return got


def _ppo_wall(d: Path) -> dict[int, float]:
  """{iteration: seconds of PPO iterations up to it} from metrics.jsonl (generate + score + train)."""
  t, out = 0.0, {0: 0.0}
  rows = {}
  for line in (d / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "t_generate" in r:
      rows[int(r["step"])] = r["t_generate"] + r["t_score"] + r["t_train"]
  for s in sorted(rows):
    t += rows[s]
    out[s] = t
  return out


def rl(cfg, run_dir: Path, base: Path, proxy_dirs: dict, ctx, method: str = "ppo") -> list[dict] | None:
  """PPO, GRPO or RLOO (the PPO stage, `estimator` set by the variant) against each proxy, snapshots measured."""
  from l2jax.stages.ppo_outputs import SNAPSHOTS
  curves = []
  for label, rm_dir in proxy_dirs.items():
    n = label.split()[0]
    d = run_dir / f"{method}-{n}"
    sets = [f"name={cfg.name}-{method}-{n}", f"policy={base}", f"reward_models.helpful={rm_dir}",
            f"reward_models.safety={rm_dir}", f"prompts.sources={json.dumps([f'jsonl:{run_dir}/prompts/train.jsonl'])}",
            "snapshots=true"]
    if not _launch(f"{EXPERIMENT}:{getattr(cfg, method)}", sets + list(getattr(cfg, f"{method}_sets")), d):
      return None
    snaps = {p.name: p for p in sorted((d / SNAPSHOTS).iterdir()) if (p / ckpt_lib.CONFIG).is_file()}
    got = _measure_dirs(cfg, d / "gold.json", snaps, ctx)
    wall = _ppo_wall(d)
    keys = sorted(got, key=int)
    curves.append(_curve(method, label, got, keys, [int(k) for k in keys], [wall.get(int(k)) for k in keys]))
  return curves


def rejection(cfg, run_dir: Path, base: Path, proxy_dirs: dict, ctx) -> list[dict] | None:
  curves = []
  for label, rm_dir in proxy_dirs.items():
    n = label.split()[0]
    d = run_dir / f"rs-{n}"
    sets = [f"name={cfg.name}-rs-{n}", f"sampler={base}", f"init={base}", f"reward_models.helpful={rm_dir}",
            f"reward_models.safety={rm_dir}", f"prompts.sources={json.dumps([f'jsonl:{run_dir}/prompts/train.jsonl'])}"]
    if not _launch(f"{EXPERIMENT}:{cfg.rejection}", sets + list(cfg.rejection_sets), d):
      return None
    got = _measure_dirs(cfg, d / "gold.json", {"base": base, "final": d / "final"}, ctx)
    curves.append(_curve("rejection", label, got, ["base", "final"], [0, 1], [0.0, _wall(d)]))
  return curves


def dpo(cfg, run_dir: Path, base: Path, proxy_dirs: dict, ctx) -> list[dict] | None:
  """DPO (Rafailov et al. 2023) from the base model on the training pairs relabelled by each proxy (the chosen
  continuation is the one the proxy scores higher): offline, so one measured point per proxy."""
  from l2jax.eval import gold_task
  curves = []
  recs = [json.loads(x) for x in (run_dir / "pairs" / "train.jsonl").read_text().splitlines() if x]
  for label, rm_dir in proxy_dirs.items():
    n = label.split()[0]
    path = run_dir / "pairs" / f"proxy-{n}.jsonl"
    if not path.is_file():
      rm = ctx["rms"][label]
      prompts_ = [r["prompt"] for r in recs]
      sc = rm.score(prompts_, [r["chosen"] for r in recs], [r["chosen_finished"] for r in recs])
      sr = rm.score(prompts_, [r["rejected"] for r in recs], [r["rejected_finished"] for r in recs])
      swap = sr > sc
      out = [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "chosen_finished": r["rejected_finished"],
              "rejected_finished": r["chosen_finished"], "gold_chosen": r["gold_rejected"],
              "gold_rejected": r["gold_chosen"]} if s_ else r for r, s_ in zip(recs, swap)]
      gold_task.write_pairs(path, out)
    d = run_dir / f"dpo-{n}"
    sets = [f"name={cfg.name}-dpo-{n}", f"init={base}", f"data.sources={json.dumps([f'jsonl:{path}'])}",
            "data.heldout_fraction=0.05"]
    if not _launch(f"{EXPERIMENT}:{cfg.dpo}", sets + list(cfg.dpo_sets), d):
      return None
    got = _measure_dirs(cfg, d / "gold.json", {"base": base, "final": d / "final"}, ctx)
    curves.append(_curve("dpo", label, got, ["base", "final"], [0, 1], [0.0, _wall(d)]))
  return curves


def _curve(method, label, got, keys, steps, wall) -> dict:
  return {"method": method, "proxy": label, "step": steps, "kl": [got[k]["kl"] for k in keys],
          "kl_se": [got[k]["kl_se"] for k in keys], "gold": [got[k]["gold"] for k in keys],
          "gold_se": [got[k]["gold_se"] for k in keys],
          "proxy_score": [got[k]["proxy"][label] for k in keys], "wall_s": wall}


def run(cfg: c.Overoptimization, run_dir: Path, check_sharding: bool = False):
  from l2jax import gold as gold_lib
  from l2jax import report as report_lib
  from l2jax import reward
  from l2jax.eval import gold_task
  from l2jax.eval import overoptimization as ov
  from l2jax.sample import load_sampler
  if check_sharding:
    raise ValueError("overoptimization: --check-sharding applies to one stage; run it on its ppo variant")
  gold = gold_lib.load(cfg.gold)   # a bad gold fails before anything is written
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.run_dir_accepted(run_dir)
  base = base_dir(cfg, run_dir)
  sampler = load_sampler(str(base))
  texts = prompts(cfg, run_dir, sampler)
  pairs(cfg, run_dir, sampler, gold, texts)
  proxy_dirs = proxies(cfg, run_dir, base)
  if not proxy_dirs:
    return None
  rms = {k: reward.load(d, batch_size=64) for k, d in proxy_dirs.items()}
  acc = proxy_accuracy(run_dir, rms)
  for k, a in acc.items():
    _log(f"proxy {k}: held-out accuracy {a['accuracy_vs_labels']:.1%} against the labels, "
         f"{a['accuracy_vs_gold']:.1%} against the gold order")
  ctx = {"base_lm": gold_task.LM.load(base), "rms": rms, "gold": gold, "report": texts["report"]}
  curves = []
  if "best-of-n" in cfg.methods:
    curves += best_of_n(cfg, run_dir, sampler, rms, gold, texts["report"])
  for method in cfg.methods:
    if method == "best-of-n":
      continue
    fn = {"rejection": rejection, "dpo": dpo}.get(method)
    got = fn(cfg, run_dir, base, proxy_dirs, ctx) if fn else rl(cfg, run_dir, base, proxy_dirs, ctx, method)
    if got is None:
      return None
    curves += got
  rows = ov.write(curves, run_dir)
  _write_json(run_dir / "overoptimization.json", {"gold": cfg.gold, "label_temperature": cfg.label_temperature,
                                                  "proxies": acc, "table": rows})
  out = report_lib.write(run_dir)
  _log(f"wrote {run_dir / 'table.md'}, {run_dir / 'overoptimization.png'} and {out}")
  return None
