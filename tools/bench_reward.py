#!/usr/bin/env python
"""Benchmark `reward`: pairs/s of l2jax's reward-model training (stages.reward) against TRL's RewardTrainer
(with the `margin` column) on the same random-weight Llama backbone, pairs, batch and sequence length.

  python tools/bench.py reward [--preset tiny] [--batch 16] [--seq 256] [--iters 5] [--repeats 3] [--pad batch]
      [--pairs hh:data/hh-rlhf/helpful-base-test.jsonl.gz --pairs oasst:data/oasst/en_100_tree.jsonl]
      [--margin small] [--skip-trl] [--json F] [--workdir D]

Weights: the backbone is the same random HF `LlamaForCausalLM` on both sides (l2jax gets it through the HF
converter), with a fresh scalar head (l2jax: heads.ScalarHead; TRL: AutoModelForSequenceClassification,
num_labels=1). Pairs: l2jax's stage reads the sources (safety filter, identical answers dropped, shuffled);
the exact pairs its steps train on, as the token ids it builds (chat format, rows longer than --seq keep BOS
and their tail), go to TRL as chosen_ids / rejected_ids with margin = m(rating) of the --margin table
(Llama 2 Table 27; unrated HH pairs 0; OASST pairs are rated), so both sides compute
-log sigmoid(r_c - r_r - m) on the same rows.
Per step, both sides: one forward/backward of --batch pairs (2 x batch rows) and one AdamW step (gradient
clipping 1.0, constant lr), float32 on CPU, no gradient checkpointing. Padding (--pad): "batch" (default, each
side's own default) pads a batch to its longest row: l2jax to the power-of-two bucket of it (the reward stage's
PairBatches(buckets=True): a few shapes to compile), TRL to the longest row itself (its collator);
"full" pads every row to exactly --seq on both sides (TRL pad_to_multiple_of = --seq). pairs/s = batch / the
median wall time of --iters steps after --warmup steps (the last step, where l2jax saves its checkpoint, not
counted, nor on l2jax's side a step that met a new bucket width: it compiles); l2jax tokenises its batches
inside the loop, TRL's are pre-tokenised. Each side runs in its own child process, --repeats times interleaved
(l2jax, TRL, l2jax, ...): the table gives the median over runs (min-max in brackets), and the ratio is flagged
NOT A RESULT when the 1-minute load average reached the core count around any run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ppo import (ROOT, TOKENIZER, _median_spread, child, child_main, hf_models, l2jax_models,  # noqa: E402
                       quiet, steady, trl_available)


def _reward_config(spec: dict, init_dir: Path):
  from l2jax import config as c
  from l2jax.model import presets
  n = spec["warmup"] + spec["iters"] + 1
  return c.RewardModel(name="bench", init=str(init_dir),
                       model=presets.get(spec["preset"], dtype="float32", param_dtype="float32", remat="none"),
                       data=c.Preferences(sources=tuple(spec["pairs"]), heldout_fraction=0.0,
                                          tokenizer=str(ROOT / spec["tokenizer"]), skip_bad=True),
                       margin=spec["margin"], seq_len=spec["seq"], global_batch=spec["batch"], steps=n,
                       buckets=spec.get("pad", "batch") == "batch",
                       warmup_fraction=0.0, optim=c.AdamW(lr=1e-5, warmup_steps=0, schedule="constant"),
                       ckpt=c.Checkpointing(every=n, keep=1), log_every=1, eval_every=0, tensorboard=False,
                       seed=spec.get("seed", 0))


def run_l2jax(spec: dict) -> dict:
  """(JAX child) the reward stage for warmup + iters + 1 steps, timed between step starts; writes the pairs
  its steps trained on (ids and margins, in order) to work/pairs.json for TRL."""
  import jax
  import numpy as np

  from l2jax import train
  from l2jax.data import preferences as prefs
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.losses import MARGINS
  from l2jax.stages import reward
  work = Path(spec["work"])
  pol_dir, _ = l2jax_models(spec)
  cfg = _reward_config(spec, pol_dir)
  run_dir = work / "l2jax_reward_run"
  shutil.rmtree(run_dir, ignore_errors=True)
  starts: list[float] = []
  inner = train.compile_step

  def compile_step(*a, **k):       # time each call of the compiled step (the loop's wall clock between calls)
    step = inner(*a, **k)

    class Timed:
      def __getattr__(self, name):
        return getattr(step, name)

      def __call__(self, *args, **kw):
        starts.append(time.perf_counter())
        return step(*args, **kw)
    return Timed()
  train.compile_step = compile_step
  t0 = time.perf_counter()
  try:
    reward.run(cfg, run_dir)
  finally:
    train.compile_step = inner
  total = time.perf_counter() - t0
  w, k = spec["warmup"], spec["iters"]
  pairs, _, _ = reward.load_preferences(cfg.data, cfg.seed)
  batches = prefs.PairBatches(pairs, Tokenizer(pol_dir / "tokenizer.model"), seq_len=cfg.seq_len,
                              global_batch=cfg.global_batch, seed=cfg.seed, buckets=cfg.buckets)
  table, out, real, widths = MARGINS[cfg.margin], [], [], []
  for _ in range(cfg.steps):
    b = next(batches)
    widths.append(int(b["tokens"].shape[-1]))
    for i in range(cfg.global_batch):
      (c_ids, r_ids), (c_m, r_m) = b["tokens"][i], b["mask"][i]
      rating = int(b["rating"][i])
      out.append({"chosen_ids": c_ids[c_m > 0].tolist(), "rejected_ids": r_ids[r_m > 0].tolist(),
                  "margin": float(table[rating]) if rating >= 0 else 0.0})
      real.append(int(c_m.sum() + r_m.sum()))
  (work / "pairs.json").write_text(json.dumps(out))
  steps_s = [b - a for a, b in zip(starts, starts[1:])]
  steady(steps_s, w, k)   # enough steps ran
  keep = [i for i in range(w, w + k) if widths[i] in widths[:i]] or list(range(w, w + k))   # no compiling step
  it_s = [steps_s[i] for i in keep]
  return {"impl": f"l2jax (JAX {jax.__version__}, stages.reward)", "s_per_step": statistics.median(it_s),
          "widths": widths, "timed_steps": [i + 1 for i in keep],
          "pairs_per_s": spec["batch"] / statistics.median(it_s), "first_step_s": starts[1] - starts[0],
          "step_s": it_s, "total_s": total, "train_pairs": len(pairs),
          "mean_real_tokens_per_row": float(np.mean(real)) / 2,
          "rated_share": float(np.mean([p["margin"] > 0 for p in out]))}


def run_trl(spec: dict) -> dict:
  """(torch child) TRL's RewardTrainer on the same backbone and pairs (margin column); step times from callbacks."""
  import datasets
  import torch
  import transformers
  import trl
  work = Path(spec["work"])
  rows = json.loads((work / "pairs.json").read_text())
  tok = transformers.AutoTokenizer.from_pretrained(work / "hf_policy")
  tok.pad_token = "<unk>"
  torch.manual_seed(spec.get("seed", 0))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(work / "hf_policy", num_labels=1,
                                                                         dtype=torch.float32)
  model.config.pad_token_id = tok.pad_token_id
  n = spec["warmup"] + spec["iters"] + 1
  args = trl.RewardConfig(output_dir=str(work / "trl_reward_out"), per_device_train_batch_size=spec["batch"],
                          gradient_accumulation_steps=1, max_steps=n, learning_rate=1e-5, lr_scheduler_type="constant",
                          warmup_steps=0, weight_decay=0.1, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0,
                          max_length=spec["seq"], gradient_checkpointing=False,
                          pad_to_multiple_of=spec["seq"] if spec.get("pad") == "full" else None,
                          bf16=False, fp16=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                          disable_tqdm=True, dataloader_num_workers=0, seed=spec.get("seed", 0), eval_strategy="no")
  starts: list[float] = []

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, *a, **k):
      starts.append(time.perf_counter())

  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok, callbacks=[Clock()])
  t0 = time.perf_counter()
  trainer.train()
  total = time.perf_counter() - t0
  it_s = steady([b - a for a, b in zip(starts, starts[1:])], spec["warmup"], spec["iters"])
  return {"impl": f"TRL {trl.__version__} RewardTrainer (torch {torch.__version__}, transformers "
                  f"{transformers.__version__})", "s_per_step": statistics.median(it_s),
          "pairs_per_s": spec["batch"] / statistics.median(it_s), "first_step_s": starts[1] - starts[0],
          "step_s": it_s, "total_s": total, "torch_threads": torch.get_num_threads()}


