#!/usr/bin/env python
"""Benchmark `forward`: prefill tokens/s of l2jax against HF transformers (PyTorch) on the same preset shape,
and the peak RSS of converting a synthetic ~1B-parameter HF safetensors checkpoint.

  python tools/bench.py forward [--preset tinyllama-1.1b] [--batch 4] [--seq 512] [--iters 10]
  python tools/bench_forward.py --rss-only            # just the converter memory figure
Both models get the same random-weight config in the same compute dtype; each is warmed up (compile /
first call) and then timed over `--iters` full forward passes (all logits), synchronised on the device, in
`--repeats` interleaved rounds (l2jax, HF, l2jax, ...); the medians give the ratio, flagged when the load
average reached the core count on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args(argv):
  p = argparse.ArgumentParser(prog="bench.py forward", description=__doc__.splitlines()[0])
  p.add_argument("--preset", help="model shape (default: tinyllama-1.1b on an accelerator, tiny on CPU)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (l2jax, HF, l2jax, HF, ...)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                 help="compute and parameter dtype of both models")
  p.add_argument("--skip-hf", action="store_true", help="time l2jax only")
  p.add_argument("--skip-rss", action="store_true", help="skip the converter peak-RSS measurement")
  p.add_argument("--rss-only", action="store_true", help="only the converter peak-RSS measurement")
  p.add_argument("--rss-preset", default="tinyllama-1.1b", help="shape of the synthetic HF checkpoint")
  p.add_argument("--rss-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
  p.add_argument("--rss-shard-size", default="1GB", help="max safetensors shard size of the synthetic checkpoint")
  p.add_argument("--workdir", help="where to write the synthetic checkpoint (default: a temp dir, removed)")
  p.add_argument("--json", help="also write the results to this JSON file")
  return p.parse_args(argv)


# ---- prefill throughput ----

def bench_l2jax(cfg, batch: int, seq: int, iters: int) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from l2jax.model import llama
  graphdef, params = llama.split(llama.init(cfg))
  fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size, jnp.int32)
  t0 = time.perf_counter()
  fwd(params, tokens).block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fwd(params, tokens)
  out.block_until_ready()
  dt = time.perf_counter() - t0
  return {"impl": "l2jax (JAX)", "device": str(jax.devices()[0].device_kind), "tokens_per_s": batch * seq * iters / dt,
          "ms_per_pass": 1e3 * dt / iters, "first_call_s": compile_s}


def bench_hf(cfg, batch: int, seq: int, iters: int) -> dict:
  import torch
  import transformers

  from l2jax.convert.hf import config_to_hf
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.dtype]
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg, cfg.dtype).items()
                                       if k not in ("architectures", "model_type", "torch_dtype")},
                                    attn_implementation="sdpa")
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM(hf_cfg).to(tdt).eval()
  tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)

  def sync():
    if dev == "cuda":
      torch.cuda.synchronize()
  with torch.inference_mode():
    t0 = time.perf_counter()
    model(tokens, use_cache=False)
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
      model(tokens, use_cache=False)
    sync()
    dt = time.perf_counter() - t0
  name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  return {"impl": f"HF transformers {transformers.__version__} (torch {torch.__version__}, sdpa)", "device": name,
          "tokens_per_s": batch * seq * iters / dt, "ms_per_pass": 1e3 * dt / iters, "first_call_s": first}


# ---- converter peak RSS ----

def write_synthetic_hf(out: Path, cfg, dtype: str, shard_size: str) -> int:
  """A random-weight HF Llama checkpoint of shape `cfg` (sharded + index json); returns its tensor bytes."""
  import numpy as np

  from l2jax.convert import BLOCK_NAMES, NP_DTYPES, meta_shapes
  from l2jax.convert.hf import INDEX, config_to_hf, hf_key, parse_size, write_safetensors
  out.mkdir(parents=True, exist_ok=True)
  np_dt, shapes = NP_DTYPES[dtype], meta_shapes(cfg)
  keys = [("embed", None)] + [(n, i) for i in range(cfg.n_layers) for n in BLOCK_NAMES] + \
         [("norm", None), ("lm_head", None)]
  limit, shards, cur, size = parse_size(shard_size), [], [], 0
  for n, i in keys:
    b = int(np.prod(shapes[n])) * np_dt.itemsize
    if cur and size + b > limit:
      shards.append(cur)
      cur, size = [], 0
    cur.append((n, i))
    size += b
  shards.append(cur)
  rng = np.random.default_rng(0)
  weight_map, total = {}, 0
  for j, shard in enumerate(shards):
    fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    specs = [(hf_key(n, i), np_dt, shapes[n]) for n, i in shard]
    by_key = {hf_key(n, i): n for n, i in shard}
    write_safetensors(out / fname, specs,
                      lambda k: (0.02 * rng.standard_normal(shapes[by_key[k]], dtype=np.float32)).astype(np_dt))
    for k, _, s in specs:
      weight_map[k] = fname
      total += int(np.prod(s)) * np_dt.itemsize
  (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
  (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype)))
  return total


# The child's own high-water RSS. Linux's getrusage ru_maxrss survives exec: a child spawned by a process that
# once held more (this one, after writing the synthetic checkpoint) reports the parent's peak. /proc's VmHWM
# belongs to the child's own address space; ru_maxrss is the fallback where there is no /proc.
_CHILD = r"""
import json, resource, runpy, sys, time
sys.argv = [sys.argv[1]] + sys.argv[2:]
t0 = time.perf_counter()
try:
  runpy.run_path(sys.argv[0], run_name="__main__")
  rc = 0
