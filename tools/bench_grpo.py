#!/usr/bin/env python
"""Benchmark `grpo`: time per iteration and gold reward at matched KL of l2jax's GRPO (`PPO.estimator="grpo"`)
against TRL's GRPOTrainer, on the known-gold over-optimisation benchmark (experiments/overoptimization.py), the
same task, models, prompts and budget on both sides.

  python tools/bench.py grpo --run RUN_DIR [--trl-python PY] [--proxy N] [--iters K] [--seed S] [--repeats R]
      [--points 4] [--torch-threads T] [--json F] [--workdir D [--report-only]]

RUN_DIR: an over-optimisation run through its proxies (any variant; `tiny-compare` trains one proxy, 4096 pairs,
and runs GRPO on it; about 6 minutes on 2 CPU cores with only best-of-n and GRPO:
  python -m l2jax.launch experiments/overoptimization.py:tiny-compare --set 'methods=["best-of-n","grpo"]' \
      --run-dir runs/overoptimization-tiny-grpo
). The budget is the GRPO run
the stage launches against proxy N (`<cfg.grpo>` with the stage's sets, bench_gold.load_budget with method
"grpo"; --iters / --seed replace its iterations / seed; what RUN_DIR/grpo-N/config.json recorded is set).
TRL: its newest release has no PPOTrainer (trl 1.12, the bench extra, is the last), so it lives in its own venv
and runs the TRL child through --trl-python (default: this interpreter, if it imports trl's GRPOTrainer):
  python3 -m venv /tmp/trl116 && /tmp/trl116/bin/pip install trl==1.16.0 torch==2.13.0 datasets accelerate \\
      sentencepiece protobuf    # torch's CPU wheel (--extra-index-url https://download.pytorch.org/whl/cpu)
  python tools/bench.py grpo --run runs/overoptimization-tiny-grpo --trl-python /tmp/trl116/bin/python
The JAX children (export, l2jax's run, the measurement) run in this interpreter (l2jax, JAX, torch, transformers).
Both sides get: the base policy (RUN_DIR/base; TRL's an HF export of it), the proxy reward model (TRL's reward
function is a callable scoring the token rows [prompt | completion] with the HF export of the proxy,
bench_gold.hf_reward_model / hf_scores, checked against l2jax.reward within 1e-4 before training), the training
prompts l2jax's iterations draw, as token ids and in that order (TRL's dataset holds them as JSON strings that a
GRPOTrainer subclass tokenises back to the ids; shuffle_dataset off; checked per generation), and the mapped budget
(grpo_config_kwargs): num_generations = group_size; a generation of batch_prompts * group_size rows
(steps_per_generation = batch_prompts / micro-batch, per_device_train_batch_size = micro-batch rows,
gradient_accumulation_steps = minibatch / micro-batch: one optimiser step per l2jax mini-batch, the same rows
per step, drawn from a shuffle of the generation); num_iterations = ppo_epochs; beta = kl_beta with the k3 KL in
the loss (l2jax's grpo default kl_in="") and use_bias_correction_kl off (TRL 1.16 multiplies the k3 term by the
importance ratio by default, DeepSeek-V3.2's correction; l2jax's is DeepSeekMath's plain k3), the reference fixed;
epsilon = clip (both sides of the ratio), no entropy bonus, no off-policy masking; loss_type "grpo" for l2jax's
loss_normalization "sequence" (its grpo default: the mean over responses of their token means) or "bnpo" for "token";
scale_rewards "group" (both: group std, unbiased, + 1e-4); max_completion_length = max_new_tokens, temperature,
top_p 1, top_k 0, no vLLM, float32 on the CPU, no gradient checkpointing; AdamW (lr, betas, eps, weight decay on
matrices and embeddings only, checked against l2jax's mask) with the gradient clipped to its global norm, a
constant schedule; missing_eos_penalty subtracted in the reward function where a completion does not end with EOS
(l2jax's rule; TRL's mask_truncated_completions stays off).
Time per iteration: l2jax t_generate + t_score + t_train of metrics.jsonl (bench_gold.run_l2jax; held-out
evaluations and saves outside). TRL: wall time per generation round (its optimiser steps of one generation,
snapshot saves outside; its logging falls in the next round), split into generate (`_generate`), score (the
rest of `_generate_and_score_completions`: the old and reference log-probs, the reward function, advantages) and
train (the rest: the updates). Medians over iterations 2.. of each run; with --repeats R > 1 the runs interleave
(l2jax, TRL, l2jax, ...) and the table gives the median over runs (min-max); the 1-minute load average is
recorded before and after each run and the ratio flagged when it exceeds the cores. Gold: the first run's
snapshots (every eval_every iterations) of both sides measured by the stage's own `_measure_dirs`
(bench_gold.measure): gold, proxy score, KL(policy || base); gold at matched KL, peak gold (bench_gold.compare).
Still different: the RNGs (sampling); TRL generates with HF `generate` (KV cache, stops at EOS) where l2jax
decodes its own way (the same distribution); TRL also computes the entropy in its update; with ppo_epochs > 1 TRL
reuses one split of the generation for every epoch where l2jax draws a new permutation; with micro_batch > 0 and
loss_normalization "token", TRL's "bnpo" averages the micro-batches' token means where l2jax takes the mini-batch's
token mean (equal without micro-batches; "sequence" is equal either way); l2jax runs held-out evaluations every
eval_every iterations (not timed), TRL none. Contention: under a load above the cores, torch's threads wait on
each other and TRL's iterations slow down up to tenfold and vary (XLA's much less): read the per-iteration
figures only from a quiet machine (--torch-threads 1 softens it; the default is torch's own).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gold import (RM_TOLERANCE, compare, decays, gold_per_minute, hf_reward_model, hf_scores,  # noqa: E402
                        iteration_clock, load_budget, measure, ppo_sets, prepare, run_l2jax, side_curve,
                        stage_checks, table)
from bench_ppo import child, child_main, load_avg  # noqa: E402

METHOD = "grpo"
TRL_INSTALL = ("python3 -m venv /tmp/trl116 && /tmp/trl116/bin/pip install trl==1.16.0 torch datasets accelerate "
               "sentencepiece protobuf; then pass --trl-python /tmp/trl116/bin/python")


# ----------------------------------------------------------------------------------------------- pure pieces

def grpo_settings(p) -> dict:
  """The GRPO config's budget as TRL's GRPOTrainer is given it; one error naming what TRL cannot be given."""
  bad = []
  if p.estimator != "grpo":
    bad.append(f"estimator={p.estimator!r} (TRL's GRPOTrainer is GRPO)")
  if p.kl_placement != "loss":
    bad.append(f"kl_in={p.kl_in!r} (TRL's GRPOTrainer has the KL in the loss only, k3)")
  if p.optim.schedule != "constant" or p.optim.warmup_steps:
    bad.append(f"optim: schedule {p.optim.schedule!r} with {p.optim.warmup_steps} warmup steps (only constant, "
               f"no warmup)")
  if p.top_p != 1.0:
    bad.append(f"top_p={p.top_p}")
  if bad:
    raise ValueError(f"bench grpo: the GRPO config has settings not mapped to TRL: {'; '.join(bad)}")
  return {"iterations": p.iterations, "batch_prompts": p.batch_prompts, "group_size": p.group_size,
          "minibatch": p.minibatch, "micro_batch": p.micro_batch, "ppo_epochs": p.ppo_epochs,
          "max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "kl_beta": p.kl_beta, "clip": p.clip,
          "normalization": p.normalization, "missing_eos_penalty": p.missing_eos_penalty,
          "eval_every": p.eval_every, "seed": p.seed,
          "optim": {k: getattr(p.optim, k) for k in ("lr", "b1", "b2", "eps", "weight_decay", "clip")}}


def steps_per_iteration(b: dict) -> int:
  """Optimiser steps per GRPO iteration on both sides: ppo_epochs * batch_prompts / minibatch."""
  return b["ppo_epochs"] * b["batch_prompts"] // b["minibatch"]


def grpo_config_kwargs(b: dict, output_dir: str) -> dict:
  """TRL GRPOConfig keyword arguments for the budget `b` (grpo_settings): the same rows per generation, per
  optimiser step and per micro-batch, the same objective, sampling and optimiser (module docstring)."""
  k = b["group_size"]
  micro = b["micro_batch"] or b["minibatch"]   # prompts per forward / backward pass
  o = b["optim"]
  return {
      "output_dir": output_dir,
      # rows: a generation of batch_prompts * k rows, one optimiser step per mini-batch of minibatch * k rows
      "num_generations": k, "per_device_train_batch_size": micro * k,
      "gradient_accumulation_steps": b["minibatch"] // micro, "steps_per_generation": b["batch_prompts"] // micro,
      "num_iterations": b["ppo_epochs"], "max_steps": b["iterations"] * steps_per_iteration(b),
      "shuffle_dataset": False,
      # sampling
      "max_completion_length": b["max_new_tokens"], "temperature": b["temperature"], "top_p": 1.0, "top_k": 0,
      "min_p": None, "repetition_penalty": 1.0, "use_vllm": False, "use_transformers_continuous_batching": False,
      # objective
      "beta": b["kl_beta"], "use_bias_correction_kl": False, "sync_ref_model": False, "epsilon": b["clip"],
      "epsilon_high": None, "delta": None, "importance_sampling_level": "token",
      "loss_type": {"sequence": "grpo", "token": "bnpo"}[b["normalization"]], "scale_rewards": "group",
      "mask_truncated_completions": False, "top_entropy_quantile": 1.0, "entropy_coef": 0.0,
      "use_adaptive_entropy": False, "off_policy_mask_threshold": None,
      # optimiser
      "learning_rate": o["lr"], "adam_beta1": o["b1"], "adam_beta2": o["b2"], "adam_epsilon": o["eps"],
      "weight_decay": o["weight_decay"], "max_grad_norm": o["clip"], "lr_scheduler_type": "constant",
      "warmup_steps": 0, "optim": "adamw_torch",
      # numerics, device, bookkeeping
      "bf16": False, "fp16": False, "gradient_checkpointing": False, "use_cpu": True, "seed": b["seed"],
      "report_to": [], "save_strategy": "no", "logging_steps": steps_per_iteration(b), "disable_tqdm": True,
      "dataloader_num_workers": 0, "log_completions": False,
  }


def sequence_rewards(scores, completion_ids, eos_id: int, missing_eos_penalty: float) -> list[float]:
  """l2jax's GRPO sequence reward (rollout.make_group_score, kl_in="loss"): the proxy's raw score minus
  missing_eos_penalty where the completion does not end with EOS."""
  return [float(s) - (missing_eos_penalty if not c or c[-1] != eos_id else 0.0)
          for s, c in zip(scores, completion_ids, strict=True)]


def phase_split(iter_s, gen_s, gen_score_s) -> dict:
  """Per-iteration phases (TRL): generate, score (generate-and-score minus generate) and train (the rest)."""
  if not len(iter_s) == len(gen_s) == len(gen_score_s):
    raise ValueError(f"phase_split: {len(iter_s)} iterations, {len(gen_s)} generations, {len(gen_score_s)} scorings")
  return {"generate": list(gen_s), "score": [g2 - g for g, g2 in zip(gen_s, gen_score_s)],
          "train": [t - g2 for t, g2 in zip(iter_s, gen_score_s)]}


def steady_median(xs) -> float:
  """Median of a per-iteration list without its first iteration (compilation, first calls) when it has more."""
  return statistics.median(xs[1:] or xs)


def spread(xs) -> dict:
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _spread_text(s: dict, fmt: str = ".3f") -> str:
  return format(s["median"], fmt) + (f" ({s['min']:{fmt}}-{s['max']:{fmt}})" if s["n"] > 1 else "")


def timing(runs: dict) -> dict:
  """{side: {"s_per_iter", "generate", "score", "train", "first_iter_s", "train_s"}: spreads over the runs} from
  each run's per-iteration lists (steady medians)."""
  out = {}
  for side, rs in runs.items():
    out[side] = {"s_per_iter": spread([steady_median(r["iter_s"]) for r in rs]),
                 **{k: spread([r["phase_s"][k] for r in rs]) for k in ("generate", "score", "train")},
                 "first_iter_s": spread([r["iter_s"][0] for r in rs]),
                 "train_s": spread([sum(r["iter_s"]) for r in rs])}
  return out


