#!/usr/bin/env python
"""Benchmark `ppo`: seconds per PPO iteration and generated tokens/s of l2jax's PPO stage against TRL's
PPOTrainer (trl==1.12.0, `trl.experimental.ppo`) on the same random-weight Llama, prompts, batch and length.

  python tools/bench.py ppo [--preset tiny] [--shape dim=512 ...] [--batch 16] [--new 32] [--prompt-len 128]
      [--iters 4] [--repeats 3] [--prompts hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz] [--skip-trl]
      [--json F] [--workdir D]

Weights: a random HF `LlamaForCausalLM` (the policy; also the reference) and a random
`LlamaForSequenceClassification` with num_labels=1 (the reward model; also the value model's start) of the
preset's shape are saved once; l2jax gets the same weights through the HF converter (tools/hf_to_l2jax.py).
Prompts: read with l2jax.data.prompts (chat format, over-long prompts dropped); the exact prompts l2jax's
iterations draw are handed to TRL as its dataset (token ids), so both sides see the same prompts.
Per iteration (num_ppo_epochs = 1, one optimiser step per iteration on both sides, trl#5645):
  l2jax: generate `--batch` responses of up to `--new` tokens (temperature 1, no top-p; a random policy almost
    never samples EOS); score: one forward each of the policy, the reference, the value model and BOTH reward
    models (helpful and safety, here the same weights); R~c, KL rewards, GAE; update: minibatch = batch, so one
    AdamW step (clip 1.0) for the policy and one for the value model.
  TRL: generate exactly `--new` tokens (stop_token_id None), logprobs from the generation logits; one forward
    each of the reference, the value model and ONE reward model; rewards, GAE; one forward/backward of the
    policy and value model over the batch (per_device_train_batch_size = batch, gradient_accumulation_steps 1,
    num_mini_batches 1) and one AdamW step over both (no gradient clipping in TRL's PPO loop).
Both run float32 on CPU, without gradient checkpointing. s/iteration is the median wall time of `--iters`
iterations after `--warmup` (compilation, first calls), the last one (l2jax saves its checkpoint there) not
counted, and on l2jax's side not those that met a new prompt width (`prompt_buckets`: they compile);
generated tokens/s = the iteration's new tokens / its generation time. Phases: l2jax's t_generate / t_score /
t_train; TRL's generation (batch_generation), score (the rollout's no-grad forward passes: reference, value and
reward model) and train (the rest of the iteration: rewards, GAE, the update). Each side runs in its own child
process (JAX and torch would fight over the cores), `--repeats` times, interleaved (l2jax, TRL, l2jax, ...);
the table gives the median over runs (min-max in brackets), and the ratio is flagged NOT A RESULT when the
1-minute load average reached the core count around any run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = "data/llama2-tokenizer/tokenizer.model"


# ----------------------------------------------------------------------------------------------- shared

def child(script: str, role: str, spec: dict) -> dict:
  """Run `script _child role spec` in a fresh Python; return the JSON it writes (the log on failure)."""
  work = Path(spec["work"])
  out, log = work / f"{role}.result.json", work / f"{role}.log"
  out.unlink(missing_ok=True)
  with open(log, "w") as f:
    rc = subprocess.run([sys.executable, script, "_child", role, json.dumps(spec)], stdout=f, stderr=subprocess.STDOUT,
                        cwd=ROOT).returncode
  if rc != 0 or not out.is_file():
    tail = "".join(log.read_text(errors="replace").splitlines(True)[-40:])
    raise RuntimeError(f"{Path(script).name} child {role!r} failed (exit {rc}); log {log}:\n{tail}")
  return json.loads(out.read_text())


def child_main(argv: list[str], roles: dict) -> int:
  role, spec = argv[0], json.loads(argv[1])
  result = roles[role](spec)
  (Path(spec["work"]) / f"{role}.result.json").write_text(json.dumps(result, indent=2))
  return 0


def steady(values: list, warmup: int, iters: int) -> list:
  """Iterations warmup+1 .. warmup+iters (1-based) of a per-iteration list."""
  got = values[warmup:warmup + iters]
  if len(got) < iters:
    raise RuntimeError(f"expected {warmup + iters + 1} iterations, found {len(values)}")
  return got


def trl_available() -> bool:
  import importlib.util
  return all(importlib.util.find_spec(m) is not None for m in ("trl", "torch", "transformers", "datasets"))


def hf_models(spec: dict) -> dict:
  """(torch child) Random HF policy dir and reward-model dir of the preset's shape (seeded), written once."""
  import numpy as np
  import torch
  import transformers

  from l2jax.convert.hf import config_to_hf
  from l2jax.model import presets
  work = Path(spec["work"])
  if (work / "hf_rm_score.npy").is_file():
    return {"reused": True}
  cfg = presets.get(spec["preset"], **{**spec.get("shape", {}), "dtype": "float32", "param_dtype": "float32"})
  kw = {k: v for k, v in config_to_hf(cfg, "float32").items()
        if k not in ("architectures", "model_type", "torch_dtype")}
  kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  hf_cfg = transformers.LlamaConfig(**kw)
  tok_cfg = json.dumps({"tokenizer_class": "LlamaTokenizer", "pad_token": "<unk>", "padding_side": "left"})
  torch.manual_seed(spec.get("seed", 0))
  policy = transformers.LlamaForCausalLM(hf_cfg)
  torch.manual_seed(spec.get("seed", 0) + 1)
  rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**kw, num_labels=1))
  lm = transformers.LlamaForCausalLM(hf_cfg)       # the RM backbone in a causal LM, for the l2jax converter
  lm.model.load_state_dict(rm.model.state_dict())
  for name, model in (("hf_policy", policy), ("hf_rm", rm), ("hf_rm_lm", lm)):
    model.save_pretrained(work / name)
    shutil.copy(ROOT / spec["tokenizer"], work / name / "tokenizer.model")
    (work / name / "tokenizer_config.json").write_text(tok_cfg)
  np.save(work / "hf_rm_score.npy", rm.score.weight.detach().numpy()[0])
  return {"reused": False, "params": sum(p.numel() for p in policy.parameters())}


