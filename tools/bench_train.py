"""`bench.py train`: training tokens/s and MFU of l2jax and of HF transformers on the same config and batch.

l2jax: the real training step (train.make_train_step: AdamW, clipping, bf16 compute) jitted with shardings.
HF: LlamaForCausalLM in PyTorch, SDPA attention, bf16 autocast on GPU (fp32 on CPU), AdamW(fused on GPU).
Weights are random; the batch is random tokens. MFU counts 6N + 12 * layers * seq * dim FLOPs per token.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def bench_l2jax(cfg, seq: int, batch: int, steps: int, warmup: int) -> float:
  import jax
  from l2jax import config as c, sharding as shd, train
  from l2jax.model import llama
  from l2jax.stages.pretrain import lm_loss_fn
  mesh = shd.make_mesh(1, -1, 1)
  model = llama.abstract(cfg)
  graphdef, abstract_params = llama.split(model)
  axes = llama.logical_axes(model)
  p_sh = shd.tree_shardings(axes, mesh, shd.TRAIN_RULES, abstract_params)
  params = jax.jit(lambda: llama.split(llama.init(cfg))[1], out_shardings=p_sh)()
  opt = train.make_optimizer(c.AdamW(lr=1e-4, warmup_steps=10), 1000)
  state = train.init_state(params, opt)
  abstract = jax.eval_shape(lambda s: s, state)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  b = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
       "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
       "loss_mask": np.ones((batch, seq), np.float32)}
  step = train.compile_step(train.make_train_step(lm_loss_fn(graphdef), opt), abstract, axes, mesh, b)
  state = jax.device_put(state, step.state_shardings)
  gb = shd.global_batch(b, mesh)
  for _ in range(warmup):
    state, m = step(state, gb)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, gb)
  jax.block_until_ready(m)
  return batch * seq * steps / (time.perf_counter() - t)


def bench_hf(cfg, seq: int, batch: int, steps: int, warmup: int) -> float | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
      tie_word_embeddings=False, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_cfg).to(dev)
  if cfg.remat != "none":
    model.gradient_checkpointing_enable()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                          fused=dev == "cuda")
  toks = torch.randint(3, cfg.vocab_size, (batch, seq), device=dev)
  use_bf16 = dev == "cuda" and cfg.dtype == "bfloat16"

  def one():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=use_bf16):
      loss = model(input_ids=toks, labels=toks).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(warmup):
    one()
  if dev == "cuda":
    torch.cuda.synchronize()
  t = time.perf_counter()
  for _ in range(steps):
    loss = one()
  float(loss)
  if dev == "cuda":
    torch.cuda.synchronize()
  return batch * seq * steps / (time.perf_counter() - t)


def main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(prog="bench.py train")
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
  ap.add_argument("--remat", default=None, help="none | full | dots")
  args = ap.parse_args(argv)
  import jax
  from l2jax.metrics import mfu
  from l2jax.model import presets
  on_cpu = jax.devices()[0].platform == "cpu"
  cfg = presets.get(args.preset, dtype=args.dtype or ("float32" if on_cpu else "bfloat16"),
                    max_seq_len=max(args.seq, presets.get(args.preset).max_seq_len))
  if args.remat:
    cfg = cfg.replace(remat=args.remat)
  fpt = cfg.flops_per_token(args.seq)
  ours = bench_l2jax(cfg, args.seq, args.batch, args.steps, args.warmup)
  theirs = bench_hf(cfg, args.seq, args.batch, args.steps, args.warmup)
  dev = jax.devices()[0].device_kind
  print(f"train {args.preset} seq {args.seq} batch {args.batch} dtype {cfg.dtype} remat {cfg.remat} on {dev}")
  print("| impl | tokens/s | MFU |\n|---|---:|---:|")
  for name, tps in (("l2jax (JAX)", ours), ("HF transformers (PyTorch)", theirs)):
    if tps is None:
      print(f"| {name} | not installed | |")
      continue
    u = mfu(tps, fpt, 1)
    print(f"| {name} | {tps:,.0f} | {'' if u is None else f'{100 * u:.1f}%'} |")
  if theirs:
    print(f"ratio l2jax / HF: {ours / theirs:.2f}x")
  return 0