def timing_table(t: dict, impl: dict) -> str:
  out = ["| side | s / iteration | generate s | score s | train s | first iteration s | all iterations s |",
         "|---|---:|---:|---:|---:|---:|---:|"]
  for side, s in t.items():
    out.append(f"| {impl[side]} | " + " | ".join(_spread_text(s[k]) for k in ("s_per_iter", "generate", "score",
                                                                            "train")) +
               f" | {_spread_text(s['first_iter_s'], '.2f')} | {_spread_text(s['train_s'], '.1f')} |")
  return "\n".join(out)


def contended(loads: dict, cores: int) -> bool:
  """True when the 1-minute load average exceeded the cores before or after any timed run."""
  return any(float(v.split()[0]) > cores for k, v in loads.items() if k.startswith(("l2jax", "trl", "prepared")))


# ----------------------------------------------------------------------------------------------- TRL

def trl_version(python: str) -> str | None:
  """TRL's version where `python` imports trl's GRPOTrainer (and torch, transformers, datasets), else None."""
  code = "import torch, transformers, datasets, trl; from trl import GRPOTrainer; print(trl.__version__)"
  try:
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


@contextlib.contextmanager
def _python(exe: str):
  """bench_ppo.child runs sys.executable: this interpreter for the JAX children, `exe` for TRL's."""
  old, sys.executable = sys.executable, exe
  try:
    yield
  finally:
    sys.executable = old


