#!/usr/bin/env python
"""Benchmark `gold`: gold reward reached by l2jax's PPO and by TRL's PPOTrainer (trl==1.12.0,
`trl.experimental.ppo`) on the known-gold over-optimisation benchmark (Gao, Schulman & Hilton 2022, "Scaling Laws
for Reward Model Overoptimization"; experiments/overoptimization.py), at matched KL and per wall-clock minute.

  python tools/bench.py gold --run RUN_DIR [--proxy N] [--iters K] [--seed S] [--points 4]
      [--trl-whiten-score] [--torch-threads T] [--json F] [--workdir D [--report-only]]

RUN_DIR is a finished (or at least proxy-trained) `python -m l2jax.launch experiments/overoptimization.py:tiny`
run. Both sides get the same base policy (RUN_DIR/base; TRL's an HF export of it), the same proxy reward model
RUN_DIR/proxy-N/final (an HF `LlamaForSequenceClassification`, num_labels=1, whose `score` is replaced by a
Linear with the l2jax head's bias; checked against l2jax.reward's score_tokens within 1e-4 before training), the
same value-model start (the proxy RM, Stiennon et al. 2020, value_init="helpful"), the same training prompts (the
ones l2jax's iterations draw, as token ids) and the same budget: the PPO variant the stage launches
(`<cfg.ppo>` with the stage's sets; --iters K and --seed S replace its iterations and seed; where the stage's
own run RUN_DIR/ppo-N recorded other values in its config.json, those are set, so the rerun is that run).
  l2jax: the PPO stage, exactly as the benchmark launches it, in a child process; snapshots every eval_every
    iterations; training time per iteration = t_generate + t_score + t_train of metrics.jsonl (the stage's
    `_ppo_wall`; compilation falls in the first iteration, the held-out evaluations and saves outside).
  TRL: PPOTrainer with the PPO config mapped (kl_coef = kl_beta, response_length = max_new_tokens, temperature,
    cliprange, cliprange_value, gamma, lam, num_ppo_epochs; per_device_train_batch_size = batch_prompts,
    num_mini_batches = batch_prompts / minibatch, gradient_accumulation_steps 1: one optimiser step per l2jax
    minibatch; stop_token "eos": a response ends at EOS as l2jax's does; missing_eos_penalty None; k1 KL). TRL
    has one optimiser for policy and value model (loss = pg_loss + vf_coef * vf_loss) and does not clip
    gradients; it is handed (`optimizers=`) an AdamW with two parameter groups, the policy's (optim) and the value
    model's (value_optim; eps and clip norm times vf_coef, which makes the group's update that of AdamW on the
    unscaled value loss), each clipped to its global norm first and weight decay masked as
    l2jax.train.make_optimizer does, and a constant schedule. The policy is saved every eval_every iterations (a callback; the saves are not timed).
  Still different, by design of the two implementations: l2jax's reward is R~c = WHITEN(score) over the batch
  (Llama 2 section 3.2.3), TRL's the raw score (--trl-whiten-score whitens TRL's too, by wrapping TRL's
  get_reward for the reward model); TRL samples responses of exactly response_length tokens and truncates after
  EOS, l2jax stops at EOS (the same rows); prompts are drawn in another order; the RNGs differ.
Measurement: every snapshot of both sides (TRL's converted back to l2jax checkpoints with the base's tokenizer and
chat format; its iteration 0 is the round trip of the base) goes through the stage's own `_measure_dirs`
(l2jax.eval.gold_task.measure: the report openings, measure_samples continuations each, max_new_tokens, the
same seed): gold, the proxy's raw score, KL(policy || base). Report: gold and KL per snapshot; gold at matched KL
(each side's trajectory interpolated where it first reaches each of --points KL values spread over the range both
reach); peak gold; gold gain per training minute; seconds per iteration and their ratio. Each phase runs in its
own child process (JAX and torch would fight over the cores); the load average is recorded around each phase and
the timings flagged when it exceeds the cores. --report-only reprints a finished --workdir without running.
Seeds matter: one run per side is one draw; PPO's gold at a given KL moves by a few hundredths between seeds
(--seed), so compare several before reading a gap of that size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ppo import child, child_main, load_avg, trl_available  # noqa: E402

EXPERIMENT = "experiments/overoptimization.py"
RM_TOLERANCE = 1e-4
TOK_CONFIG = {"tokenizer_class": "LlamaTokenizer", "pad_token": "<unk>", "padding_side": "left"}


# ----------------------------------------------------------------------------------------------- pure pieces

def at_kl(kl, values, targets) -> np.ndarray:
  """values interpolated where a trajectory of snapshots (in training order) first reaches each target KL:
  linear between the last snapshot below the target and the first at or above it; the first snapshot's value
  for a target at or below its KL; NaN for a target never reached."""
  kl, values = np.asarray(kl, np.float64), np.asarray(values, np.float64)
  if kl.shape != values.shape or kl.ndim != 1 or not kl.size:
    raise ValueError(f"at_kl: expected two equal-length 1-d sequences, found shapes {kl.shape} and {values.shape}")
  out = []
  for k in np.atleast_1d(np.asarray(targets, np.float64)):
    hit = np.flatnonzero(kl >= k)
    if not hit.size:
      out.append(np.nan)
    elif hit[0] == 0:
      out.append(values[0])
    else:
      i = hit[0]
      f = (k - kl[i - 1]) / (kl[i] - kl[i - 1])
      out.append(values[i - 1] + f * (values[i] - values[i - 1]))
  return np.asarray(out)


def matched_kls(kl_a, kl_b, points: int) -> np.ndarray:
  """`points` KL values evenly spread over (start, reach], where start is the larger of the two first KLs and
  reach the smaller of the two largest KLs: inside the range both trajectories cover."""
  if points < 1:
    raise ValueError(f"matched_kls: points={points}; expected >= 1")
  lo, hi = max(kl_a[0], kl_b[0]), min(max(kl_a), max(kl_b))
  if not hi > lo:
    return np.zeros(0)
  return lo + (hi - lo) * np.arange(1, points + 1) / points


def gold_per_minute(gold, minutes) -> dict:
  """Gold gain over the start per training minute, at the peak-gold snapshot and at the last one:
  {"peak_gold", "peak_index", "peak_minutes", "per_min" (at the peak), "final_per_min"}; NaN where no time
  has passed."""
  g, m = np.asarray(gold, np.float64), np.asarray(minutes, np.float64)
  p = int(np.argmax(g))
  rate = lambda i: float((g[i] - g[0]) / m[i]) if m[i] > 0 else math.nan
  return {"peak_gold": float(g[p]), "peak_index": p, "peak_minutes": float(m[p]), "per_min": rate(p),
          "final_per_min": rate(len(g) - 1)}


def _f(x, fmt: str = ".3f") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def compare(sides: dict, points: int) -> dict:
  """Matched-KL comparison of two sides {name: {"step", "kl", "gold", "gold_se", "minutes"}} (first = l2jax,
  second = the peer): rows {kl, <name>_gold, <name>_se, <name>_min, diff, diff_se}, the goal's verdicts."""
  (a, sa), (b, sb) = list(sides.items())
  ks = matched_kls(sa["kl"], sb["kl"], points)
  rows = []
  for k in ks:
    r = {"kl": float(k)}
    for name, s in ((a, sa), (b, sb)):
      r[f"{name}_gold"] = float(at_kl(s["kl"], s["gold"], k)[0])
      r[f"{name}_se"] = float(at_kl(s["kl"], s["gold_se"], k)[0])
      r[f"{name}_min"] = float(at_kl(s["kl"], s["minutes"], k)[0])
    r["diff"] = r[f"{a}_gold"] - r[f"{b}_gold"]
    r["diff_se"] = math.hypot(r[f"{a}_se"], r[f"{b}_se"])
    r["time_ratio"] = r[f"{a}_min"] / r[f"{b}_min"] if r[f"{b}_min"] > 0 else math.nan
    rows.append(r)
  return {"kl": [float(k) for k in ks], "rows": rows,
          "gold_at_least": bool(rows) and all(r["diff"] >= 0 for r in rows),
          "gold_within_2se": bool(rows) and all(r["diff"] >= -2 * r["diff_se"] for r in rows),
          "half_time": bool(rows) and all(r["time_ratio"] <= 0.5 for r in rows)}


