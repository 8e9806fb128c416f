"""The jitted programs of each stage, built abstractly for `l2jax.aot`: the stage's own step functions, shapes and
shardings, from `jax.ShapeDtypeStruct`s (no parameters, checkpoints or data).

  pretrain, sft, gatt      train_step (the LM loss, micro-batch accumulation, AdamW), eval_step
  reward                   train_step (the ranking loss of section 3.2.2 on [pairs, 2, seq] rows), score_step
  rejection                generate (the sampler, K samples per prompt, on one host's chips as the stage runs
                           it), train_step (fine-tuning on the pool)
  ppo                      generate, score, update (section 3.2.3; `l2jax.stages.ppo.build_programs`; GRPO and
                           RLOO: batch_prompts x group_size rows, no value model)
  dpo                      train_step (`stages.dpo.make_dpo_step`: the frozen reference's log-probs and the
                           policy's DPO gradient per micro-batch, AdamW), eval_logps (held-out pairs, chunked)

An architecture named by a reference (`init`, `policy`, `sampler`: a model directory or an experiment) is read
from that directory's config.json or that experiment's config, never from its weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2jax import sharding as shd
from l2jax import train
from l2jax.aot import AotError, Program, chip_bytes
from l2jax.model import llama
from l2jax.model.config import LlamaConfig

NUMERICS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl")


def for_slices(cfg: Any, slices: int) -> Any:
  """`cfg` with mesh.dcn = slices (data parallelism across slices; the global batch is unchanged)."""
  return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn=slices)) if slices > 1 else cfg


def architecture(ref: str, numerics: LlamaConfig, _depth: int = 0) -> LlamaConfig:
  """The model config a stage builds from `ref`: the architecture of the model directory or experiment it names
  (its config.json, or that experiment's own `model` / init chain), with `numerics`' dtype, remat and kernels, as
  `stages.common.model_setup` does. "" or an unknown path: `numerics` itself."""
  from l2jax.launch import is_reference, load_experiment
  saved = None
  if ref and (Path(ref) / "config.json").is_file():
    saved = LlamaConfig.load(Path(ref) / "config.json")
  elif ref and is_reference(ref) and _depth < 8:
    sub = load_experiment(ref)[0]
    inner = getattr(sub, "init", "") or getattr(sub, "sampler", "") or getattr(getattr(sub, "policy", None), "ckpt", "")
    saved = architecture(inner, sub.model, _depth + 1) if hasattr(sub, "model") else None
  if saved is None:
    return numerics
  return saved.replace(**{k: getattr(numerics, k) for k in NUMERICS})


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _batch(mesh, rules, shapes: dict[str, tuple[tuple[int, ...], Any]]) -> tuple[dict, dict]:
  """(shardings, ShapeDtypeStructs) of a batch dict {name: (shape, dtype)} split over the batch axes."""
  sh = {k: shd.batch_sharding(mesh, rules, len(s)) for k, (s, _) in shapes.items()}
  spec = shd.logical_to_spec(("batch",), rules, mesh)[0]
  shards = 1 if spec is None else int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec)]))
  for k, (s, _) in shapes.items():
    if s[0] % shards:
      raise AotError(f"{k}: {s[0]} rows do not split over the {shards} batch shards of mesh {dict(mesh.shape)}; "
                     f"use a batch that is a multiple of {shards} (e.g. --set global_batch=...) or a smaller slice")
  return sh, {k: jax.ShapeDtypeStruct(s, d, sharding=sh[k]) for k, (s, d) in shapes.items()}


def lm_batch(rows: int, seq_len: int) -> dict:
  i32 = jnp.int32
  return {"tokens": ((rows, seq_len), i32), "targets": ((rows, seq_len), i32), "positions": ((rows, seq_len), i32),
          "segment_ids": ((rows, seq_len), i32), "loss_mask": ((rows, seq_len), jnp.float32)}


def train_programs(cfg, mesh, loss_fn, abstract_params, axes, batch_shapes: dict, eval_fn=None,
                   eval_shapes: dict | None = None) -> list[Program]:
  """The one loop's train step (train.make_train_step with the stage's optimizer and accumulation), jitted as
  train.compile_step does, and the held-out evaluation forward pass."""
  micro = cfg.global_batch // cfg.micro_batch if cfg.micro_batch else 1
  steps = max(int(getattr(cfg, "steps", 0) or 0), 1)
  optimizer = train.make_optimizer(cfg.optim, steps)
  step_fn = train.make_train_step(loss_fn, optimizer, micro, train.lr_schedule(cfg.optim, steps))
  abstract_state = jax.eval_shape(lambda p: train.init_state(p, optimizer, cfg.seed), abstract_params)
  st_sh = train.state_shardings(abstract_state, axes, mesh)
  b_sh, batch = _batch(mesh, shd.TRAIN_RULES, batch_shapes)
  fn = jax.jit(step_fn, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)
  note = f"{cfg.global_batch} rows, {micro} micro-batch(es)"
  out = [Program("train_step", fn, (_abstract(abstract_state, st_sh), batch), mesh, shd.TRAIN_RULES, note)]
  if eval_fn is not None:   # the held-out pass, accumulated as the stages' eval hook does
    eval_fn = train.make_eval_step(eval_fn, micro)
    p_sh = st_sh["params"]
    e_sh, e_batch = _batch(mesh, shd.TRAIN_RULES, eval_shapes or batch_shapes)
    params = _abstract(abstract_state["params"], p_sh)
    state = _abstract(abstract_state, st_sh)
    out.append(Program("eval_step", jax.jit(eval_fn, in_shardings=(p_sh, e_sh)), (params, e_batch), mesh,
                       shd.TRAIN_RULES, resident=chip_bytes(state) - chip_bytes(params)))
  return out


def lm_programs(cfg, mesh, init: str, with_eval: bool) -> list[Program]:
  from l2jax.stages.common import lm_loss_fn
  model_cfg = architecture(init, cfg.model)
  if cfg.seq_len > model_cfg.max_seq_len:
    raise AotError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  abstract = llama.abstract(model_cfg)
  graphdef, params = llama.split(abstract)
  loss_fn = lm_loss_fn(graphdef)
  shapes = lm_batch(cfg.global_batch, cfg.seq_len)
  return train_programs(cfg, mesh, loss_fn, params, llama.logical_axes(abstract), shapes,
                        eval_fn=loss_fn if with_eval else None)


def reward_programs(cfg, mesh) -> list[Program]:
  from l2jax.stages.reward import abstract_scalar_model, pair_loss_fn, pair_scores_fn
  model_cfg = architecture(cfg.init, cfg.model)
  abstract = abstract_scalar_model(model_cfg)
  graphdef, params = llama.split(abstract)
  axes = llama.logical_axes(abstract)
  P, T = cfg.global_batch, cfg.seq_len
  shapes = {"tokens": ((P, 2, T), jnp.int32), "mask": ((P, 2, T), jnp.int32), "rating": ((P,), jnp.int32),
            "valid": ((P,), jnp.float32)}
  progs = train_programs(cfg, mesh, pair_loss_fn(graphdef, cfg.margin), params, axes, shapes)
  E = cfg.eval_batch or P
  p_sh = shd.tree_shardings(axes, mesh, shd.TRAIN_RULES, params)
  e_sh, e = _batch(mesh, shd.TRAIN_RULES, {"tokens": ((E, 2, T), jnp.int32), "mask": ((E, 2, T), jnp.int32)})
  score = jax.jit(pair_scores_fn(graphdef), in_shardings=(p_sh, e_sh["tokens"], e_sh["mask"]))
  train_state = progs[0].args[0]
  progs.append(Program("score_step", score, (_abstract(params, p_sh), e["tokens"], e["mask"]), mesh,
                       shd.TRAIN_RULES, f"{E} pairs",
                       resident=chip_bytes(train_state) - chip_bytes(train_state["params"])))
  return progs


def dpo_programs(cfg, mesh) -> list[Program]:
  """DPO's step as the stage jits it (stages.dpo.compile_dpo_step): state donated, the frozen reference an
  argument (so its bytes count), [pairs, 2, seq] rows; and the held-out log-prob pass (stages.dpo.eval_hook)."""
  from l2jax.stages.dpo import chunked_logps_fn, make_dpo_step
  model_cfg = architecture(cfg.init, cfg.model)
  if cfg.seq_len > model_cfg.max_seq_len:
    raise AotError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  abstract = llama.abstract(model_cfg)
  graphdef, params = llama.split(abstract)
  axes = llama.logical_axes(abstract)
  micro = cfg.global_batch // cfg.micro_batch if cfg.micro_batch else 1
  steps = max(int(cfg.steps or 0), 1)
  optimizer = train.make_optimizer(cfg.optim, steps)
  step_fn = make_dpo_step(graphdef, optimizer, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                          margin=cfg.margin, micro_batches=micro, schedule=train.lr_schedule(cfg.optim, steps))
  abstract_state = jax.eval_shape(lambda p: train.init_state(p, optimizer, cfg.seed), params)
  st_sh = train.state_shardings(abstract_state, axes, mesh)
  P, T, i32 = cfg.global_batch, cfg.seq_len, jnp.int32
  b_sh, batch = _batch(mesh, shd.TRAIN_RULES, {"tokens": ((P, 2, T), i32), "mask": ((P, 2, T), i32),
                                                "answer_mask": ((P, 2, T), i32), "rating": ((P,), i32),
                                                "valid": ((P,), jnp.float32)})
  fn = jax.jit(step_fn, in_shardings=(st_sh, st_sh["params"], b_sh), out_shardings=(st_sh, None), donate_argnums=0)
  state, ref = _abstract(abstract_state, st_sh), _abstract(params, st_sh["params"])
  out = [Program("train_step", fn, (state, ref, batch), mesh, shd.TRAIN_RULES,
                 f"{P} pairs x 2 x {T} tokens, {micro} micro-batch(es)")]
  E = cfg.eval_batch or P
  e_sh, e = _batch(mesh, shd.TRAIN_RULES, {"tokens": ((E, 2, T), i32), "answer_mask": ((E, 2, T), i32)})
  chunks = E // cfg.micro_batch if cfg.micro_batch else 1
  logps = jax.jit(chunked_logps_fn(graphdef, chunks), in_shardings=(st_sh["params"], e_sh["tokens"],
                                                                     e_sh["answer_mask"]))
  out.append(Program("eval_logps", logps, (ref, e["tokens"], e["answer_mask"]), mesh, shd.TRAIN_RULES,
                     f"{E} pairs in {chunks} chunk(s)", resident=chip_bytes(state)))   # the policy's trained state
  return out


def generate_program(model_cfg: LlamaConfig, mesh, rows: int, prompt_len: int, max_new_tokens: int,
                     sampling: tuple[bool, bool, bool], name: str = "generate") -> Program:
  """The sampler's prefill + decode loop (`l2jax.sample._generate`) for `rows` prompts of `prompt_len` tokens,
  weights under SAMPLE_RULES (tensor-parallel, replicated over data / fsdp), as `Sampler` places them."""
  from l2jax.sample import _bucket, _generate, _row_keys
  abstract = llama.abstract(model_cfg)
  graphdef, params = llama.split(abstract)
  dt = jnp.dtype(model_cfg.dtype)   # the Sampler casts the weights to the compute dtype once, before placing them
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt if jnp.issubdtype(a.dtype, jnp.floating)
                                                       else a.dtype), params)
  p_sh = shd.tree_shardings(llama.logical_axes(abstract), mesh, shd.SAMPLE_RULES, params)
  cache_len = min(max(prompt_len, _bucket(prompt_len + max_new_tokens, 16)), model_cfg.max_seq_len)
  b_sh, b = _batch(mesh, shd.SAMPLE_RULES, {"tokens": ((rows, prompt_len), jnp.int32), "lens": ((rows,), jnp.int32),
                                            "limits": ((rows,), jnp.int32)})
  keys = jax.eval_shape(_row_keys, jax.ShapeDtypeStruct((rows,), jnp.uint32), jax.ShapeDtypeStruct((rows,), jnp.uint32))
  keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=b_sh["lens"])
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt)
  args = (_abstract(params, p_sh), b["tokens"], b["lens"], b["limits"], keys, scalar(jnp.float32),
          scalar(jnp.int32), scalar(jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32), scalar(jnp.int32))

  class _Static:  # binds the static arguments so compile_program can call fn.lower(*args)
    def lower(self, *a):
      return _generate.lower(*a, graphdef=graphdef, cache_len=cache_len, n_out=_bucket(max_new_tokens, 16),
                             mode=sampling, mesh=mesh, return_logits=False)
  return Program(name, _Static(), args, mesh, shd.SAMPLE_RULES,
                 f"{rows} rows x ({prompt_len} prompt + {max_new_tokens} new) tokens")


def rejection_programs(cfg, mesh, devices) -> list[Program]:
  """Sampling runs on each host's own chips (the stage shards prompts over hosts), fine-tuning on the slice."""
  sampler = cfg.sampler or cfg.init
  model_cfg = architecture(sampler, cfg.model)
  if cfg.sample_dtype:
    model_cfg = model_cfg.replace(dtype=cfg.sample_dtype)
  host = [d for d in devices if d.process_index == devices[0].process_index]
  try:   # as the stage builds it: the configured data / fsdp / tensor sizes over one host's chips
    host_mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=host)
  except ValueError as e:
    raise AotError(f"rejection sampling runs on each host's {len(host)} chips: {e}; set mesh.tensor to at most "
                   f"{len(host)}") from None
  rows = cfg.batch_prompts * cfg.samples_per_prompt
  rows = -(-rows // len(host)) * len(host)
  progs = [generate_program(model_cfg, host_mesh, rows, cfg.prompts.max_prompt_tokens, cfg.max_new_tokens,
                            (False, cfg.top_k > 0, cfg.top_p < 1.0))]
  return progs + lm_programs(cfg, mesh, cfg.init or sampler, with_eval=False)


def abstract_models(cfg):
  """`stages.ppo.Models` with ShapeDtypeStructs for parameters: policy (= reference), value model and both reward
  models, their architectures from config.json files or experiment configs (stages.ppo.load_models' rules)."""
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.stages import ppo as ppo_stage
  from l2jax.stages.reward import abstract_scalar_model
  pol_cfg = architecture(cfg.policy, cfg.model)
  rm_cfgs = {"rm_helpful": architecture(cfg.reward_models.helpful, cfg.model),
             "rm_safety": architecture(cfg.reward_models.safety, cfg.model)}
  value_cfg = rm_cfgs["rm_helpful"] if cfg.value_init == "helpful" else pol_cfg
  graphdefs, axes = ppo_stage.model_graphs(cfg, pol_cfg, value_cfg, rm_cfgs)
  cast = lambda tree, dt: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dt)), tree)
  scalar = lambda mc: llama.split(abstract_scalar_model(mc))[1]
  lm = llama.split(llama.abstract(pol_cfg))[1]
  host = {"policy": cast(lm, pol_cfg.param_dtype), "ref": cast(lm, cfg.frozen_dtype),
          "value": cast(scalar(value_cfg), value_cfg.param_dtype),
          **{k: cast(scalar(v), cfg.frozen_dtype) for k, v in rm_cfgs.items()}}
  tok = Tokenizer(Path(__file__).resolve().parents[1] / "data/llama2-tokenizer/tokenizer.model")
  return ppo_stage.Models(tok, pol_cfg, value_cfg, graphdefs, axes, host)


