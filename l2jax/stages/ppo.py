"""PPO on the combined safety / helpfulness reward (Llama 2 section 3.2.3), and GRPO / RLOO as the same rollout
with group advantages (`PPO.estimator`). docs/ppo.md has the details.

run(cfg, run_dir): loads the policy (also the frozen reference pi_0), both reward models (frozen, in
`frozen_dtype`) and the value model (from the helpfulness RM, or the policy's backbone with a fresh head);
reads the prompts with their IS_SAFETY flag and holds some out (the evaluation set: a stratified sample of the
held-out "select" half, `load_prompts`); then runs `iterations` PPO iterations through
the one training loop (`l2jax.train.run`: checkpoints with policy, value, both optimiser states, the prompt
iterator and the RNG; exact resume; SIGTERM; the NaN stop). One iteration = three programs, each jitted once
with explicit shardings:
  generate  the policy's parameters constrained to the sampling layout, one response per prompt;
  score     policy, reference, value and both reward models over the whole rows; R~c, KL rewards, GAE;
  update    batch_prompts / minibatch AdamW steps for the policy and the value model (l2jax/rl/ppo.py).
They are separate programs (DESIGN.md 6b allows one) so that each phase is timed (t_generate, t_score,
t_train) and the KV cache and the training activations are never live in one program.
Outputs: metrics.jsonl (rewards, KL, entropy, clip fraction, approx KL, value loss, explained variance,
lengths, EOS rate, safety share, timings), samples.jsonl, eval metrics every `eval_every` iterations with early
stopping on held-out mean Rc, ppo.png, final/ (the policy: best evaluation, else last), value/ (the last value
model, also after an early stop). `--check-sharding`: the memory plan (l2jax/stages/ppo_plan.py, arithmetic
only) and, for small models, one iteration on the mesh against one device (`check_sharding_report`).
GRPO / RLOO (estimator "grpo" / "rloo", l2jax/rl/advantages.py): the step first repeats each prompt group_size
times (rows of a prompt contiguous), generate draws all rows in one call, score has no value model and puts each
row's group advantage on its tokens (rollout.make_group_score), update trains the policy alone with
advantages.policy_loss; no value model is loaded, trained or saved (no value/), and the memory plan and the
`--aot` programs leave it out. Evaluations answer one response per held-out prompt, batch_prompts * group_size
prompts per call (the programs' shapes).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax import checkpoint as ckpt_lib
from l2jax import config as c
from l2jax import reward as reward_lib
from l2jax import sharding as shd
from l2jax import train
from l2jax.data import prompts as prompts_lib
from l2jax.data.tokenizer import Tokenizer
from l2jax.model import heads, llama
from l2jax.model.config import LlamaConfig
from l2jax.rl import ppo as ppo_lib
from l2jax.rl import rollout as ro_lib
from l2jax.rl.rewards import kl_stats
from l2jax.stages import ppo_outputs as out
from l2jax.stages import ppo_plan

VALUE_DIR = "value"
ZERO = np.int32(0)   # the generation key purpose of training rollouts (a host scalar: no device op of its own)


class EarlyStop(Exception):
  """Raised by the PPO step after an evaluation asked to stop (patience exhausted); carries the state the
  step was given (the last one trained), from which value/ is written."""

  def __init__(self, state):
    super().__init__("early stop")
    self.state = state


# ----------------------------------------------------------------------------------------------- models

@dataclasses.dataclass
class Models:
  tokenizer: Tokenizer
  policy_cfg: Any
  value_cfg: Any           # None for the group estimators (no value model)
  graphdefs: dict          # policy, ref, value, rm_helpful, rm_safety
  axes: dict               # logical axes: policy, value, ref, rm_helpful, rm_safety
  host: dict               # host numpy params: policy, value, ref, rm_helpful, rm_safety


def trained(cfg: c.PPO) -> tuple[str, ...]:
  """The trained models: policy and value model (PPO), the policy alone (GRPO, RLOO)."""
  return ("policy",) if cfg.grouped else ("policy", "value")


def _scalar_graph(cfg) -> tuple[Any, Any]:
  abstract = nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0)))
  return llama.split(abstract)[0], llama.logical_axes(abstract)


def _cast(tree, dtype: str):
  dt = np.dtype(jnp.dtype(dtype))
  return jax.tree.map(lambda a: np.asarray(a).astype(dt) if np.issubdtype(np.asarray(a).dtype, np.floating)
                      else np.asarray(a), tree)


def model_graphs(cfg: c.PPO, pol_cfg, value_cfg, rm_cfgs: dict) -> tuple[dict, dict]:
  """(graphdefs, logical axes) of policy, reference, value model and both reward models; the frozen ones
  compute in cfg.frozen_dtype."""
  frozen = {"dtype": cfg.frozen_dtype, "param_dtype": cfg.frozen_dtype, "remat": "none"}
  graphdefs, axes = {}, {}
  graphdefs["policy"] = llama.split(llama.abstract(pol_cfg))[0]
  axes["policy"] = axes["ref"] = llama.logical_axes(llama.abstract(pol_cfg))
  graphdefs["ref"] = llama.split(llama.abstract(pol_cfg.replace(**frozen)))[0]
  if value_cfg is not None:
    graphdefs["value"], axes["value"] = _scalar_graph(value_cfg)
  for name, rcfg in rm_cfgs.items():
    graphdefs[name], axes[name] = _scalar_graph(rcfg.replace(**frozen))
  return graphdefs, axes


def load_models(cfg: c.PPO) -> Models:
  """Policy (= reference), value model (PPO only) and both reward models, as host arrays; shapes and vocabularies
  checked."""
  numerics = {k: getattr(cfg.model, k) for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl")}
  if not cfg.policy:
    raise ValueError("policy: set an l2jax checkpoint directory or an experiment reference (experiments/sft.py:ARG)")
  pol_cfg, pol = ckpt_lib.load_model_dir(cfg.policy)
  pol_cfg = pol_cfg.replace(**numerics)
  tok_path = Path(cfg.policy) / ckpt_lib.TOKENIZER
  if not tok_path.is_file():
    raise FileNotFoundError(f"{tok_path}: the policy checkpoint has no tokenizer.model")
  tok = Tokenizer(tok_path)
  rms, rm_cfgs = {}, {}
  for name, d in (("rm_helpful", cfg.reward_models.helpful), ("rm_safety", cfg.reward_models.safety)):
    if not d:
      raise ValueError(f"reward_models.{name[3:]}: set a reward-model directory or an experiment reference")
    rcfg, params, _ = reward_lib.load_params(d)
    if rcfg.vocab_size != pol_cfg.vocab_size:
      raise ValueError(f"{d}: reward model vocab_size {rcfg.vocab_size} != the policy's {pol_cfg.vocab_size}; "
                       f"they must share the tokenizer")
    rm_cfgs[name], rms[name] = rcfg, params
  if cfg.grouped:
    value_cfg, value = None, None
  elif cfg.value_init == "helpful":
    value_cfg, value = rm_cfgs["rm_helpful"].replace(**numerics), rms["rm_helpful"]
  else:
    value_cfg = pol_cfg
    head = llama.split(heads.ScalarHead(pol_cfg.dim, rngs=nnx.Rngs(params=cfg.seed + 1)))[1]
    value = {"backbone": heads.backbone_params(pol), "head": jax.device_get(head)}
  graphdefs, axes = model_graphs(cfg, pol_cfg, value_cfg, rm_cfgs)
  host = {"policy": _cast(pol, pol_cfg.param_dtype), "ref": _cast(pol, cfg.frozen_dtype),
          **({"value": _cast(value, value_cfg.param_dtype)} if value is not None else {}),
          **{k: _cast(v, cfg.frozen_dtype) for k, v in rms.items()}}
  return Models(tok, pol_cfg, value_cfg, graphdefs, axes, host)


# ----------------------------------------------------------------------------------------------- prompts

@dataclasses.dataclass
class PromptData:
  train_ids: list
  train: list
  held_ids: list      # the evaluation set: a stratified sample of the held-out "select" half
  held: list
  stats: dict


def load_prompts(p: c.Prompts, tok: Tokenizer, seed: int = 0) -> PromptData:
  """Training prompts, and the evaluation set that selects final/ and early-stops: `eval_prompts` of the
  held-out "select" half (l2jax.data.prompts.heldout_part; the versions evaluation reports on the other half),
  a seeded sample stratified by source and IS_SAFETY (never the first N: the sources' order puts one first)."""
  errors: list = []
  records = prompts_lib.read_prompts(p.sources, skip_bad=p.skip_bad, errors=errors)
  train_p, held_p = prompts_lib.split_heldout(records, p.heldout_fraction, part="select")
  tr_ids, tr, tr_stats = prompts_lib.encode_prompts(tok, train_p, p.max_prompt_tokens, p.system)
  he_ids, he, he_stats = prompts_lib.encode_prompts(tok, held_p, p.max_prompt_tokens, p.system)
  if not tr:
    r = records.stats
    raise ValueError(f"prompts: no usable training prompt in {list(p.sources)}: {r['records']} read, "
                     f"{r['skipped_bad']} bad records skipped, {tr_stats['dropped_too_long']} longer than "
                     f"max_prompt_tokens={p.max_prompt_tokens}")
  pick = prompts_lib.stratified_sample(he, p.eval_prompts, seed)
  he_ids, he = [he_ids[i] for i in pick], [he[i] for i in pick]
  return PromptData(tr_ids, tr, he_ids, he, {"read": records.stats, "train": tr_stats, "heldout": he_stats,
                                             "heldout_part": "select", "eval": prompts_lib.eval_stats(he),
                                             "bad_records": errors[:20], "eval_prompts": len(he)})


# ----------------------------------------------------------------------------------------------- programs

def _keys(rng, step, purpose: int):
  """key data for (iteration `step`, purpose): generation 0, update 1, evaluation 2."""
  k = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), purpose)
  return jax.random.key_data(k)