def l2jax_models(spec: dict) -> tuple[Path, Path]:
  """(JAX child) l2jax policy and reward-model dirs: converted from the HF dirs when present, else random."""
  import jax
  import numpy as np
  from flax import nnx

  from l2jax import checkpoint as ck
  from l2jax.model import heads, llama, presets
  work, tok = Path(spec["work"]), str(ROOT / spec["tokenizer"])
  pol_dir, rm_dir = work / "l2jax_policy", work / "l2jax_rm"
  if rm_dir.is_dir():
    return pol_dir, rm_dir
  head_json = {"head.json": json.dumps({"kind": "reward_model", "source": "tools/bench_ppo.py"})}
  if (work / "hf_rm_score.npy").is_file():
    from l2jax.convert.hf import hf_to_l2jax
    hf_to_l2jax(work / "hf_policy", pol_dir, tokenizer=tok)
    hf_to_l2jax(work / "hf_rm_lm", work / "l2jax_rm_lm", tokenizer=tok)
    cfg, p = ck.load_model_dir(work / "l2jax_rm_lm")
    head = {"w": np.load(work / "hf_rm_score.npy").astype(np.float32), "b": np.zeros((), np.float32)}
    ck.save_model_dir(rm_dir, cfg, {"backbone": heads.backbone_params(p), "head": head}, tok, extra_files=head_json)
    shutil.rmtree(work / "l2jax_rm_lm")
  else:  # no torch: random l2jax weights of the same shapes (tests, --skip-trl)
    cfg = presets.get(spec["preset"], **spec.get("shape", {}))
    ck.save_model_dir(pol_dir, cfg, jax.device_get(llama.split(llama.init(cfg, 0))[1]), tok)
    rp = llama.split(heads.ScalarModel(cfg, rngs=nnx.Rngs(params=1)))[1]
    ck.save_model_dir(rm_dir, cfg, jax.device_get(rp), tok, extra_files=head_json)
  return pol_dir, rm_dir


def load_avg() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------- the two sides

def _ppo_config(spec: dict, pol_dir: Path, rm_dir: Path):
  from l2jax import config as c
  from l2jax.model import presets
  n = spec["warmup"] + spec["iters"] + 1
  return c.PPO(name="bench", policy=str(pol_dir), reward_models=c.RewardModels(str(rm_dir), str(rm_dir)),
               model=presets.get(spec["preset"], dtype="float32", param_dtype="float32", remat="none"),
               frozen_dtype="float32",
               prompts=c.Prompts(sources=tuple(spec["prompts"]), max_prompt_tokens=spec["prompt_len"],
                                 heldout_fraction=0.0, eval_prompts=0, skip_bad=True),
               max_new_tokens=spec["new"], batch_prompts=spec["batch"], minibatch=spec["batch"], ppo_epochs=1,
               iterations=n, eval_every=0, samples_logged=1, tensorboard=False,
               ckpt=c.Checkpointing(every=n, keep=1), seed=spec.get("seed", 0))