def ppo_programs(cfg, mesh) -> list[Program]:
  """PPO's three programs (section 3.2.3) as the stage builds them (stages.ppo.build_programs): generate from
  the policy under SAMPLE_RULES; score with policy, reference, value model and both reward models; the update
  (policy and value model, AdamW each, over the mini-batches)."""
  from l2jax.stages import ppo as ppo_stage
  m = abstract_models(cfg)
  progs = ppo_stage.build_programs(cfg, m, mesh)
  B, L = cfg.rows, cfg.prompts.max_prompt_tokens   # rollout rows: batch_prompts x group_size (GRPO / RLOO)
  i32 = jnp.int32
  _, batch = _batch(mesh, shd.TRAIN_RULES, {"prompt_tokens": ((B, L), i32), "prompt_lens": ((B,), i32),
                                            "is_safety": ((B,), i32), "index": ((B,), i32)})
  state = _abstract(progs.abstract_state, progs.state_shardings)
  frozen = _abstract({k: m.host[k] for k in ("ref", "rm_helpful", "rm_safety")}, progs.frozen_shardings)
  purpose = jax.ShapeDtypeStruct((), i32)
  gen_args = (state["params"]["policy"], batch, state["rng"], state["step"], purpose)
  with shd.use_rules(mesh, shd.TRAIN_RULES):
    resp = jax.eval_shape(progs.generate, *gen_args)
    ro = jax.eval_shape(progs.score, state["params"], frozen, batch, resp)[0]
  rows = f"{B} {'rows' if cfg.grouped else 'prompts'} x ({L} + {cfg.max_new_tokens}) tokens"
  everything = chip_bytes(state) + chip_bytes(frozen)   # live for the whole run: trained state and frozen models
  return [Program("generate", progs.generate, gen_args, mesh, shd.TRAIN_RULES, rows,
                  resident=everything - chip_bytes(state["params"]["policy"])),
          Program("score", progs.score, (state["params"], frozen, batch, resp), mesh, shd.TRAIN_RULES, rows,
                  resident=everything - chip_bytes(state["params"]) - chip_bytes(frozen)),
          Program("update", progs.update, (state, ro), mesh, shd.TRAIN_RULES,
                  f"{cfg.ppo_epochs} epoch(s) of {cfg.batch_prompts // cfg.minibatch} mini-batches",
                  resident=chip_bytes(frozen))]


def programs(cfg, devices) -> list[Program]:
  """Every jitted program of the stage config `cfg` on a mesh over `devices` (cfg.mesh sizes the axes)."""
  stage = type(cfg).stage
  mesh = shd.mesh_from_config(cfg.mesh, devices)
  if stage == "pretrain":
    return lm_programs(cfg, mesh, cfg.init, with_eval=cfg.data.eval_every_nth > 0 and cfg.eval_every > 0)
  if stage in ("sft", "gatt"):
    return lm_programs(cfg, mesh, cfg.init, with_eval=getattr(cfg, "eval_every", 0) > 0)
  if stage == "reward":
    return reward_programs(cfg, mesh)
  if stage == "rejection":
    return rejection_programs(cfg, mesh, devices)
  if stage == "ppo":
    return ppo_programs(cfg, mesh)
  if stage == "dpo":
    return dpo_programs(cfg, mesh)
  if stage in ("rlhf", "overoptimization"):
    raise AotError(f"stage {stage!r} has no programs of its own to compile (it composes other experiments: run "
                   f"--aot on each of them)")
  raise AotError(f"stage {stage!r}: --aot does not compile its programs yet (it supports pretrain, sft, gatt, "
                 f"reward, rejection, ppo / grpo / rloo and dpo)")