@dataclasses.dataclass
class Programs:
  generate: Any
  score: Any
  update: Any
  mesh: Any
  state_shardings: Any
  frozen: Any               # device params of ref, rm_helpful, rm_safety
  threshold_logit: float
  samples: int
  abstract_state: Any
  init_state: Any           # params {"policy", "value"} (grpo / rloo: {"policy"}) -> a fresh state
  frozen_shardings: Any = None
  expand: Any = None        # grpo / rloo: prompt batch -> group_size rows per prompt (rollout.repeat_groups)


def build_programs(cfg: c.PPO, m: Models, mesh, reward_fn=None) -> Programs:
  """The three programs (generate, score, update) of one iteration; for grpo / rloo also `expand`, and score and
  update without the value model."""
  tok = m.tokenizer
  rules = shd.TRAIN_RULES
  names = trained(cfg)
  sh = lambda name: shd.tree_shardings(m.axes[name], mesh, rules, m.host[name])
  p_sh = {k: sh(k) for k in names}
  f_sh = {k: sh(k) for k in ("ref", "rm_helpful", "rm_safety")}
  sample_sh = shd.tree_shardings(m.axes["policy"], mesh, shd.SAMPLE_RULES, m.host["policy"])
  updates = cfg.iterations * cfg.ppo_epochs * cfg.batch_prompts // cfg.minibatch
  opts = {"policy": train.make_optimizer(cfg.optim, updates)}
  if not cfg.grouped:
    opts["value"] = train.make_optimizer(cfg.value_optim, updates)
  def init_state(p):
    return {"params": p, "opt": {k: opts[k].init(p[k]) for k in names},
            "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(cfg.seed))}
  abstract_state = jax.eval_shape(init_state, {k: m.host[k] for k in names})
  st_sh = train.state_shardings(abstract_state, {k: m.axes[k] for k in names}, mesh, rules)
  gen = ro_lib.make_generate(m.graphdefs["policy"], m.policy_cfg, mesh, sample_sh, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id,
                             chunks=cfg.generate_chunks)
  chunks = cfg.batch_prompts // cfg.micro_batch if cfg.micro_batch else 1
  rm = cfg.reward_models
  same = bool(rm.helpful) and Path(rm.helpful).resolve() == Path(rm.safety).resolve()
  reward_fn = reward_fn or ro_lib.reward_model_fn(m.graphdefs["rm_helpful"], m.graphdefs["rm_safety"], same=same)
  k_group = cfg.group_size
  if cfg.grouped:   # mini-batches and micro-batches count prompts: k rows each
    score = ro_lib.make_group_score(m.graphdefs["policy"], m.graphdefs["ref"], reward_fn, estimator=cfg.estimator,
                                    group_size=k_group, eos_id=tok.eos_id, pad_id=tok.pad_id, kl_beta=cfg.kl_beta,
                                    kl_in=cfg.kl_placement, threshold=cfg.reward_models.safety_threshold,
                                    missing_eos_penalty=cfg.missing_eos_penalty, chunks=chunks,
                                    temperature=cfg.temperature)
    loss = ppo_lib.group_policy_loss_fn(m.graphdefs["policy"], cfg.clip, cfg.temperature,
                                        normalization=cfg.normalization,
                                        kl_beta=cfg.kl_beta if cfg.kl_placement == "loss" else 0.0,
                                        new_tokens=cfg.max_new_tokens)
    update = ppo_lib.make_update(m.graphdefs["policy"], None, opts["policy"], None,
                                 minibatch=cfg.minibatch * k_group, micro_batch=cfg.micro_batch * k_group,
                                 epochs=cfg.ppo_epochs, clip=cfg.clip, value_clip=cfg.value_clip,
                                 temperature=cfg.temperature, policy_loss=loss)
    fields = ppo_lib.GROUP_UPDATE_FIELDS
  else:
    score = ro_lib.make_score(m.graphdefs["policy"], m.graphdefs["ref"], m.graphdefs["value"], reward_fn,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, kl_beta=cfg.kl_beta, gamma=cfg.gamma,
                              lam=cfg.lam, threshold=cfg.reward_models.safety_threshold,
                              missing_eos_penalty=cfg.missing_eos_penalty, whiten_advantages=cfg.whiten_advantages,
                              chunks=chunks, temperature=cfg.temperature)
    update = ppo_lib.make_update(m.graphdefs["policy"], m.graphdefs["value"], opts["policy"], opts["value"],
                                 minibatch=cfg.minibatch, micro_batch=cfg.micro_batch, epochs=cfg.ppo_epochs,
                                 clip=cfg.clip, value_clip=cfg.value_clip, temperature=cfg.temperature,
                                 new_tokens=cfg.max_new_tokens)
    fields = ppo_lib.UPDATE_FIELDS
  thr = float(np.log(cfg.reward_models.safety_threshold) - np.log1p(-cfg.reward_models.safety_threshold))
  k = cfg.samples_logged
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def gen_fn(policy, batch, rng, step, purpose):
    return gen(policy, batch, _keys(rng, step, purpose))

  def score_fn(params, frozen, batch, resp):
    ro = score(params, frozen, batch, resp)
    picked = {"sample_tokens": ro.tokens[:k], "sample_mask": ro.mask[:k], "sample_index": batch["index"][:k],
              "sample_rh": ro.helpful[:k], "sample_rs": ro.safety[:k], "sample_rc": ro.score[:k]}
    if cfg.grouped:   # per row: the sequence reward, its group advantage, its KL (k1)
      picked.update(sample_reward=ro.seq_reward[:k], sample_advantage=ro.seq_advantage[:k],
                    sample_kl=kl_stats(ro.logprobs, ro.ref_logprobs, ro.mask)["k1"][:k])
      stats = out.group_stats(ro, thr, k_group)
    else:
      stats = out.rollout_stats(ro, thr)
    picked = jax.lax.with_sharding_constraint(picked, jax.tree.map(lambda _: rep, picked))
    return ro, {**stats, "gen_tokens": jnp.sum(resp.lengths_b).astype(jnp.float32)}, picked

  def update_fn(state, ro):
    data = {f: getattr(ro, f) for f in fields}
    new, metrics = update(state, data, _keys(state["rng"], state["step"], 1))
    if cfg.grouped:
      metrics["finite"] = train.all_finite(metrics["policy_loss"], metrics["policy_grad_norm"], new["params"])
      metrics["loss"] = metrics["policy_loss"]
      return new, metrics
    metrics["finite"] = train.all_finite(metrics["policy_loss"], metrics["value_loss"], metrics["policy_grad_norm"],
                                         metrics["value_grad_norm"], new["params"])
    metrics["loss"] = metrics["policy_loss"] + metrics["value_loss"]
    return new, metrics

  frozen = None   # abstract models (ahead-of-time compilation, l2jax.aot): nothing is placed
  if not isinstance(jax.tree.leaves(m.host["ref"])[0], jax.ShapeDtypeStruct):
    with shd.use_rules(mesh, rules):
      frozen = {k: shd.put(m.host[k], f_sh[k]) for k in f_sh}
  expand = None
  if cfg.grouped:   # out: the rows split over the batch axes, as the loop places a batch
    expand = jax.jit(lambda b: ro_lib.repeat_groups(b, k_group), out_shardings=shd.batch_sharding(mesh, rules, 1))
  return Programs(
      generate=jax.jit(gen_fn, in_shardings=(p_sh["policy"], None, rep, rep, rep)),
      score=jax.jit(score_fn, in_shardings=(p_sh, f_sh, None, None)),
      update=jax.jit(update_fn, in_shardings=(st_sh, None), out_shardings=(st_sh, None), donate_argnums=0),
      mesh=mesh, state_shardings=st_sh, frozen=frozen, threshold_logit=thr, samples=k,
      abstract_state=abstract_state, init_state=init_state, frozen_shardings=f_sh, expand=expand)


class PPOStep:
  """One PPO iteration as `train.run` calls a step: step(state, batch) -> (state, metrics)."""
  rules = shd.TRAIN_RULES

  def __init__(self, progs: Programs, tokens_per_row: int):
    self.p, self.tokens_per_row, self.stop = progs, tokens_per_row, False

  def __call__(self, state, batch):
    if self.stop:
      raise EarlyStop(state)
    p = self.p
    with shd.use_rules(p.mesh, self.rules):
      if p.expand is not None:
        batch = p.expand(batch)
      t0 = time.perf_counter()
      resp = jax.block_until_ready(p.generate(state["params"]["policy"], batch, state["rng"], state["step"], ZERO))
      t1 = time.perf_counter()
      ro, stats, picked = jax.block_until_ready(p.score(state["params"], p.frozen, batch, resp))
      t2 = time.perf_counter()
      state, metrics = p.update(state, ro)
      jax.block_until_ready(metrics)
      t3 = time.perf_counter()
    return state, {**stats, **metrics, **picked, "t_generate": t1 - t0, "t_score": t2 - t1, "t_train": t3 - t2,
                   "gen_tokens_per_s": float(stats["gen_tokens"]) / max(t1 - t0, 1e-9),
                   "prompt_width": int(batch["prompt_tokens"].shape[1])}


# ----------------------------------------------------------------------------------------------- --check-sharding

def check_sharding_report(cfg: c.PPO, n_devices: int | None = None) -> dict:
  """The memory plan (l2jax/stages/ppo_plan.py; exit 1 when it does not fit); when the models exist here and
  are small, also one iteration on the mesh against one device (exit 1 when the parameters differ)."""
  p = ppo_plan.check(cfg, n_devices)
  dirs = (cfg.policy, cfg.reward_models.helpful, cfg.reward_models.safety)
  small = all(Path(d, ckpt_lib.CONFIG).is_file() for d in dirs) and \
      LlamaConfig.load(Path(cfg.policy) / ckpt_lib.CONFIG).num_params() < 5e7
  if small and p["devices"] == jax.device_count() > 1:
    err = compare_one_device(cfg)
    ok = err < 1e-4
    print(f"one PPO iteration on mesh {p['mesh']} vs one device: parameter rel. error {err:.2e}: "
          f"{'OK' if ok else 'MISMATCH'}")
    if not ok:
      raise SystemExit(1)
    p["param_rel_err"] = err
  return p


def one_iteration(cfg: c.PPO, mesh):
  """(host params after one PPO iteration, scalar metrics) on `mesh` from the config's checkpoints."""
  m = load_models(cfg)
  data = load_prompts(cfg.prompts, m.tokenizer, cfg.seed)
  progs = build_programs(cfg, m, mesh)
  batches = prompts_lib.PromptBatches(data.train_ids, data.train, batch_size=cfg.batch_prompts,
                                      prompt_len=cfg.prompts.max_prompt_tokens, seed=cfg.seed,
                                      pad_id=m.tokenizer.pad_id)
  params = {k: shd.put(m.host[k], progs.state_shardings["params"][k]) for k in trained(cfg)}
  state = jax.jit(progs.init_state, out_shardings=progs.state_shardings)(params)
  step = PPOStep(progs, cfg.prompts.max_prompt_tokens + cfg.max_new_tokens)
  state, met = step(state, shd.global_batch(next(batches), mesh))
  return jax.device_get(state["params"]), {k: float(v) for k, v in met.items() if np.ndim(v) == 0}


def compare_one_device(cfg: c.PPO) -> float:
  """Max relative parameter error after one iteration on the configured mesh vs one device."""
  mesh = shd.mesh_from_config(cfg.mesh)
  p_mesh, _ = one_iteration(cfg, mesh)
  p_one, _ = one_iteration(cfg, shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  return train._rel_err(p_mesh, p_one)


# ----------------------------------------------------------------------------------------------- run

def run(cfg: c.PPO, run_dir: Path, check_sharding: bool = False, reward_fn=None):
  """Train the policy with PPO; reward_fn replaces the two reward models (tests: a rule-based scorer)."""
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  if check_sharding:
    return check_sharding_report(cfg)
  mesh = shd.mesh_from_config(cfg.mesh)
  m = load_models(cfg)
  P, N = cfg.prompts.max_prompt_tokens, cfg.max_new_tokens
  if P + N > m.policy_cfg.max_seq_len:
    raise ValueError(f"prompts.max_prompt_tokens + max_new_tokens = {P + N} exceeds the policy's max_seq_len "
                     f"{m.policy_cfg.max_seq_len}")
  data = load_prompts(cfg.prompts, m.tokenizer, cfg.seed)
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data_stats.json").write_text(json.dumps(data.stats, indent=2) + "\n")
  s, ev = data.stats["train"], data.stats["eval"]
  group = (f" x {cfg.group_size} samples ({cfg.estimator}, KL in the {cfg.kl_placement}, {cfg.normalization}-mean "
           f"loss)" if cfg.grouped else "")
  print(f"ppo: {s['kept']} training prompts ({s['safety']} safety; {s['dropped_too_long']} longer than "
        f"{P} tokens dropped, {s['duplicates']} duplicates, {s['skipped_bad']} bad records skipped), "
        f"{ev['prompts']} evaluation prompts ({ev['safety_share']:.0%} safety: {ev['by_stratum']}); "
        f"{cfg.iterations} iterations of {cfg.batch_prompts} prompts{group}, {cfg.batch_prompts // cfg.minibatch} "
        f"mini-batch steps each", file=sys.stderr)
  progs = build_programs(cfg, m, mesh, reward_fn)
  batches = prompts_lib.PromptBatches(data.train_ids, data.train, batch_size=cfg.batch_prompts, prompt_len=P,
                                      seed=cfg.seed, pad_id=m.tokenizer.pad_id, process_index=jax.process_index(),
                                      process_count=jax.process_count(), buckets=cfg.prompt_buckets)
  identity = {"stage": "ppo", "name": cfg.name, "init": cfg.policy,
              "policy": {k: getattr(m.policy_cfg, k) for k in ("vocab_size", "dim", "n_layers", "n_heads",
                                                               "n_kv_heads", "ffn_dim")}}
  if cfg.grouped:   # no value model; the estimator and the group fix the state's meaning
    identity.update(estimator=cfg.estimator, group_size=cfg.group_size)
  else:
    identity.update(value_init=cfg.value_init, value={k: getattr(m.value_cfg, k) for k in ("dim", "n_layers")})
  ck = ckpt_lib.TrainCheckpointer(run_dir, keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save, identity=identity)
  state = out.init_or_resume(cfg, ck, progs, m, batches)
  step = PPOStep(progs, P + N)
  start = int(jax.device_get(state["step"]))
  early = out.EarlyStopping(run_dir, cfg.patience, start)   # evaluations after `start` are redone
  out.trim_samples(run_dir, start)
  hooks = ()
  if cfg.eval_every and data.held:
    hook = out.eval_hook(cfg, progs, m, data, run_dir, early, step)
    hooks = (train.Hook(cfg.eval_every, hook),)
    if start == 0 and not early.history:   # the starting policy's held-out figures, logged as iteration 0
      out.log_step(run_dir, 0, hook(0, state), cfg.tensorboard)
  status, last_state = "done", state
  if early.stopped:
    print(f"ppo: stopped early before (best iteration {early.best_step}); nothing to do", file=sys.stderr)
    result = None
  else:
    try:
      result = train.run(step, state, batches, total_steps=cfg.iterations, run_dir=run_dir, ckpt=ck,
                         ckpt_every=cfg.ckpt.every, mesh=mesh, log_every=cfg.log_every, hooks=hooks,
                         tokens_per_step=cfg.rows * (P + N), tensorboard=cfg.tensorboard,
                         description=cfg.estimator if cfg.grouped else "ppo",
                         outputs_fn=out.samples_writer(run_dir, m.tokenizer, data.train))
      status, last_state = result.status, result.state
    except EarlyStop as stop:
      print(f"ppo: early stop: {cfg.patience} evaluations without a better held-out Rc; best iteration "
            f"{early.best_step}", file=sys.stderr)
      result, last_state = None, stop.state
  ck.close()
  if status == "done":
    out.write_final(run_dir, m, last_state, early)
    out.plot(run_dir)
    print(out.summary(run_dir), file=sys.stderr)
  return result