def run_l2jax(spec: dict) -> dict:
  """(JAX child) the PPO stage for warmup + iters + 1 iterations; timings from its metrics.jsonl; writes the
  prompts it drew (token ids, in order) to work/prompts.json for TRL."""
  import jax

  from l2jax.data import prompts as prompts_lib
  from l2jax.stages import ppo
  work = Path(spec["work"])
  pol_dir, rm_dir = l2jax_models(spec)
  cfg = _ppo_config(spec, pol_dir, rm_dir)
  run_dir = work / "l2jax_ppo_run"
  shutil.rmtree(run_dir, ignore_errors=True)
  starts: list[float] = []    # the loop's wall clock at each iteration's start: everything between two counts
  inner = ppo.PPOStep.__call__

  def timed_step(self, state, batch):
    starts.append(time.perf_counter())
    return inner(self, state, batch)
  ppo.PPOStep.__call__ = timed_step
  t0 = time.perf_counter()
  try:
    ppo.run(cfg, run_dir)
  finally:
    ppo.PPOStep.__call__ = inner
  total = time.perf_counter() - t0
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  rows = sorted((r for r in rows if "t_generate" in r), key=lambda r: r["step"])
  w, k = spec["warmup"], spec["iters"]
  # an iteration that meets a new prompt width (prompt_buckets) compiles its programs: not a steady iteration
  widths = [int(r.get("prompt_width", cfg.prompts.max_prompt_tokens)) for r in rows]
  fresh = [x not in widths[:i] for i, x in enumerate(widths)]
  steady(widths, w, k)   # enough iterations ran
  keep = [i for i in range(w, w + k) if not fresh[i]] or list(range(w, w + k))
  pick = lambda vals: [vals[i] for i in keep]
  it_s = pick([b - a for a, b in zip(starts, starts[1:])])
  gen_s = pick([r["t_generate"] for r in rows])
  new_tok = pick([r["response_len"] * cfg.batch_prompts for r in rows])
  # the prompts the iterations drew, for the peer
  m = ppo.load_models(cfg)
  data = ppo.load_prompts(cfg.prompts, m.tokenizer)
  batches = prompts_lib.PromptBatches(data.train_ids, data.train, batch_size=cfg.batch_prompts,
                                      prompt_len=cfg.prompts.max_prompt_tokens, seed=cfg.seed,
                                      pad_id=m.tokenizer.pad_id, buckets=cfg.prompt_buckets)
  ids = []
  for _ in range(cfg.iterations):
    b = next(batches)
    ids += [b["prompt_tokens"][i, :n].tolist() for i, n in enumerate(b["prompt_lens"])]
  (work / "prompts.json").write_text(json.dumps(ids))
  return {"impl": f"l2jax (JAX {jax.__version__}, stages.ppo)", "s_per_iter": statistics.median(it_s),
          "s_generate": statistics.median(gen_s),
          "s_score": statistics.median(pick([r["t_score"] for r in rows])),
          "s_train": statistics.median(pick([r["t_train"] for r in rows])),
          "prompt_widths": widths, "timed_iterations": [i + 1 for i in keep],
          "gen_tokens_per_s": statistics.median(n / t for n, t in zip(new_tok, gen_s)),
          "new_tokens_per_iter": statistics.median(new_tok), "first_iter_s": starts[1] - starts[0],
          "iter_s": it_s, "total_s": total, "prompts": len(data.train_ids),
          "mean_prompt_len": sum(map(len, ids)) / len(ids)}


