#!/usr/bin/env python
"""Benchmark `decode`: ms per decode step and prefill tokens/s of l2jax's Sampler against HF transformers
`generate` (PyTorch) on the same random-weight config, in the same run.

  python tools/bench.py decode [--preset llama2-7b] [--batch 1] [--prompt-len 128] [--new 128]
      [--sampling top-p|greedy] [--dtype bfloat16] [--iters 3]

Both sides generate exactly `--new` tokens per row (no EOS stop) after a random `--prompt-len` prompt.
A generate call with 1 new token is the prefill (+ one sampled token): prefill tok/s = batch * prompt_len / t(1);
decode ms/step = (t(new) - t(1)) / (new - 1). Fastest of `--iters` timed calls after a warm-up call (compile).
Defaults: llama2-7b in bfloat16 on an accelerator, `tiny` in float32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py decode", description=__doc__.splitlines()[0])
  p.add_argument("--preset", help="model shape (default: llama2-7b on an accelerator, tiny on CPU)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--new", type=int, default=128, help="new tokens per row (>= 2)")
  p.add_argument("--sampling", default="top-p", choices=("top-p", "greedy"),
                 help="top-p: temperature 1, top_p 0.9 (as DESIGN.md's HF anchor); greedy: argmax")
  p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                 help="compute and weight dtype of both models (default: bfloat16 on an accelerator, float32 on CPU)")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--skip-hf", action="store_true", help="time l2jax only")
  p.add_argument("--json", help="also write the results to this JSON file")
  a = p.parse_args(argv)
  if a.new < 2 or a.batch < 1 or a.prompt_len < 1:
    p.error("need --new >= 2, --batch >= 1, --prompt-len >= 1")
  return a


def _timed(fn, iters: int) -> tuple[float, float]:
  """(first call seconds, fastest of `iters` further calls: the least disturbed by other load)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, min(times)


def _row(impl: str, device: str, batch: int, prompt_len: int, new: int, t1: float, tn: float, first: float) -> dict:
  return {"impl": impl, "device": device, "prefill_tokens_per_s": batch * prompt_len / t1,
          "decode_ms_per_step": 1e3 * (tn - t1) / (new - 1), "t_generate_1_s": t1, "t_generate_new_s": tn,
          "first_call_s": first}


def bench_l2jax(cfg, batch: int, prompt_len: int, new: int, sampling: dict, iters: int) -> dict:
  import jax
  import numpy as np

  from l2jax.model import llama
  from l2jax.sample import Sampler
  sampler = Sampler(llama.init(cfg, seed=0))  # weights cast to cfg.dtype once
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
  run = lambda n: sampler.generate(prompts, n, seed=0, stop_on_eos=False, **sampling)
  out = run(new)
  assert (out.lengths == new).all(), out.lengths
  first1, t1 = _timed(lambda: run(1), iters)
  firstn, tn = _timed(lambda: run(new), iters)
  return _row("l2jax (JAX, Sampler)", str(jax.devices()[0].device_kind), batch, prompt_len, new, t1, tn,
              first1 + firstn)


def bench_hf(cfg, batch: int, prompt_len: int, new: int, sampling: dict, iters: int) -> dict:
  import torch
  import transformers

  from l2jax.convert.hf import config_to_hf
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg, cfg.dtype).items()
                                       if k not in ("architectures", "model_type", "torch_dtype")})
  hf_cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM(hf_cfg).to(tdt).eval()
  model.generation_config.eos_token_id = None  # exactly `new` tokens, as l2jax's stop_on_eos=False
  model.generation_config.pad_token_id = 0
  g = torch.Generator(device="cpu").manual_seed(0)
  ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g).to(dev)
  mask = torch.ones_like(ids)
  kw = (dict(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0)
        if sampling["temperature"] > 0 else dict(do_sample=False))

  def run(n):
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
    if dev == "cuda":
      torch.cuda.synchronize()
    assert out.shape == (batch, prompt_len + n), out.shape
  first1, t1 = _timed(lambda: run(1), iters)
  firstn, tn = _timed(lambda: run(new), iters)
  name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  return _row(f"HF transformers {transformers.__version__} generate (torch {torch.__version__}, sdpa)", name,
              batch, prompt_len, new, t1, tn, first1 + firstn)


def run(argv: list[str]) -> dict:
  """Run the benchmark, print the table, return the results."""
  if argv[:1] == ["decode"]:
    argv = argv[1:]
  a = _args(argv)
  import jax

  from l2jax.model import presets
  on_cpu = jax.default_backend() == "cpu"
  preset = a.preset or ("tiny" if on_cpu else "llama2-7b")
  dtype = a.dtype or ("float32" if on_cpu else "bfloat16")
  cfg = presets.get(preset, dtype=dtype, param_dtype=dtype, remat="none")
  if a.prompt_len + a.new > cfg.max_seq_len:
    raise SystemExit(f"--prompt-len {a.prompt_len} + --new {a.new} exceeds {preset}'s context {cfg.max_seq_len}")
  sampling = dict(temperature=1.0, top_p=0.9) if a.sampling == "top-p" else dict(temperature=0.0)
  print(f"decode {preset} ({cfg.num_params() / 1e6:.1f}M params, {dtype}): batch {a.batch}, prompt {a.prompt_len}, "
        f"{a.new} new tokens, {a.sampling}; best of {a.iters}")
  rows = [bench_l2jax(cfg, a.batch, a.prompt_len, a.new, sampling, a.iters)]
  if not a.skip_hf:
    try:
      rows.append(bench_hf(cfg, a.batch, a.prompt_len, a.new, sampling, a.iters))
    except ImportError as e:
      print(f"  HF transformers not available ({e}); skipping the peer")
  weight_bytes = cfg.num_params() * {"float32": 4}.get(dtype, 2)
  print(f"  {'impl':<64} {'device':<22} {'decode ms/step':>14} {'GB/s weights':>12} {'prefill tok/s':>14}")
  for r in rows:
    r["weight_read_gb_per_s"] = weight_bytes / (r["decode_ms_per_step"] * 1e-3) / 1e9
    print(f"  {r['impl']:<64} {r['device']:<22} {r['decode_ms_per_step']:>14.3f} {r['weight_read_gb_per_s']:>12.1f} "
          f"{r['prefill_tokens_per_s']:>14,.0f}")
  results = {"preset": preset, "dtype": dtype, "batch": a.batch, "prompt_len": a.prompt_len, "new": a.new,
             "sampling": a.sampling, "rows": rows}
  if len(rows) == 2:
    results["decode_speedup_l2jax_over_hf"] = rows[1]["decode_ms_per_step"] / rows[0]["decode_ms_per_step"]
    results["prefill_ratio_l2jax_over_hf"] = rows[0]["prefill_tokens_per_s"] / rows[1]["prefill_tokens_per_s"]
    print(f"  l2jax vs HF: decode {results['decode_speedup_l2jax_over_hf']:.2f}x faster per step, "
          f"prefill {results['prefill_ratio_l2jax_over_hf']:.2f}x the tokens/s")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2))
  return results


def main(argv: list[str] | None = None) -> int:
  run(list(sys.argv[1:] if argv is None else argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