def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py reward", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny", help="backbone shape")
  p.add_argument("--batch", type=int, default=16, help="pairs per step (2 rows each)")
  p.add_argument("--seq", type=int, default=256, help="tokens per row (both sides pad to it)")
  p.add_argument("--pairs", action="append", help="FORMAT:PATH preference source (repeatable)")
  p.add_argument("--margin", default="small", choices=("none", "small", "large"), help="Table 27 margin table")
  p.add_argument("--iters", type=int, default=5, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=2, help="steps not timed (compilation, first calls)")
  p.add_argument("--tokenizer", default=TOKENIZER)
  p.add_argument("--workdir", help="models, pairs and logs (default: a temp dir, removed)")
  p.add_argument("--skip-trl", action="store_true", help="time l2jax only")
  p.add_argument("--json", help="also write the results to this JSON file")
  p.add_argument("--repeats", type=int, default=3, help="interleaved runs per side (l2jax, TRL, l2jax, ...)")
  p.add_argument("--pad", default="batch", choices=("batch", "full"),
                 help="batch: each side pads a batch to its longest row (l2jax: to its bucket); full: to --seq")
  a = p.parse_args(argv)
  a.pairs = a.pairs or ["hh:data/hh-rlhf/helpful-base-test.jsonl.gz", "oasst:data/oasst/en_100_tree.jsonl"]
  return a


