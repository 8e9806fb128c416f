"""`--check-sharding` for PPO: the per-device memory plan of the five models on the configured mesh, and (for
models small enough to run here) one PPO iteration on the mesh against one device.

The plan is arithmetic on abstract shapes (no memory is allocated, so it runs for 70B on a laptop): every
parameter's bytes divided by the mesh axes its logical axes map to under the rules (l2jax/sharding.py).
  resident: policy and value model (param dtype) with AdamW's two moments, the reference and both reward
            models (frozen dtype), all under TRAIN_RULES (fully sharded);
  generate: + the policy consolidated to SAMPLE_RULES in the compute dtype and the KV cache;
  score:    + one chunk's logits of the policy and the reference;
  train:    + gradients, one micro-batch's saved block inputs (remat) and logits.
Peak = resident + the largest phase; it must fit `device_memory_gib`. This module is arithmetic only; the
one-iteration comparison on the mesh is the stage's own (l2jax.stages.ppo.check_sharding).
GRPO / RLOO (`estimator`): no value model (its parameters, moments, gradients and activations are left out), and
the rows of generate, score and train are group_size per prompt.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from l2jax import checkpoint as ckpt_lib
from l2jax import sharding as shd
from l2jax.model import heads, llama
from l2jax.model.config import LlamaConfig

GIB = 1024 ** 3


def _mesh_shape(cfg, n_devices: int) -> dict[str, int]:
  sizes = shd.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, n_devices, getattr(cfg.mesh, "dcn", 1))
  return dict(zip(shd.MESH_AXES, sizes))


def _divisor(names, shape, mesh: dict[str, int], rules) -> int:
  """How many devices share one copy of an array with these logical axes (a non-dividing axis is dropped)."""
  table = dict(rules)
  total = 1
  for name, dim in zip(names or (), shape):
    axes = table.get(name)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    k = int(np.prod([mesh[a] for a in axes])) if axes else 1
    if k > 1 and dim % k == 0:
      total *= k
  return total


def tree_bytes(abstract_params, axes, mesh: dict[str, int], rules, dtype=None) -> float:
  """Bytes per device of a parameter tree under `rules` (in `dtype` if given, else each leaf's own)."""
  leaves = jax.tree.leaves(abstract_params)
  names = jax.tree.leaves(axes, is_leaf=lambda x: x is None or isinstance(x, tuple))
  item = lambda a: np.dtype(dtype).itemsize if dtype else np.dtype(a.dtype).itemsize
  return float(sum(math.prod(a.shape) * item(a) / _divisor(n, a.shape, mesh, rules) for a, n in zip(leaves, names)))


def _arch(path: str, fallback: LlamaConfig) -> LlamaConfig:
  p = Path(path) / ckpt_lib.CONFIG if path else None
  return LlamaConfig.load(p) if p is not None and p.is_file() else fallback


def plan(cfg, n_devices: int) -> dict:
  """Per-device GiB of each item and phase for a PPO config on `n_devices` devices."""
  mesh = _mesh_shape(cfg, n_devices)
  num = {k: getattr(cfg.model, k) for k in ("dtype", "param_dtype", "remat")}
  pol = _arch(cfg.policy, cfg.model).replace(**num)
  rm_h = _arch(cfg.reward_models.helpful, pol)
  rm_s = _arch(cfg.reward_models.safety, pol)
  val = (rm_h if cfg.value_init == "helpful" else pol).replace(**num)
  value = not getattr(cfg, "grouped", False)   # GRPO / RLOO: no value model
  k = getattr(cfg, "group_size", 1)            # rows per prompt
  T = cfg.prompts.max_prompt_tokens + cfg.max_new_tokens
  batch_shards = mesh["dcn"] * mesh["data"] * mesh["fsdp"]
  tensor = mesh["tensor"]

  def lm(c):
    m = llama.abstract(c)
    return llama.split(m)[1], llama.logical_axes(m)

  def scalar(c):
    m = nnx.eval_shape(lambda: heads.ScalarModel(c, rngs=nnx.Rngs(params=0)))
    return llama.split(m)[1], llama.logical_axes(m)

  R = shd.TRAIN_RULES
  gib = lambda b: b / GIB
  pp, pa = lm(pol)
  vp, va = scalar(val)
  items = {"policy params": tree_bytes(pp, pa, mesh, R), "policy AdamW moments": 2 * tree_bytes(pp, pa, mesh, R)}
  if value:
    items.update({"value params": tree_bytes(vp, va, mesh, R), "value AdamW moments": 2 * tree_bytes(vp, va, mesh, R)})
  items.update({
      "reference (frozen)": tree_bytes(pp, pa, mesh, R, cfg.frozen_dtype),
      "helpfulness RM (frozen)": tree_bytes(*scalar(rm_h), mesh, R, cfg.frozen_dtype),
      "safety RM (frozen)": tree_bytes(*scalar(rm_s), mesh, R, cfg.frozen_dtype)})
  cd = np.dtype(jax.numpy.dtype(pol.dtype)).itemsize
  rows_gen = max(cfg.batch_prompts * k // cfg.generate_chunks // batch_shards, 1)
  kv_heads = pol.n_kv_heads // tensor if pol.n_kv_heads % tensor == 0 else pol.n_kv_heads
  phases = {
      "generate": {"policy in the sampling layout": tree_bytes(pp, pa, mesh, shd.SAMPLE_RULES, pol.dtype),
                   "KV cache": 2.0 * pol.n_layers * rows_gen * T * kv_heads * pol.head_dim * cd}}
  chunk_rows = max((cfg.micro_batch or cfg.batch_prompts) * k // batch_shards, 1)
  vocab = pol.vocab_size // tensor if pol.vocab_size % tensor == 0 else pol.vocab_size
  phases["score"] = {"logits of policy and reference (one chunk)": 2 * 3 * 4.0 * chunk_rows * T * vocab}
  micro_rows = max((cfg.micro_batch or cfg.minibatch) * k // batch_shards, 1)
  saved = pol.n_layers if pol.remat != "none" else pol.n_layers * 8
  # the TPU compiler (l2jax.aot, docs/tpu.md) showed the first version of this phase 15 GiB low at 70B: it left
  # out the value model's activations and, with micro-batches, the float32 accumulators beside each gradient
  grads = tree_bytes(pp, pa, mesh, R, "float32") + (tree_bytes(vp, va, mesh, R, "float32") if value else 0.0)
  phases["train"] = {"policy gradients": tree_bytes(pp, pa, mesh, R),
                     "value gradients": tree_bytes(vp, va, mesh, R),
                     "gradient accumulators (micro-batches)": grads if cfg.micro_batch else 0.0,
                     "policy activations (one micro-batch)": saved * micro_rows * T * pol.dim * cd
                                                             + 3 * 4.0 * micro_rows * T * vocab,
                     "value activations (one micro-batch)": saved * micro_rows * T * val.dim * cd}
  if not value:
    for key in ("value gradients", "value activations (one micro-batch)"):
      del phases["train"][key]
  resident = sum(items.values())
  peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
  peak = resident + sum(phases[peak_phase].values())
  return {"devices": n_devices, "mesh": mesh, "estimator": getattr(cfg, "estimator", "gae"),
          "resident_gib": gib(resident), "peak_gib": gib(peak),
          "peak_phase": peak_phase, "items_gib": {k: gib(v) for k, v in items.items()},
          "phases_gib": {p: {k: gib(v) for k, v in d.items()} for p, d in phases.items()},
          "device_memory_gib": cfg.device_memory_gib, "fits": gib(peak) <= cfg.device_memory_gib}


def print_plan(p: dict) -> None:
  name = "PPO" if p.get("estimator", "gae") == "gae" else f"{p['estimator'].upper()} (no value model)"
  print(f"{name} memory plan per device: {p['devices']} devices, mesh {p['mesh']}")
  for k, v in p["items_gib"].items():
    print(f"  {k:<44} {v:9.2f} GiB")
  for phase, d in p["phases_gib"].items():
    for k, v in d.items():
      print(f"  [{phase}] {k:<{42 - len(phase)}} {v:9.2f} GiB")
  print(f"  resident {p['resident_gib']:.2f} GiB; peak ({p['peak_phase']}) {p['peak_gib']:.2f} GiB of "
        f"{p['device_memory_gib']:.0f} GiB: {'fits' if p['fits'] else 'DOES NOT FIT'}")


def check(cfg, n_devices: int | None = None) -> dict:
  """Print the plan for `plan_devices` (or the devices present); exit 1 when it does not fit."""
  p = plan(cfg, n_devices or cfg.plan_devices or jax.device_count())
  print_plan(p)
  if not p["fits"]:
    raise SystemExit(1)
  return p


if __name__ == "__main__":   # python -m l2jax.stages.ppo_plan experiments/ppo.py:70b
  from l2jax.launch import load_experiment
  c_, _ = load_experiment(sys.argv[1])
  print(json.dumps(plan(c_, int(sys.argv[2]) if len(sys.argv) > 2 else c_.plan_devices or 8), indent=2))