except SystemExit as e:
  rc = e.code or 0
def peak_rss():
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss()}))
"""


def bench_convert_rss(preset: str, dtype: str, shard_size: str, workdir: str | None) -> dict:
  """Peak RSS (VmHWM of the converting process) of tools/hf_to_l2jax.py on a synthetic checkpoint."""
  import shutil

  from l2jax.model import presets
  cfg = presets.get(preset)
  base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="l2jax-rss-"))
  try:
    src, dst = base / "hf", base / "l2jax"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_synthetic_hf(src, cfg, dtype, shard_size)
    write_s = time.perf_counter() - t0
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the converter never needs the accelerator
    tok = ROOT / "data" / "llama2-tokenizer" / "tokenizer.model"  # 32000 pieces
    tok_args = ["--tokenizer", str(tok)] if cfg.vocab_size >= 32000 else []
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT / "tools" / "hf_to_l2jax.py"), str(src), str(dst),
                        *tok_args], capture_output=True, text=True, env=env)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    res = json.loads(last)
    if r.returncode or res.get("rc"):
      raise RuntimeError(f"conversion failed:\n{r.stdout}\n{r.stderr}")
    n_shards = len(list(src.glob("*.safetensors")))
    # The converter builds and writes one l2jax parameter at a time; the largest bounds its memory.
    import numpy as np

    from l2jax.convert import BLOCK_NAMES, NP_DTYPES, l2jax_shapes
    largest = max(int(np.prod(s)) * (cfg.n_layers if n in BLOCK_NAMES else 1)
                  for n, s in l2jax_shapes(cfg).items()) * NP_DTYPES[dtype].itemsize
    return {"preset": preset, "params": cfg.num_params(), "dtype": dtype, "checkpoint_bytes": nbytes,
            "largest_param_bytes": largest, "shards": n_shards, "write_s": write_s, "convert_s": res["seconds"],
            "peak_rss_bytes": res["peak_rss_bytes"], "rss_over_checkpoint": res["peak_rss_bytes"] / nbytes}
  finally:
    if not workdir:
      shutil.rmtree(base, ignore_errors=True)


def run(argv: list[str]) -> dict:
  """Run the benchmark, print its table, and return the figures."""
  a = _args(argv)
  results: dict = {}
  if not a.rss_only:
    import jax

    from l2jax.model import presets
    preset = a.preset or ("tinyllama-1.1b" if jax.default_backend() != "cpu" else "tiny")
    cfg = presets.get(preset, dtype=a.dtype, param_dtype=a.dtype, remat="none")
    print(f"forward (prefill) {preset}: batch {a.batch} x seq {a.seq}, {a.dtype}, {a.iters} timed passes per "
          f"round, {a.repeats} interleaved round(s) per side")
    sides: dict[str, list[dict]] = {"l2jax": [], "hf": []}
    loads = [os.getloadavg()[0]]
    hf = not a.skip_hf
    for _ in range(a.repeats):   # interleaved: l2jax, HF, l2jax, HF, ...
      sides["l2jax"].append(bench_l2jax(cfg, a.batch, a.seq, a.iters))
      if hf:
        try:
          sides["hf"].append(bench_hf(cfg, a.batch, a.seq, a.iters))
        except ImportError as e:
          print(f"  HF transformers not available ({e}); skipping the peer")
          hf = False
      loads.append(os.getloadavg()[0])
    rows = []
    for runs in (v for v in sides.values() if v):
      tps = sorted(r["tokens_per_s"] for r in runs)
      row = {**runs[len(runs) // 2], "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [tps[0], tps[-1]]}
      row["ms_per_pass"] = 1e3 * a.batch * a.seq / row["tokens_per_s"]
      rows.append(row)
      print(f"  {row['impl']:<58} {row['device']:<24} {row['tokens_per_s']:>12,.0f} tok/s "
            f"({tps[0]:,.0f}-{tps[-1]:,.0f})"
            f"  {row['ms_per_pass']:9.2f} ms/pass  (first call {runs[0]['first_call_s']:.1f} s)")
    cores = os.cpu_count() or 1
    print(f"  1-min load average {' -> '.join(f'{x:.2f}' for x in loads)} on {cores} cores")
    if len(rows) == 2:
      ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
      flag = "" if max(loads) < cores or jax.default_backend() != "cpu" else "  [NOT A RESULT: load >= cores]"
      print(f"  ratio l2jax / HF: {ratio:.2f}x (medians){flag}")
      results["ratio_l2jax_over_hf"] = ratio
    results["forward"] = {"preset": preset, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "rows": rows,
                          "loads": loads}
  if not a.skip_rss:
    r = bench_convert_rss(a.rss_preset, a.rss_dtype, a.rss_shard_size, a.workdir)
    print(f"hf_to_l2jax peak RSS: {r['peak_rss_bytes'] / 2**30:.2f} GiB converting a synthetic {r['preset']} "
          f"({r['params'] / 1e9:.2f}B params, {r['dtype']}, {r['checkpoint_bytes'] / 2**30:.2f} GiB in "
          f"{r['shards']} shards) = {r['rss_over_checkpoint']:.2f}x the checkpoint; took {r['convert_s']:.1f} s "
          f"(largest stacked parameter {r['largest_param_bytes'] / 2**30:.2f} GiB)")
    results["convert_rss"] = r
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=2))
  return results


def main(argv: list[str] | None = None) -> int:
  """Entry point of `tools/bench.py forward ...`."""
  run(sys.argv[1:] if argv is None else argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