def table(runs: dict[str, list[dict]]) -> str:
  out = ["| impl | s / step | pairs/s |", "|---|---:|---:|"]
  for rows in runs.values():
    out.append(f"| {rows[0]['impl']} | {_median_spread([r['s_per_step'] for r in rows])} | "
               f"{statistics.median(r['pairs_per_s'] for r in rows):.1f} |")
  return "\n".join(out)


def run(argv: list[str]) -> dict:
  a = _args(argv)
  spec = {"preset": a.preset, "batch": a.batch, "seq": a.seq, "pairs": a.pairs, "margin": a.margin,
          "iters": a.iters, "warmup": a.warmup, "tokenizer": a.tokenizer, "pad": a.pad}
  tmp = None if a.workdir else tempfile.mkdtemp(prefix="bench_reward_")
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
  cores, first = os.cpu_count() or 1, runs["l2jax"][0]
  print(f"reward {a.preset}: {a.batch} pairs x 2 rows, rows <= {a.seq} tokens (mean "
        f"{first['mean_real_tokens_per_row']:.0f} real; padding '{a.pad}', l2jax widths "
        f"{sorted(set(first['widths']))}), margin {a.margin} ({100 * first['rated_share']:.0f}% of pairs with "
        f"m > 0); per run the median of {a.iters} steps after {a.warmup}; {a.repeats} interleaved run(s) per side; "
        f"1-min load average {' -> '.join(f'{x:.2f}' for x in loads)} on {cores} cores")
  if not peer and not a.skip_trl:
    print("  TRL not installed (pip install -e '.[bench]'); l2jax only")
  print(table(runs))
  results = {"spec": {k: v for k, v in spec.items() if k != "work"}, "runs": runs, "loads": loads, "cores": cores,
             "quiet": quiet(loads, cores)}
  if peer:
    med = lambda side: statistics.median(r["pairs_per_s"] for r in runs[side])
    results["speedup"] = med("l2jax") / med("trl")
    flag = "" if results["quiet"] else f"  [NOT A RESULT: the load average reached {max(loads):.2f} on {cores} cores]"
    print(f"l2jax vs TRL: {results['speedup']:.2f}x the pairs/s{flag}")
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