def run_trl(spec: dict) -> dict:
  """(torch child, --trl-python) The exported proxy checked against l2jax's scores, then TRL's GRPOTrainer on the
  same budget; the policy saved every eval_every iterations (HF dirs <trl_dir>/<iteration>), saves not timed."""
  import datasets
  import torch
  import transformers
  import trl
  from trl import GRPOConfig, GRPOTrainer
  work, b = Path(spec["work"]), spec["budget"]
  if spec.get("torch_threads"):
    torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(b["seed"])
  check = json.loads((work / "rm_check.json").read_text())
  pad_id, eos_id = check["pad_id"], spec["eos_id"]
  rm = hf_reward_model(work / "hf_rm_lm")
  mine = hf_scores(rm, check["rows"], pad_id)
  err = float(np.max(np.abs(mine - check["l2jax"])))
  if not err <= RM_TOLERANCE:
    raise AssertionError(f"HF export of the proxy RM scores {mine.tolist()}, l2jax {check['l2jax']}: max |diff| "
                         f"{err:.2e} > {RM_TOLERANCE}")
  ids = json.loads((work / "prompts.json").read_text())
  tok = transformers.AutoTokenizer.from_pretrained(work / "hf_policy")
  tok.pad_token, tok.padding_side = "<unk>", "left"
  policy = transformers.LlamaForCausalLM.from_pretrained(work / "hf_policy", dtype=torch.float32)
  k, S, every, n_iter = b["group_size"], steps_per_iteration(b), b["eval_every"], b["iterations"]
  kwargs = grpo_config_kwargs(b, str(work / "trl_out"))
  args = GRPOConfig(**kwargs)
  seen: list[list[str]] = []   # each generation's prompts (one per group), against the ids l2jax draws

  def proxy_rm(prompts, completions, completion_ids, **_):
    """l2jax's sequence reward: the proxy's raw score of [prompt | completion] (EOS kept), minus
    missing_eos_penalty where the completion does not end with EOS."""
    seen.append(list(prompts[::k]))
    rows = [json.loads(p) + list(c) for p, c in zip(prompts, completion_ids)]
    return sequence_rewards(hf_scores(rm, rows, pad_id), completion_ids, eos_id, b["missing_eos_penalty"])

  gen_s: list[float] = []
  gen_score_s: list[float] = []

  class IdsGRPOTrainer(GRPOTrainer):
    """Prompts are JSON lists of token ids (l2jax's own tokenisation, no text round trip); generation and the
    generate-and-score step timed."""

    def _tokenize_prompts(self, prompts):
      return [json.loads(p) for p in prompts], None, {}

    def _generate(self, prompts):
      t = time.perf_counter()
      out = super()._generate(prompts)
      gen_s.append(time.perf_counter() - t)
      return out

    def _generate_and_score_completions(self, inputs):
      t = time.perf_counter()
      out = super()._generate_and_score_completions(inputs)
      gen_score_s.append(time.perf_counter() - t)
      return out

  snaps = work / spec.get("trl_dir", "trl_snapshots")
  clock = iteration_clock(
      snaps, S, every, n_iter, lambda trainer, d: trainer.accelerator.unwrap_model(trainer.model).save_pretrained(d),
      lambda state, logs: ({"iteration": state.global_step // S, "kl": logs.get("kl"), "reward": logs["reward"]}
                           if "reward" in logs else None))
  trainer = IdsGRPOTrainer(model=policy, reward_funcs=[proxy_rm], args=args, processing_class=tok,
                           train_dataset=datasets.Dataset.from_dict({"prompt": [json.dumps(x) for x in ids]}),
                           callbacks=[clock])
  clock.trainer = trainer
  want_decay = {n for n, p in policy.named_parameters() if decays(n, p.ndim)}
  decay_ok = (set(trainer.get_decay_parameter_names(policy)) & {n for n, _ in policy.named_parameters()}) == want_decay
  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0
  iter_s, train_log = clock.iter_s, clock.train_log
  if len(iter_s) != n_iter or len(gen_s) != n_iter:
    raise RuntimeError(f"TRL ran {len(iter_s)} iterations ({len(gen_s)} generations); expected {n_iter}")
  P = b["batch_prompts"]
  same_prompts = [[json.loads(p) for p in g] for g in seen] == [ids[i * P:(i + 1) * P] for i in range(n_iter)]
  phases = phase_split(iter_s, gen_s, gen_score_s)
  a = trainer.args
  return {"impl": f"TRL {trl.__version__} GRPOTrainer (torch {torch.__version__}, transformers "
                  f"{transformers.__version__})", "trl_version": trl.__version__, "wall_s": clock.wall_s(),
          "iter_s": iter_s, "phase_s": {k: steady_median(v) for k, v in phases.items()}, "phases": phases,
          "save_s": sum(clock.save_s), "process_s": total, "rm_check_err": err, "rm_check_rows": len(check["rows"]),
          "torch_threads": torch.get_num_threads(), "snapshots": str(snaps), "prompts_as_l2jax": same_prompts,
          "decay_mask_as_l2jax": decay_ok, "use_vllm": bool(a.use_vllm), "device": str(a.device),
          "config": {x: getattr(a, x) for x in ("num_generations", "per_device_train_batch_size",
                                                "gradient_accumulation_steps", "steps_per_generation",
                                                "generation_batch_size", "num_iterations", "max_steps", "beta",
                                                "use_bias_correction_kl", "epsilon", "loss_type", "scale_rewards",
                                                "max_completion_length", "temperature", "learning_rate",
                                                "max_grad_norm", "weight_decay")},
          "train": {"iteration": [x["iteration"] for x in train_log], "kl": [x["kl"] for x in train_log],
                    "reward": [x["reward"] for x in train_log]}}


# ----------------------------------------------------------------------------------------------- main

def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py grpo", description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True, help="the over-optimisation run directory (experiments/overoptimization.py)")
  p.add_argument("--trl-python", help="the Python whose TRL (GRPOTrainer) runs TRL's side (default: this one)")
  p.add_argument("--proxy", type=int, help="the proxy's training pairs N (RUN_DIR/proxy-N; default the largest)")
  p.add_argument("--iters", type=int, help="GRPO iterations on both sides (default: the GRPO variant's)")
  p.add_argument("--seed", type=int, help="GRPO seed on both sides (default: the variant's; it also orders the "
                 "prompts); the measurement's seed stays the benchmark's")
  p.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved (l2jax, TRL, l2jax, ...); the "
                 "first run's snapshots are measured")
  p.add_argument("--points", type=int, default=4, help="matched KL values compared")
  p.add_argument("--torch-threads", type=int, help="torch's intra-op threads on the TRL side (default: torch's)")
  p.add_argument("--workdir", help="exports, runs, snapshots and logs (default: a temp dir, removed)")
  p.add_argument("--json", help="also write the results to this JSON file")
  p.add_argument("--report-only", action="store_true", help="run nothing: report the finished --workdir")
  a = p.parse_args(argv)
  if a.report_only and not a.workdir:
    p.error("--report-only needs --workdir")
  if a.iters is not None and a.iters < 1:
    p.error(f"--iters {a.iters}: expected >= 1")
  if a.repeats < 1:
    p.error(f"--repeats {a.repeats}: expected >= 1")
  return a