def run_trl(spec: dict) -> dict:
  """(torch child) TRL's PPOTrainer on the same weights and prompts; per-iteration wall time from callbacks."""
  import datasets
  import torch
  import transformers
  import trl
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as trl_ppo
  work = Path(spec["work"])
  ids = json.loads((work / "prompts.json").read_text())
  tok = transformers.AutoTokenizer.from_pretrained(work / "hf_policy")
  tok.pad_token, tok.padding_side = "<unk>", "left"
  load = lambda cls, d, **kw: cls.from_pretrained(work / d, dtype=torch.float32, **kw)
  policy, ref = load(transformers.LlamaForCausalLM, "hf_policy"), load(transformers.LlamaForCausalLM, "hf_policy")
  rm = load(transformers.AutoModelForSequenceClassification, "hf_rm", num_labels=1)
  value = load(transformers.AutoModelForSequenceClassification, "hf_rm", num_labels=1)
  args = PPOConfig(output_dir=str(work / "trl_ppo_out"), per_device_train_batch_size=spec["batch"],
                   gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1, total_episodes=len(ids),
                   local_rollout_forward_batch_size=spec["batch"], response_length=spec["new"], stop_token=None,
                   stop_token_id=None, temperature=1.0, missing_eos_penalty=None, kl_coef=0.01, learning_rate=1e-6,
                   lr_scheduler_type="constant", weight_decay=0.1, adam_beta2=0.95, adam_epsilon=1e-5,
                   num_sample_generations=0, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                   report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=spec.get("seed", 0),
                   dataloader_num_workers=0)
  ends: list[float] = []
  gen: list[float] = []
  score, scores = [0.0], []   # seconds of score since the last iteration ended; per iteration

  class Clock(transformers.TrainerCallback):
    def on_train_begin(self, *a, **k):
      ends.append(time.perf_counter())

    def on_step_end(self, *a, **k):
      ends.append(time.perf_counter())
      scores.append(score[0])
      score[0] = 0.0

  inner = trl_ppo.batch_generation

  def timed_generation(*a, **k):
    t = time.perf_counter()
    out = inner(*a, **k)
    gen.append(time.perf_counter() - t)
    return out
  trl_ppo.batch_generation = timed_generation

  def scored(fn):   # the rollout's no-grad forward passes (reference, value, reward model) are score time
    def wrapped(*a, **k):
      if torch.is_grad_enabled():   # the update's forward (with gradients) is training time
        return fn(*a, **k)
      t = time.perf_counter()
      out = fn(*a, **k)
      score[0] += time.perf_counter() - t
      return out
    return wrapped
  trl_ppo.forward, trl_ppo.get_reward = scored(trl_ppo.forward), scored(trl_ppo.get_reward)
  trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                       train_dataset=datasets.Dataset.from_dict({"input_ids": ids}), value_model=value,
                       callbacks=[Clock()])
  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0
  w, k, new = spec["warmup"], spec["iters"], spec["batch"] * spec["new"]
  it_s = steady([b - a for a, b in zip(ends, ends[1:])], w, k)
  gen_s, score_s = steady(gen, w, k), steady(scores, w, k)
  return {"impl": f"TRL {trl.__version__} PPOTrainer (torch {torch.__version__}, transformers "
                  f"{transformers.__version__})", "s_per_iter": statistics.median(it_s),
          "s_generate": statistics.median(gen_s), "s_score": statistics.median(score_s),
          "s_train": statistics.median(i - g - c for i, g, c in zip(it_s, gen_s, score_s)),
          "gen_tokens_per_s": statistics.median(new / t for t in gen_s),
          "new_tokens_per_iter": new, "first_iter_s": ends[1] - ends[0], "iter_s": it_s, "total_s": total,
          "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- main

def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py ppo", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny", help="model shape of policy, reference, value and reward models")
  p.add_argument("--batch", type=int, default=16, help="prompts per iteration (one response each)")
  p.add_argument("--new", type=int, default=32, help="new tokens per response")
  p.add_argument("--prompt-len", type=int, default=128, help="longest prompt kept (tokens; l2jax pads to it)")
  p.add_argument("--prompts", action="append", help="FORMAT:PATH prompt source (repeatable)")
  p.add_argument("--iters", type=int, default=4, help="timed iterations (median)")
  p.add_argument("--warmup", type=int, default=1, help="iterations not timed (compilation, first calls)")
  p.add_argument("--tokenizer", default=TOKENIZER)
  p.add_argument("--workdir", help="models, prompts and logs (default: a temp dir, removed)")
  p.add_argument("--skip-trl", action="store_true", help="time l2jax only")
  p.add_argument("--json", help="also write the results to this JSON file")
  p.add_argument("--repeats", type=int, default=3, help="interleaved runs per side (l2jax, TRL, l2jax, ...)")
  p.add_argument("--shape", action="append", default=[], metavar="KEY=INT",
                 help="override the preset's shape, e.g. --shape dim=512 --shape n_layers=8 (repeatable)")
  a = p.parse_args(argv)
  a.prompts = a.prompts or ["hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz"]
  return a


PHASES = ("s_generate", "s_score", "s_train")