def table(sides: dict, cmp: dict, summary: dict) -> str:
  """Markdown: each side's snapshots, the matched-KL comparison and the summary (module docstring)."""
  (a, _), (b, _) = list(sides.items())
  out = ["| side | iteration | train min | KL | gold | ± se | proxy |", "|---|---:|---:|---:|---:|---:|---:|"]
  for name, s in sides.items():
    for i, step in enumerate(s["step"]):
      out.append(f"| {name} | {step} | {_f(s['minutes'][i], '.2f')} | {_f(s['kl'][i], '.2f')} | "
                 f"{_f(s['gold'][i])} | {_f(s['gold_se'][i])} | {_f(s['proxy'][i])} |")
  out += ["", f"| KL | {a} gold | {b} gold | {a} - {b} | ± se | {a} min | {b} min | time ratio |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in cmp["rows"]:
    out.append(f"| {r['kl']:.2f} | {_f(r[f'{a}_gold'])} | {_f(r[f'{b}_gold'])} | {_f(r['diff'], '+.3f')} | "
               f"{_f(r['diff_se'])} | {_f(r[f'{a}_min'], '.2f')} | {_f(r[f'{b}_min'], '.2f')} | "
               f"{_f(r['time_ratio'], '.2f')} |")
  if not cmp["rows"]:
    out.append("| (no KL range that both sides reach) | | | | | | | |")
  out += ["", f"| side | peak gold | at KL | peak min | gold gain / min (peak) | (final) | s / iteration | "
              f"first iteration s | train min |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, s in sides.items():
    g = summary[name]
    out.append(f"| {name} | {_f(g['peak_gold'])} | {_f(s['kl'][g['peak_index']], '.2f')} | "
               f"{_f(g['peak_minutes'], '.2f')} | {_f(g['per_min'])} | {_f(g['final_per_min'])} | "
               f"{_f(g['s_per_iter'])} | {_f(g['first_iter_s'], '.2f')} | {_f(s['minutes'][-1], '.2f')} |")
  return "\n".join(out)


# ----------------------------------------------------------------------------------------------- budget

def ppo_sets(ov, run: Path, proxy: int, method: str = "ppo") -> list[str]:
  """The overrides the benchmark stage launches PPO (method "ppo"; "grpo" / "rloo": the PPO stage with that
  estimator) against proxy N with (`rl` in l2jax/stages/overoptimization.py), then the config's own <method>_sets."""
  base, rm_dir = run / "base", run / f"proxy-{proxy}" / "final"
  return [f"name={ov.name}-{method}-{proxy}", f"policy={base}", f"reward_models.helpful={rm_dir}",
          f"reward_models.safety={rm_dir}", f"prompts.sources={json.dumps([f'jsonl:{run}/prompts/train.jsonl'])}",
          "snapshots=true", *getattr(ov, f"{method}_sets")]


STAGE_SET = ("name", "policy", "reward_models.helpful", "reward_models.safety", "prompts.sources", "snapshots")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def recorded_sets(now: dict, recorded: dict, skip: tuple = ()) -> list[str]:
  """`--set` strings that turn the PPO config `now` (to_dict form) into the one a run recorded (its
  config.json), for the fields that differ, but not the ones the stage sets (paths, name) nor `skip`."""
  a, b = _flat(json.loads(json.dumps(now))), _flat(recorded)   # tuples as the JSON's lists
  out = []
  for k in sorted(set(a) & set(b)):
    if a[k] == b[k] or k in STAGE_SET or k in skip or k == "stage":
      continue
    v = b[k]
    out.append(f"{k}=" + ("true" if v is True else "false" if v is False else "none" if v is None else
                          json.dumps(v) if isinstance(v, list) else str(v)))
  return out


def load_budget(run: Path, proxy: int | None, iters: int | None, seed: int | None = None, method: str = "ppo"):
  """(benchmark config, proxy N, PPO variant spec, its sets, PPO config) of RUN_DIR for `method` (ppo, grpo,
  rloo: the variant the stage launches for it). Where the stage's own run RUN_DIR/<method>-N recorded a config
  that the experiment file no longer gives, its values are set (the sets end with them), so that both sides get
  the budget that run had."""
  from l2jax import config as c
  from l2jax.experiment_refs import load_config
  path = run / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: not an over-optimisation run (no config.json)")
  d = json.loads(path.read_text())
  if d.get("stage") != "overoptimization":
    raise ValueError(f"{path}: stage {d.get('stage')!r}; expected an overoptimization run")
  ov = c.from_dict(c.Overoptimization, d)
  proxy = proxy if proxy is not None else max(ov.pairs)
  if proxy not in ov.pairs:
    raise ValueError(f"--proxy {proxy}: {run} has proxies {list(ov.pairs)}")
  rm = run / f"proxy-{proxy}" / "final"
  for need in (run / "base" / "config.json", rm / "head.json", run / "prompts" / "train.jsonl",
               run / "prompts" / "report.jsonl"):
    if not need.is_file():
      raise FileNotFoundError(f"{need}: missing; run the benchmark through its proxies first")
  spec = f"{EXPERIMENT}:{getattr(ov, method)}"
  given = {"iterations": iters, "seed": seed}
  sets = ppo_sets(ov, run.resolve(), proxy, method) + [f"{k}={v}" for k, v in given.items() if v is not None]
  cfg = load_config(spec, sets)
  recorded = run / f"{method}-{proxy}" / "config.json"
  if recorded.is_file():
    more = recorded_sets(c.to_dict(cfg), json.loads(recorded.read_text()),
                         tuple(k for k, v in given.items() if v is not None))
    if more:
      sets += more
      cfg = load_config(spec, sets)
  return ov, proxy, spec, sets, cfg


def trl_settings(p) -> dict:
  """The PPO config's budget as TRL sees it; one line naming the setting for what TRL cannot be given."""
  bad = []
  if getattr(p, "estimator", "gae") != "gae":
    bad.append(f"estimator={p.estimator!r} (TRL's PPOTrainer is GAE PPO)")
  if p.value_init != "helpful":
    bad.append(f"value_init={p.value_init!r} (TRL's value model here starts from the reward model)")
  for name, o in (("optim", p.optim), ("value_optim", p.value_optim)):
    if o.schedule != "constant" or o.warmup_steps:
      bad.append(f"{name}: schedule {o.schedule!r} with {o.warmup_steps} warmup steps (only constant, no warmup)")
  if not p.whiten_advantages:
    bad.append("whiten_advantages=false (TRL always whitens)")
  if p.top_p != 1.0:
    bad.append(f"top_p={p.top_p}")
  if bad:
    raise ValueError(f"bench gold: the PPO config has settings not mapped to TRL: {'; '.join(bad)}")
  return {"iterations": p.iterations, "batch_prompts": p.batch_prompts, "minibatch": p.minibatch,
          "ppo_epochs": p.ppo_epochs, "max_new_tokens": p.max_new_tokens, "temperature": p.temperature,
          "kl_beta": p.kl_beta, "clip": p.clip, "value_clip": p.value_clip, "gamma": p.gamma, "lam": p.lam,
          "missing_eos_penalty": p.missing_eos_penalty, "eval_every": p.eval_every, "seed": p.seed,
          "optim": {k: getattr(p.optim, k) for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip")},
          "value_optim": {k: getattr(p.value_optim, k) for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip")}}


# ----------------------------------------------------------------------------------------------- export

def export_rm_backbone(rm_dir, hf_dir) -> dict:
  """An l2jax reward-model directory's backbone as an HF LlamaForCausalLM directory (its next-token head zero: a
  sequence classifier ignores it) through l2jax.convert.hf; returns the scalar head {"w": [dim], "b": float}."""
  from l2jax import checkpoint as ck
  from l2jax import reward
  from l2jax.convert.hf import l2jax_to_hf
  from l2jax.model import llama
  cfg, params, _ = reward.load_params(rm_dir)
  shape = llama.split(llama.abstract(cfg))[1]["lm_head"]
  lm = {**params["backbone"], "lm_head": np.zeros(shape.shape, np.asarray(params["backbone"]["embed"]).dtype)}
  tmp = Path(str(hf_dir) + ".l2jax-lm")
  shutil.rmtree(tmp, ignore_errors=True)
  tok = Path(rm_dir) / ck.TOKENIZER
  ck.save_model_dir(tmp, cfg, lm, tok if tok.is_file() else None)
  try:
    l2jax_to_hf(tmp, hf_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  head = {"w": np.asarray(params["head"]["w"], np.float32).tolist(), "b": float(np.asarray(params["head"]["b"]))}
  (Path(hf_dir) / "rm_head.json").write_text(json.dumps(head))
  return head


def hf_reward_model(hf_dir, head: dict | None = None):
  """(torch) A LlamaForSequenceClassification (num_labels=1) from `hf_dir`, its `score` a Linear(dim, 1) WITH
  bias carrying the l2jax head (TRL's get_reward calls `model.score`; HF's score has no bias). The head comes
  from `head` or from rm_head.json in hf_dir (export_rm_backbone)."""
  import torch
  import transformers
  head = head or json.loads((Path(hf_dir) / "rm_head.json").read_text())
  verbosity = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()   # "score.weight newly initialized": it is replaced just below
  try:
    m = transformers.LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=1, dtype=torch.float32)
  finally:
    transformers.logging.set_verbosity(verbosity)
  w = torch.tensor(head["w"], dtype=torch.float32)
  score = torch.nn.Linear(w.shape[0], 1, bias=True)
  with torch.no_grad():
    score.weight.copy_(w[None, :])
    score.bias.fill_(float(head["b"]))
  m.score = score
  m.config.pad_token_id = 0
  return m.eval()


def hf_scores(model, rows: list[list[int]], pad_id: int) -> np.ndarray:
  """(torch) float64 [R]: the score at each row's last token as TRL's get_reward computes it (rows left-padded,
  positions counted over the mask, `model.score` on the last hidden state), the attention mask each row's own
  tokens (as l2jax's: a sampled token equal to the pad id stays in; TRL's get_reward masks `!= pad`)."""
  import torch
  T = max(map(len, rows))
  x = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long)
  mask = torch.arange(T)[None, :] >= torch.tensor([T - len(r) for r in rows])[:, None]
  pos = mask.cumsum(1) - mask.long()
  with torch.no_grad():
    h = getattr(model, model.base_model_prefix)(input_ids=x.masked_fill(~mask, 0), attention_mask=mask,
                                                position_ids=pos, return_dict=True, output_hidden_states=True,
                                                use_cache=False).hidden_states[-1]
    return model.score(h)[:, -1, 0].double().numpy()


def prepare(spec: dict) -> dict:
  """(JAX child) HF exports of the base policy and the proxy's backbone, the prompt ids l2jax's iterations
  draw (prompts.json, for TRL), and check rows scored by the l2jax proxy (rm_check.json)."""
  from l2jax import checkpoint as ck
  from l2jax import config as c
  from l2jax import reward
  from l2jax.convert.hf import l2jax_to_hf
  from l2jax.data import prompts as prompts_lib
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.eval import gold_task
  from l2jax.experiment_refs import load_config
  from l2jax.sample import load_sampler
  from l2jax.stages import ppo
  work, run = Path(spec["work"]), Path(spec["run"])
  cfg: c.PPO = load_config(spec["ppo_spec"], spec["sets"])
  pol, rm_hf = work / "hf_policy", work / "hf_rm_lm"
  for d in (pol, rm_hf, work / "hf_rm"):
    shutil.rmtree(d, ignore_errors=True)   # this run's models only (a --workdir may hold another run's)
  l2jax_to_hf(cfg.policy, pol)
  export_rm_backbone(cfg.reward_models.helpful, rm_hf)
  for d in (pol, rm_hf):
    (d / "tokenizer_config.json").write_text(json.dumps(TOK_CONFIG))
  tok = Tokenizer(Path(cfg.policy) / ck.TOKENIZER)
  data = ppo.load_prompts(cfg.prompts, tok, cfg.seed)
  batches = prompts_lib.PromptBatches(data.train_ids, data.train, batch_size=cfg.batch_prompts,
                                      prompt_len=cfg.prompts.max_prompt_tokens, seed=cfg.seed, pad_id=tok.pad_id)
  ids = []
  for _ in range(cfg.iterations):
    b = next(batches)
    ids += [b["prompt_tokens"][i, :n].tolist() for i, n in enumerate(b["prompt_lens"])]
  (work / "prompts.json").write_text(json.dumps(ids))
  # check rows: base continuations of a few report openings, scored as the measurement scores them
  texts = gold_task.read_prompts(run / "prompts" / "report.jsonl")[:4]
  conts = gold_task.continuations(load_sampler(cfg.policy), texts, 2, cfg.max_new_tokens, 1.0, 12345)
  rm = reward.load(cfg.reward_models.helpful, batch_size=8)
  rows = gold_task.token_rows(conts)
  (work / "rm_check.json").write_text(json.dumps({"rows": rows, "l2jax": gold_task.proxy_scores(rm, conts, tok.eos_id)
                                                  .tolist(), "pad_id": tok.pad_id}))
  return {"prompts": len(data.train_ids), "drawn": len(ids), "mean_prompt_len": sum(map(len, ids)) / len(ids),
          "pad_id": tok.pad_id, "eos_id": tok.eos_id}


# ----------------------------------------------------------------------------------------------- the two sides

def run_l2jax(spec: dict) -> dict:
  """(JAX child) The PPO variant with the stage's sets into a fresh directory; per-iteration training seconds
  from its metrics.jsonl."""
  from l2jax import launch
  from l2jax.stages.overoptimization import _ppo_wall
  work = Path(spec["work"])
  d = work / spec.get("l2jax_dir", "l2jax_ppo")
  shutil.rmtree(d, ignore_errors=True)
  t0 = time.perf_counter()
  launch.launch(spec["ppo_spec"], spec["sets"], d)
  total = time.perf_counter() - t0
  wall = _ppo_wall(d)
  steps = sorted(wall)
  iter_s = [wall[s] - wall[p] for p, s in zip(steps, steps[1:])]
  rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
  rows = sorted((r for r in rows if "t_generate" in r), key=lambda r: r["step"])
  import jax
  med = lambda k: statistics.median(r[k] for r in rows[1:] or rows)
  return {"impl": f"l2jax (JAX {jax.__version__}, stages.ppo)", "wall_s": {str(k): v for k, v in wall.items()},
          "iter_s": iter_s, "phase_s": {"generate": med("t_generate"), "score": med("t_score"),
                                        "train": med("t_train")}, "process_s": total, "snapshots": str(d / "snapshots"),
          "train": {"step": [r["step"] for r in rows], "kl": [r["kl"] for r in rows],
                    "score": [r["rc"] for r in rows]}}


def decays(name: str, ndim: int) -> bool:
  """l2jax.train.decay_mask for an HF parameter: matrices and embeddings decay; RMSNorm gains, vectors and the
  scalar head (l2jax's w is a [dim] vector, HF's score.weight a [1, dim] matrix) do not."""
  return ndim >= 2 and "norm" not in name and not name.startswith("score.")


def _trl_optimizer(policy, value_model, b: dict, vf_coef: float):
  """(torch) AdamW over the policy's parameters (optim) and the value model's (value_optim with eps and the clip
  norm times vf_coef, so its steps are AdamW's on the unscaled value loss), weight decay masked as l2jax masks
  it, each model's gradient clipped to its global norm before the step (l2jax.train.make_optimizer:
  clip_by_global_norm then adamw, per model)."""
  import torch

  class ClippedAdamW(torch.optim.AdamW):
    def step(self, closure=None):
      for model in {g["model"] for g in self.param_groups}:
        gs = [g for g in self.param_groups if g["model"] == model]
        if gs[0]["clip"] > 0:
          torch.nn.utils.clip_grad_norm_([p for g in gs for p in g["params"] if p.grad is not None], gs[0]["clip"])
      return super().step(closure)

  groups = []
  for model, net, o, scale in (("policy", policy, b["optim"], 1.0), ("value", value_model, b["value_optim"], vf_coef)):
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    for decay in (True, False):
      ps = [p for n, p in named if decays(n, p.ndim) == decay]
      if ps:
        groups.append({"params": ps, "lr": o["lr"], "betas": (o["b1"], o["b2"]), "eps": o["eps"] * scale,
                       "weight_decay": o["weight_decay"] if decay else 0.0, "clip": o["clip"] * scale,
                       "model": model})
  opt = ClippedAdamW(groups)
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def iteration_clock(snaps: Path, steps_per_iter: int, every: int, n_iter: int, save, log_row):
  """(torch) A transformers TrainerCallback that times each iteration of `steps_per_iter` optimiser steps (wall
  time from the end of the previous one; the saves not timed) and saves the policy, `save(trainer, dir)`, into
  snaps/<iteration> (emptied first) every `every` iterations and at the last, n_iter; `log_row(state, logs)` turns
  a log into a row of .train_log (None: no row). Set .trainer once the trainer exists; .iter_s, .save_s and
  .wall_s() (training seconds up to each iteration) after training."""
  import transformers
  shutil.rmtree(snaps, ignore_errors=True)
  snaps.mkdir()

  class Clock(transformers.TrainerCallback):
    def __init__(self):
      self.trainer, self.marks, self.iter_s, self.save_s, self.train_log = None, [], [], [], []

    def on_train_begin(self, *a, **k):
      self.marks.append(time.perf_counter())

    def on_log(self, args_, state, control, logs=None, **k):
      row = log_row(state, logs or {})
      if row is not None:
        self.train_log.append(row)

    def on_step_end(self, args_, state, control, **k):
      if state.global_step % steps_per_iter:
        return
      t = time.perf_counter()
      self.iter_s.append(t - self.marks[-1])
      it = state.global_step // steps_per_iter
      if (every and it % every == 0) or it == n_iter:
        save(self.trainer, snaps / f"{it:06d}")
      t2 = time.perf_counter()
      self.save_s.append(t2 - t)
      self.marks.append(t2)

    def wall_s(self) -> dict:
      return {str(i): float(x) for i, x in enumerate(np.cumsum([0.0, *self.iter_s]))}

  return Clock()


def run_trl(spec: dict) -> dict:
  """(torch child) The exported proxy checked against l2jax's scores, then TRL's PPOTrainer on the same budget;
  the policy saved every eval_every iterations (HF dirs trl_snapshots/<iteration>), saves not timed."""
  import datasets
  import torch
  import transformers
  import trl
  from trl.experimental import utils as trl_utils
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as trl_ppo
  work, b = Path(spec["work"]), spec["budget"]
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(b["seed"])
  check = json.loads((work / "rm_check.json").read_text())
  rm = hf_reward_model(work / "hf_rm_lm")
  mine = hf_scores(rm, check["rows"], check["pad_id"])
  T = max(map(len, check["rows"]))   # TRL's own function too: left-padded rows, the score at the last position
  x = torch.tensor([[check["pad_id"]] * (T - len(r)) + r for r in check["rows"]])
  with torch.no_grad():
    theirs = trl_utils.get_reward(rm, x, check["pad_id"], T - 1)[1].double().numpy()
  err = float(max(np.max(np.abs(mine - check["l2jax"])), np.max(np.abs(theirs - check["l2jax"]))))
  if not err <= RM_TOLERANCE:
    raise AssertionError(f"HF export of the proxy RM scores {mine.tolist()} (TRL get_reward {theirs.tolist()}), "
                         f"l2jax {check['l2jax']}: max |diff| {err:.2e} > {RM_TOLERANCE}")
  rm.save_pretrained(work / "hf_rm")
  ids = json.loads((work / "prompts.json").read_text())
  tok = transformers.AutoTokenizer.from_pretrained(work / "hf_policy")
  tok.pad_token, tok.padding_side = "<unk>", "left"
  load = lambda: transformers.LlamaForCausalLM.from_pretrained(work / "hf_policy", dtype=torch.float32)
  policy, ref = load(), load()
  value = hf_reward_model(work / "hf_rm_lm")
  n_mb = b["batch_prompts"] // b["minibatch"]
  args = PPOConfig(output_dir=str(work / "trl_out"), per_device_train_batch_size=b["batch_prompts"],
                   gradient_accumulation_steps=1, num_mini_batches=n_mb, num_ppo_epochs=b["ppo_epochs"],
                   total_episodes=len(ids), local_rollout_forward_batch_size=b["batch_prompts"],
                   response_length=b["max_new_tokens"], stop_token="eos", temperature=b["temperature"],
                   missing_eos_penalty=b["missing_eos_penalty"] or None, kl_coef=b["kl_beta"], kl_estimator="k1",
                   cliprange=b["clip"], cliprange_value=b["value_clip"], gamma=b["gamma"], lam=b["lam"],
                   whiten_rewards=False, learning_rate=b["optim"]["lr"], lr_scheduler_type="constant",
                   num_sample_generations=0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                   report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=b["seed"],
                   dataloader_num_workers=0)
  optimizers = _trl_optimizer(policy, value, b, args.vf_coef)
  n_iter = b["iterations"]
  snaps = work / "trl_snapshots"
  clock = iteration_clock(
      snaps, 1, b["eval_every"], n_iter,
      lambda trainer, d: trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(d),
      lambda state, logs: ({"step": state.global_step, "kl": logs["objective/kl"], "score": logs["objective/scores"]}
                           if "objective/kl" in logs else None))
  if spec.get("trl_whiten_score"):
    inner = trl_ppo.get_reward

    def whitened_reward(model, *a, **k):
      out = inner(model, *a, **k)
      if model is not rm_ppo:
        return out
      s = out[1]   # l2jax's R~c: the score whitened over the batch (biased variance, eps 1e-8)
      return out[0], (s - s.mean()) * torch.rsqrt(s.var(unbiased=False) + 1e-8), out[2]
    trl_ppo.get_reward = whitened_reward
  gen_s: list[float] = []
  generation = trl_ppo.batch_generation

  def timed_generation(*a, **k):
    t = time.perf_counter()
    out = generation(*a, **k)
    gen_s.append(time.perf_counter() - t)
    return out
  trl_ppo.batch_generation = timed_generation
  rm_ppo = hf_reward_model(work / "hf_rm_lm")
  trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm_ppo,
                       train_dataset=datasets.Dataset.from_dict({"input_ids": ids}), value_model=value,
                       callbacks=[clock], optimizers=optimizers)
  clock.trainer = trainer
  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0
  iter_s, train_log = clock.iter_s, clock.train_log
  if len(iter_s) != n_iter:
    raise RuntimeError(f"TRL ran {len(iter_s)} iterations; expected {n_iter}")
  return {"impl": f"TRL {trl.__version__} PPOTrainer (torch {torch.__version__}, transformers "
                  f"{transformers.__version__})", "wall_s": clock.wall_s(), "iter_s": iter_s,
          "save_s": sum(clock.save_s),
          "phase_s": {"generate": statistics.median(gen_s[1:] or gen_s),
                      "score + train": statistics.median([t - g for t, g in zip(iter_s, gen_s)][1:] or iter_s)},
          "process_s": total, "rm_check_err": err, "rm_check_rows": len(check["rows"]),
          "torch_threads": torch.get_num_threads(), "snapshots": str(snaps),
          "whiten_score": bool(spec.get("trl_whiten_score")),
          "train": {"step": [x["step"] for x in train_log], "kl": [x["kl"] for x in train_log],
                    "score": [x["score"] for x in train_log]}}


# ----------------------------------------------------------------------------------------------- measurement

def measure(spec: dict) -> dict:
  """(JAX child) TRL's snapshots (and the base, as its iteration 0) converted to l2jax checkpoints; every
  snapshot of both sides measured by the stage's `_measure_dirs` (l2jax.eval.gold_task.measure)."""
  from l2jax import checkpoint as ck
  from l2jax import config as c
  from l2jax import gold as gold_lib
  from l2jax import reward
  from l2jax.convert.hf import hf_to_l2jax
  from l2jax.data.tokenizer import CHAT_FORMAT_FILE
  from l2jax.eval import gold_task
  from l2jax.stages.overoptimization import _measure_dirs
  work, run = Path(spec["work"]), Path(spec["run"])
  ov = c.from_dict(c.Overoptimization, json.loads((run / "config.json").read_text()))
  base = run / "base"
  conv = work / "trl_l2jax"
  shutil.rmtree(conv, ignore_errors=True)   # this run's snapshots only: nothing converted or measured is reused
  conv.mkdir()
  for side in ("l2jax", "trl"):
    (work / f"{side}_gold.json").unlink(missing_ok=True)
  hf = {"000000": work / "hf_policy", **{p.name: p for p in sorted(Path(spec["trl_snapshots"]).iterdir())}}
  trl_dirs = {}
  for name, src in hf.items():
    out = conv / name
    hf_to_l2jax(src, out, tokenizer=base / ck.TOKENIZER)
    if not (out / CHAT_FORMAT_FILE).is_file():
      shutil.copyfile(base / CHAT_FORMAT_FILE, out / CHAT_FORMAT_FILE)
    trl_dirs[name] = out
  l2_dirs = {p.name: p for p in sorted(Path(spec["l2jax_snapshots"]).iterdir()) if (p / ck.CONFIG).is_file()}
  label = f"{spec['proxy']} pairs"
  ctx = {"base_lm": gold_task.LM.load(base), "rms": {label: reward.load(run / f"proxy-{spec['proxy']}" / "final",
                                                                          batch_size=64)},
         "gold": gold_lib.load(ov.gold), "report": gold_task.read_prompts(run / "prompts" / "report.jsonl")}
  t0 = time.perf_counter()
  out = {}
  for side, dirs in (("l2jax", l2_dirs), ("trl", trl_dirs)):
    got = _measure_dirs(ov, work / f"{side}_gold.json", dirs, ctx)
    out[side] = {k: {**got[k], "proxy": got[k]["proxy"][label]} for k in sorted(got)}
  out["measure_s"] = time.perf_counter() - t0
  return out


# ----------------------------------------------------------------------------------------------- main

def side_curve(result: dict, measured: dict) -> dict:
  """One side's curve: snapshots in iteration order with KL, gold, its se, proxy and training minutes."""
  keys = sorted(measured, key=int)
  wall = {int(k): v for k, v in result["wall_s"].items()}
  iter_s = result["iter_s"]
  return {"step": [int(k) for k in keys], "kl": [measured[k]["kl"] for k in keys],
          "gold": [measured[k]["gold"] for k in keys], "gold_se": [measured[k]["gold_se"] for k in keys],
          "proxy": [measured[k]["proxy"] for k in keys], "minutes": [wall[int(k)] / 60 for k in keys],
          "s_per_iter": statistics.median(iter_s[1:] or iter_s), "first_iter_s": iter_s[0],
          "train_s": sum(iter_s)}


def stage_checks(stage_gold: Path, ms: dict, same_run: bool) -> float | None:
  """Print the l2jax rerun against the stage's own measurements (stage_gold, when the rerun is that run:
  `same_run`) and the HF round trip of the base; returns the largest |gold difference| over common snapshots."""
  repro = None
  if stage_gold.is_file() and same_run:   # the stage ran this config: the rerun reproduces it
    old = json.loads(stage_gold.read_text())
    common = sorted(set(old) & set(ms["l2jax"]))
    if common:
      repro = max(abs(old[k]["gold"] - ms["l2jax"][k]["gold"]) for k in common)
      print(f"l2jax rerun vs the stage's {stage_gold}: max |gold difference| {repro:.4f} over {len(common)} snapshots")
  trl0, l20 = ms["trl"].get("000000"), ms["l2jax"].get("000000")
  if trl0 and l20:
    print(f"round trip: the base through HF and back measures gold {trl0['gold']:.4f}, KL {trl0['kl']:.2e} "
          f"(l2jax's iteration 0: {l20['gold']:.4f})")
  return repro


def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py gold", description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True, help="the over-optimisation run directory (experiments/overoptimization.py)")
  p.add_argument("--proxy", type=int, help="the proxy's training pairs N (RUN_DIR/proxy-N; default the largest)")
  p.add_argument("--iters", type=int, help="PPO iterations on both sides (default: the PPO variant's)")
  p.add_argument("--seed", type=int, help="PPO seed on both sides (default: the PPO variant's; it also orders the "
                 "prompts l2jax draws and TRL gets); the measurement's seed stays the benchmark's")
  p.add_argument("--points", type=int, default=4, help="matched KL values compared")
  p.add_argument("--trl-whiten-score", action="store_true",
                 help="whiten TRL's reward-model score over the batch, as l2jax's R~c (a patch of TRL's get_reward)")
  p.add_argument("--torch-threads", type=int, help="torch's intra-op threads on the TRL side (default: torch's, "
                 "the cores); on a busy machine 1 avoids OpenMP waits that slow small matmuls up to 50x")
  p.add_argument("--workdir", help="exports, runs, snapshots and logs (default: a temp dir, removed)")
  p.add_argument("--json", help="also write the results to this JSON file")
  p.add_argument("--report-only", action="store_true",
                 help="run nothing: report the finished children's results in --workdir (loads.json, if there)")
  a = p.parse_args(argv)
  if a.report_only and not a.workdir:
    p.error("--report-only needs --workdir")
  if a.iters is not None and a.iters < 1:
    p.error(f"--iters {a.iters}: expected >= 1")
  return a


def run(argv: list[str]) -> dict:
  a = _args(argv)
  run_dir = Path(a.run).resolve()
  ov, proxy, ppo_spec, sets, pcfg = load_budget(run_dir, a.proxy, a.iters, a.seed)
  budget = trl_settings(pcfg)
  if a.report_only:
    work = Path(a.workdir).resolve()
    got = {r: json.loads((work / f"{r}.result.json").read_text()) for r in ("prepare", "l2jax", "trl", "measure")}
    loads = json.loads((work / "loads.json").read_text()) if (work / "loads.json").is_file() else {}
    return report(a, run_dir, ov, proxy, ppo_spec, sets, pcfg, budget, loads, *got.values())
  if not trl_available():
    raise SystemExit("bench gold: TRL is not installed here (pip install -e '.[bench]' into its own venv)")
  tmp = None if a.workdir else tempfile.mkdtemp(prefix="bench_gold_")
  work = Path(a.workdir or tmp).resolve()
  work.mkdir(parents=True, exist_ok=True)
  spec = {"work": str(work), "run": str(run_dir), "proxy": proxy, "ppo_spec": ppo_spec, "sets": sets,
          "budget": budget, "trl_whiten_score": a.trl_whiten_score, "torch_threads": a.torch_threads}
  loads = {"start": load_avg()}
  try:
    prep = child(__file__, "prepare", spec)
    loads["prepared"] = load_avg()
    l2 = child(__file__, "l2jax", spec)
    loads["l2jax"] = load_avg()
    tr = child(__file__, "trl", spec)
    loads["trl"] = load_avg()
    ms = child(__file__, "measure", {**spec, "l2jax_snapshots": l2["snapshots"], "trl_snapshots": tr["snapshots"]})
    loads["measured"] = load_avg()
    (work / "loads.json").write_text(json.dumps(loads))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return report(a, run_dir, ov, proxy, ppo_spec, sets, pcfg, budget, loads, prep, l2, tr, ms)


def report(a, run_dir, ov, proxy, ppo_spec, sets, pcfg, budget, loads, prep, l2, tr, ms) -> dict:
  """Print the comparison of the children's results and write --json; returns the results."""
  cores = os.cpu_count() or 1
  sides = {"l2jax": side_curve(l2, ms["l2jax"]), "trl": side_curve(tr, ms["trl"])}
  cmp = compare(sides, a.points)
  summary = {k: {**gold_per_minute(s["gold"], s["minutes"]), "s_per_iter": s["s_per_iter"],
                 "first_iter_s": s["first_iter_s"], "train_s": s["train_s"]} for k, s in sides.items()}
  ratio = sides["l2jax"]["s_per_iter"] / sides["trl"]["s_per_iter"]
  timed = [float(loads[k].split()[0]) for k in ("prepared", "l2jax", "trl") if k in loads]   # around the timed runs
  busy = bool(timed) and max(timed) > cores
  b = budget
  print(f"gold {run_dir.name}, proxy {proxy} pairs: {b['iterations']} PPO iterations of {b['batch_prompts']} "
        f"prompts (minibatch {b['minibatch']}) x {b['max_new_tokens']} new tokens, kl_beta {b['kl_beta']}, lr "
        f"{b['optim']['lr']:g} / value {b['value_optim']['lr']:g}, snapshots every {b['eval_every']}; measured on "
        f"{ov.report_prompts} report openings x {ov.measure_samples} (gold {ov.gold})")
  if sets[len(ppo_sets(ov, run_dir, proxy)):]:
    print(f"  PPO sets beyond the stage's (--iters, --seed, what {run_dir.name}/ppo-{proxy}/config.json recorded): "
          f"{' '.join(sets[len(ppo_sets(ov, run_dir, proxy)):])}")
  print(f"  l2jax: {l2['impl']}; TRL: {tr['impl']}, {tr['torch_threads']} threads"
        f"{', score whitened' if tr['whiten_score'] else ''}; "
        f"proxy export checked on {tr['rm_check_rows']} rows: max |diff| {tr['rm_check_err']:.1e}")
  print(table(sides, cmp, summary))
  tag = " (load > cores around the timed runs: contended)" if busy else ""
  phases = lambda r: ", ".join(f"{k} {v:.3f}" for k, v in r.get("phase_s", {}).items()) or "-"
  print(f"median s per iteration by phase: l2jax {phases(l2)}; TRL {phases(tr)}")
  print(f"l2jax / TRL time per iteration: {ratio:.2f}{tag}; load average (1, 5, 15 min) "
        + ", ".join(f"{k} {v}" for k, v in loads.items()) + f"; {cores} cores")
  goal_gold = "yes" if cmp["gold_at_least"] else ("within 2 se" if cmp["gold_within_2se"] else "no")
  print(f"goal: l2jax gold >= TRL's at every matched KL: {goal_gold}; in at most half the time per iteration: "
        f"{'yes' if ratio <= 0.5 else 'no'}; at most half the minutes to each matched KL: "
        f"{'yes' if cmp['half_time'] else 'no'}")
  total_ratio = sides["l2jax"]["train_s"] / sides["trl"]["train_s"]
  print(f"l2jax / TRL training time, all {b['iterations']} iterations (l2jax's compilation in its first): "
        f"{total_ratio:.2f}")
  repro = stage_checks(run_dir / f"ppo-{proxy}" / "gold.json", ms, a.iters is None and a.seed is None)
  results = {"run": str(run_dir), "proxy": proxy, "ppo_spec": ppo_spec, "sets": sets, "budget": budget,
             "prepare": prep, "sides": sides, "matched": cmp, "summary": summary, "time_ratio": ratio,
             "train_time_ratio": total_ratio, "stage_rerun_max_gold_diff": repro,
             "load_avg": loads, "cores": cores, "contended": busy, "measure_s": ms["measure_s"],
             "l2jax": {k: v for k, v in l2.items() if k != "snapshots"},
             "trl": {k: v for k, v in tr.items() if k != "snapshots"}, "measured": {k: ms[k] for k in ("l2jax", "trl")}}
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2))
  return results


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["_child"]:
    return child_main(argv[1:], {"prepare": prepare, "l2jax": run_l2jax, "trl": run_trl, "measure": measure})
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