def run(argv: list[str]) -> dict:
  a = _args(argv)
  run_dir = Path(a.run).resolve()
  ov, proxy, spec_ref, sets, gcfg = load_budget(run_dir, a.proxy, a.iters, a.seed, METHOD)
  budget = grpo_settings(gcfg)
  if a.report_only:
    work = Path(a.workdir).resolve()
    got = json.loads((work / "bench_grpo.json").read_text())
    return report(a, run_dir, ov, proxy, spec_ref, sets, budget, got["loads"], got["prepare"], got["runs"],
                  got["measure"])
  python = a.trl_python or sys.executable
  version = trl_version(python)
  if version is None:
    raise SystemExit(f"bench grpo: {python} does not import trl's GRPOTrainer (with torch, transformers, "
                     f"datasets). Install TRL into its own venv: {TRL_INSTALL}")
  tmp = None if a.workdir else tempfile.mkdtemp(prefix="bench_grpo_")
  work = Path(a.workdir or tmp).resolve()
  work.mkdir(parents=True, exist_ok=True)
  spec = {"work": str(work), "run": str(run_dir), "proxy": proxy, "ppo_spec": spec_ref, "sets": sets,
          "budget": budget, "torch_threads": a.torch_threads}
  loads = {"start": load_avg()}
  runs: dict[str, list[dict]] = {"l2jax": [], "trl": []}
  try:
    prep = child(__file__, "prepare", spec)
    spec["eos_id"] = prep["eos_id"]
    loads["prepared"] = load_avg()
    for r in range(a.repeats):   # interleaved: l2jax, TRL, l2jax, TRL, ...
      runs["l2jax"].append(child(__file__, "l2jax", {**spec, "l2jax_dir": f"l2jax_grpo-{r}"}))
      loads[f"l2jax#{r + 1}"] = load_avg()
      with _python(python):
        runs["trl"].append(child(__file__, "trl", {**spec, "trl_dir": f"trl_snapshots-{r}"}))
      loads[f"trl#{r + 1}"] = load_avg()
    ms = child(__file__, "measure", {**spec, "l2jax_snapshots": runs["l2jax"][0]["snapshots"],
                                     "trl_snapshots": runs["trl"][0]["snapshots"]})
    loads["measured"] = load_avg()
    (work / "bench_grpo.json").write_text(json.dumps({"loads": loads, "prepare": prep, "runs": runs, "measure": ms}))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  return report(a, run_dir, ov, proxy, spec_ref, sets, budget, loads, prep, runs, ms)