def _median_spread(xs: list[float]) -> str:
  return f"{statistics.median(xs):.3f}" + (f" ({min(xs):.3f}-{max(xs):.3f})" if len(xs) > 1 else "")


def table(runs: dict[str, list[dict]]) -> str:
  """One row per side: the median over repeats of each repeat's median (min-max over repeats in brackets)."""
  out = ["| impl | s / iteration | generate s | score s | train s | generated tokens/s |",
         "|---|---:|---:|---:|---:|---:|"]
  for rows in runs.values():
    cols = [_median_spread([r[k] for r in rows]) for k in ("s_per_iter",) + PHASES]
    out.append(f"| {rows[0]['impl']} | " + " | ".join(cols) +
               f" | {statistics.median(r['gen_tokens_per_s'] for r in rows):,.0f} |")
  return "\n".join(out)


def quiet(loads: list[float], cores: int) -> bool:
  """A ratio is a result only if the 1-minute load average stayed below the core count around every run."""
  return max(loads) < cores


def run(argv: list[str]) -> dict:
  a = _args(argv)
  spec = {"preset": a.preset, "batch": a.batch, "new": a.new, "prompt_len": a.prompt_len, "prompts": a.prompts,
          "iters": a.iters, "warmup": a.warmup, "tokenizer": a.tokenizer,
          "shape": dict((k, int(v)) for k, v in (x.split("=", 1) for x in a.shape))}
  tmp = None if a.workdir else tempfile.mkdtemp(prefix="bench_ppo_")
  spec["work"] = str(Path(a.workdir or tmp).resolve())
  Path(spec["work"]).mkdir(parents=True, exist_ok=True)
  peer = not a.skip_trl and trl_available()
  sides = ["l2jax"] + (["trl"] if peer else [])
  runs: dict[str, list[dict]] = {s: [] for s in sides}
  loads = [os.getloadavg()[0]]
  try:
    if peer:
      child(__file__, "hf_models", spec)
    for _ in range(a.repeats):   # interleaved: l2jax, TRL, l2jax, TRL, ...
      for side in sides:
        runs[side].append(child(__file__, side, spec))
        loads.append(os.getloadavg()[0])
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  cores = os.cpu_count() or 1
  first = runs["l2jax"][0]
  print(f"ppo {a.preset}{' ' + str(spec['shape']) if spec['shape'] else ''}: {a.batch} prompts x {a.new} new "
        f"tokens (prompts <= {a.prompt_len} tokens, mean {first['mean_prompt_len']:.0f}; l2jax pads each batch to "
        f"the bucket of its longest, widths {sorted(set(first['prompt_widths']))}), 1 PPO epoch, 1 optimiser step "
        f"per iteration; per run the median of {a.iters} iterations after {a.warmup} (l2jax: those that compiled a "
        f"new width left out); {a.repeats} interleaved run(s) per side; 1-min load average "
        f"{' -> '.join(f'{x:.2f}' for x in loads)} on {cores} cores")
  if not peer and not a.skip_trl:
    print("  TRL not installed (pip install -e '.[bench]'); l2jax only")
  print(table(runs))
  results = {"spec": {k: v for k, v in spec.items() if k != "work"}, "runs": runs, "loads": loads, "cores": cores,
             "quiet": quiet(loads, cores)}
  if peer:
    med = lambda side, k: statistics.median(r[k] for r in runs[side])
    results["speedup"] = med("trl", "s_per_iter") / med("l2jax", "s_per_iter")
    results["phase_ratio"] = {k: med("trl", k) / max(med("l2jax", k), 1e-9) for k in PHASES}
    results["gen_ratio"] = med("l2jax", "gen_tokens_per_s") / med("trl", "gen_tokens_per_s")
    flag = "" if results["quiet"] else (f"  [NOT A RESULT: the load average reached {max(loads):.2f} on {cores} "
                                        f"cores; torch suffers more from contention than XLA]")
    print(f"l2jax vs TRL: {results['speedup']:.2f}x faster per iteration (generate "
          f"{results['phase_ratio']['s_generate']:.2f}x, score {results['phase_ratio']['s_score']:.2f}x, train "
          f"{results['phase_ratio']['s_train']:.2f}x), {results['gen_ratio']:.2f}x the generated tokens/s{flag}")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2))
  return results


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["_child"]:
    return child_main(argv[1:], {"hf_models": hf_models, "l2jax": run_l2jax, "trl": run_trl})
  run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