def report(a, run_dir, ov, proxy, spec_ref, sets, budget, loads, prep, runs, ms) -> dict:
  """Print the comparison (timing table, gold at matched KL) and write --json; returns the results."""
  cores = os.cpu_count() or 1
  b = budget
  l2, tr = runs["l2jax"][0], runs["trl"][0]
  t = timing(runs)
  sides = {"l2jax": side_curve(l2, ms["l2jax"]), "trl": side_curve(tr, ms["trl"])}
  cmp = compare(sides, a.points)
  summary = {k: {**gold_per_minute(s["gold"], s["minutes"]), "s_per_iter": t[k]["s_per_iter"]["median"],
                 "first_iter_s": s["first_iter_s"], "train_s": s["train_s"]} for k, s in sides.items()}
  speedup = t["trl"]["s_per_iter"]["median"] / t["l2jax"]["s_per_iter"]["median"]
  busy = contended(loads, cores)
  c = tr["config"]
  print(f"grpo {run_dir.name}, proxy {proxy} pairs: {b['iterations']} GRPO iterations of {b['batch_prompts']} prompts "
        f"x {b['group_size']} samples x <= {b['max_new_tokens']} new tokens, {steps_per_iteration(b)} optimiser steps "
        f"of {b['minibatch'] * b['group_size']} rows each, kl_beta {b['kl_beta']} (k3 in the loss), clip {b['clip']}, "
        f"lr {b['optim']['lr']:g}, loss {b['normalization']}-mean, snapshots every {b['eval_every']}; measured on "
        f"{ov.report_prompts} report openings x {ov.measure_samples} (gold {ov.gold})")
  extra = sets[len(ppo_sets(ov, run_dir, proxy, METHOD)):]
  if extra:
    print(f"  sets beyond the stage's (--iters, --seed, what {run_dir.name}/{METHOD}-{proxy}/config.json recorded): "
          f"{' '.join(extra)}")
  print(f"  l2jax: {l2['impl']}; TRL: {tr['impl']}, {tr['torch_threads']} threads, device {tr['device']}, vLLM "
        f"{'on' if tr['use_vllm'] else 'off'}")
  print("  GRPOConfig: " + ", ".join(f"{k}={v}" for k, v in c.items()))
  print(f"  proxy export checked on {tr['rm_check_rows']} rows: max |diff| {tr['rm_check_err']:.1e}; TRL's prompts "
        f"those of l2jax's iterations, in order: {'yes' if tr['prompts_as_l2jax'] else 'NO'}; weight-decay mask as "
        f"l2jax's: {'yes' if tr['decay_mask_as_l2jax'] else 'NO'}")
  impl = {"l2jax": "l2jax", "trl": f"TRL {tr['trl_version']}"}
  print(f"time per iteration, median of iterations 2-{b['iterations']} per run; {len(runs['l2jax'])} run(s) per "
        f"side: median (min-max) over runs")
  print(timing_table(t, impl))
  tag = (f"  [CONTENDED: the 1-min load average exceeded {cores} cores around a timed run; not a quiet-machine "
         f"figure]" if busy else "")
  print(f"TRL / l2jax time per iteration: {speedup:.2f}x (goal >= 2: {'yes' if speedup >= 2 else 'no'}){tag}")
  print("load average (1, 5, 15 min): " + ", ".join(f"{k} {v}" for k, v in loads.items()) + f"; {cores} cores")
  print(table(sides, cmp, summary))
  goal_gold = "yes" if cmp["gold_at_least"] else ("within 2 se" if cmp["gold_within_2se"] else "no")
  print(f"goal: l2jax gold >= TRL's at every matched KL: {goal_gold}; at least 2x TRL's speed per iteration: "
        f"{'yes' if speedup >= 2 else 'no'}{' (contended)' if busy else ''}")
  repro = stage_checks(run_dir / f"{METHOD}-{proxy}" / "gold.json", ms, a.iters is None and a.seed is None)
  results = {"run": str(run_dir), "proxy": proxy, "spec": spec_ref, "sets": sets, "budget": budget,
             "prepare": prep, "timing": t, "speedup": speedup, "sides": sides, "matched": cmp, "summary": summary,
             "stage_rerun_max_gold_diff": repro, "load_avg": loads, "cores": cores, "contended": busy,
             "measure_s": ms["measure_s"], "runs": {k: [{x: y for x, y in r.items() if x != "snapshots"} for r in v]
                                                    for k, v in runs.items()},
             "measured": {k: ms[k] for k in ("l2jax", "trl")}}
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
