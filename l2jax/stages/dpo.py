"""Direct Preference Optimization (Rafailov et al. 2023) as a stage: the DPO loss (l2jax.losses.dpo_loss) on the
reward models' preference pairs, through the one training loop (l2jax.train.run).

run(cfg, run_dir): reads the pairs exactly as the reward stage does (`reward.load_preferences`: safety filter,
identical answers dropped, held-out split by conversation, mixture, eval sets), starts the policy from `cfg.init`
and keeps `cfg.init` frozen as the reference pi_ref, trains for `epochs` over the pairs (exact resume, SIGTERM,
the NaN stop: train.run), evaluates every held-out set every `eval_every` steps and at the end
(run_dir/dpo_eval.json and eval/<set>/... in metrics.jsonl), and writes run_dir/final: an l2jax model directory
(params/, config.json, tokenizer.model) plus dpo.json (how it was trained).

Rows: a pair is two rows, tokens / answer_mask [P, 2, T] (row 0 chosen, row 1 rejected;
`preferences.pair_batch(answer_mask=True)`): encode_chat(dialog) + the answer pieces (EOS only when the response
is finished), the answer mask 1 on the answer tokens alone. log pi(y | x) = sum over the answer tokens of the
teacher-forced token log-probs (`losses.sequence_logprob`); the prompt is never scored. A row longer than seq_len
keeps BOS and its last tokens, so the chosen and rejected rows of a long dialog may keep different amounts of it.

The reference is computed inside the step, once per pair per step, from frozen parameters held as a separate
argument of the jitted step (`make_dpo_step`; PPO holds its frozen models the same way), not precomputed: nothing
to store or to keep in step with the data order and its resumption, any number of epochs, and no pass over the
data before the first step. It costs one forward pass per pair (the policy's forward and backward cost three:
`flops_per_token` counts 4/3 of the LM's) and one more copy of the parameters in param_dtype (the policy also holds
two AdamW moments); in the same dtype and program as the policy, so at step 0 pi == pi_ref: loss log 2, rewards 0.
Precomputing would save that forward pass (a quarter of a step) for a pass over the data before training and a
store of log-probs tied to the pairs' order.

Metrics, each step (means over the step's pairs) and for each held-out set at evaluations (means over the set):
loss, rewards_chosen, rewards_rejected (r = beta * (log pi - log pi_ref) of each answer), reward_accuracy (share
with r_c > r_r), reward_margin (r_c - r_r), logps_chosen, logps_rejected (log pi of the answers: both falling while
the margin grows is the failure users of DPO report). Evaluations also give ref_logps_chosen / ref_logps_rejected
and logratio_chosen / logratio_rejected: the mean per-token log-ratio log pi(y_t | x, y_<t) - log pi_ref(...) over
the answer tokens of the held-out chosen / rejected answers. This is teacher-forced on the data's answers, not the
KL divergence KL(pi || pi_ref), which needs answers sampled from pi; it can be negative.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from l2jax import checkpoint as ckpt_lib
from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.data import preferences as prefs
from l2jax.losses import dpo_loss, rating_margin, sequence_logprob, token_nll
from l2jax.stages.common import (Setup, identity, micro_batches, model_setup, restore_or_init, sharding_report,
                                 write_final)
from l2jax.stages.reward import load_preferences

DPO_JSON = "dpo.json"
EVAL_JSON = "dpo_eval.json"
METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


# ----------------------------------------------------------------------------------------------- the loss

def pair_logps_fn(graphdef):
  """logps(params, tokens [P, 2, T], answer_mask [P, 2, T]) -> (log pi(y | x) [P, 2], answer tokens [P, 2]), f32.

  The two rows of each pair as 2P rows through the LM; token t's log-prob is read from the logits at t - 1
  (targets shifted left; the last position has none), summed over the answer tokens."""
  def logps(params, tokens_p2t, answer_mask_p2t):
    P, two, T = tokens_p2t.shape
    tokens_rt = tokens_p2t.reshape(P * two, T)
    logits_rtv = nnx.merge(graphdef, params)(tokens_rt)
    targets_rt = jnp.concatenate([tokens_rt[:, 1:], jnp.zeros_like(tokens_rt[:, :1])], axis=1)
    mask_rt = jnp.concatenate([answer_mask_p2t.reshape(P * two, T)[:, 1:],
                               jnp.zeros((P * two, 1), answer_mask_p2t.dtype)], axis=1)
    logp_r = sequence_logprob(-token_nll(logits_rtv, targets_rt), mask_rt)
    return logp_r.reshape(P, two), jnp.sum(mask_rt, axis=1).astype(jnp.float32).reshape(P, two)
  return logps


def pair_terms(policy_p2, ref_p2, rating_p, valid_p, beta: float, label_smoothing: float, margin: str):
  """(sum over pairs of the DPO loss, number of pairs, {metric: sum over pairs}), padding pairs (valid 0) left out.

  `dpo_loss` of each pair alone (a vmap), so sums over micro-batches and padded batches equal the means of
  `dpo_loss` over all real pairs exactly once divided by the number of pairs."""
  def one(pc, pr, rc, rr, m):
    return dpo_loss(pc[None], pr[None], rc[None], rr[None], beta, label_smoothing, m[None])
  loss_p, met_p = jax.vmap(one)(policy_p2[:, 0], policy_p2[:, 1], ref_p2[:, 0], ref_p2[:, 1],
                                rating_margin(rating_p, margin))
  w_p = valid_p.astype(jnp.float32)
  return jnp.sum(loss_p * w_p), jnp.sum(w_p), {k: jnp.sum(met_p[k] * w_p) for k in METRICS}


def dpo_loss_fn(graphdef, beta: float, label_smoothing: float, margin: str):
  """loss_fn(params, batch) -> (loss sum, (number of pairs, metric sums)); batch: tokens, answer_mask, rating,
  valid and ref_logps [P, 2] (the reference's log pi_ref(y | x), constants here)."""
  logps = pair_logps_fn(graphdef)

  def loss_fn(params, batch):
    policy_p2, _ = logps(params, batch["tokens"], batch["answer_mask"])
    loss_sum, weight, sums = pair_terms(policy_p2, batch["ref_logps"], batch["rating"], batch["valid"], beta,
                                        label_smoothing, margin)
    return loss_sum, (weight, sums)
  return loss_fn


# ----------------------------------------------------------------------------------------------- the step

def make_dpo_step(graphdef, optimizer: optax.GradientTransformation, *, beta: float, label_smoothing: float = 0.0,
                  margin: str = "none", micro_batches: int = 1, schedule: optax.Schedule | None = None):
  """step(state, ref_params, batch) -> (state, metrics): pure; train.make_train_step's update with DPO's metrics.

  Per micro-batch (rows i, i+k, ... as `train.split_micro`): log pi_ref of its pairs from the frozen `ref_params`
  (no gradient), then the gradient of the summed pair losses; sums accumulate over the micro-batches and are
  divided once by the number of pairs, so k micro-batches equal one batch. Metrics: loss, the `dpo_loss` metrics
  (means over the pairs), loss_weight (pairs), grad_norm, lr (with `schedule`), finite (train.all_finite).
  (Its own step rather than make_train_step's because that step's loss_fn returns no metrics.)
  """
  logps = pair_logps_fn(graphdef)
  grad_fn = jax.value_and_grad(dpo_loss_fn(graphdef, beta, label_smoothing, margin), has_aux=True)

  def one(params, ref_params, mb):
    ref_p2 = jax.lax.stop_gradient(logps(ref_params, mb["tokens"], mb["answer_mask"])[0])
    (loss_sum, (weight, sums)), grads = grad_fn(params, {**mb, "ref_logps": ref_p2})
    return grads, loss_sum, weight, sums

  def step(state, ref_params, batch):
    params = state["params"]
    if micro_batches == 1:
      grads, loss_sum, weight, sums = one(params, ref_params, batch)
    else:
      def body(acc, mb):
        return jax.tree.map(jnp.add, acc, one(params, ref_params, mb)), None
      zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0), jnp.float32(0),
               {k: jnp.float32(0) for k in METRICS})
      (grads, loss_sum, weight, sums), _ = jax.lax.scan(body, zeros, train.split_micro(batch, micro_batches))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    updates, opt = optimizer.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    loss, grad_norm = loss_sum / denom, optax.global_norm(grads)
    metrics = {"loss": loss, **{k: v / denom for k, v in sums.items()}, "loss_weight": weight,
               "grad_norm": grad_norm, "finite": train.all_finite(loss, grad_norm, new_params)}
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return {"params": new_params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}, metrics

  return step


@dataclasses.dataclass
class DPOStep:
  """The jitted DPO step as train.run calls a step: step(state, batch), the frozen reference passed along."""
  fn: Any
  mesh: Any
  ref_params: Any
  rules: shd.Rules = shd.TRAIN_RULES

  def __call__(self, state, batch):
    with shd.use_rules(self.mesh, self.rules):
      return self.fn(state, self.ref_params, batch)


def compile_dpo_step(step_fn, abstract_state, setup: Setup, ref_params, example_batch) -> DPOStep:
  """jit with explicit shardings (state and reference by their logical axes, the batch over its rows), state
  donated; the reference is an argument, never donated, never a constant."""
  mesh = setup.mesh
  st_sh = train.state_shardings(abstract_state, setup.param_axes, mesh)
  b_sh = {k: shd.batch_sharding(mesh, shd.TRAIN_RULES, np.ndim(v)) for k, v in example_batch.items()}
  fn = jax.jit(step_fn, in_shardings=(st_sh, st_sh["params"], b_sh), out_shardings=(st_sh, None),
               donate_argnums=0)
  return DPOStep(fn, mesh, ref_params)


# ----------------------------------------------------------------------------------------------- evaluation

def chunked_logps_fn(graphdef, chunks: int):
  """`pair_logps_fn` over `chunks` sequential chunks of the batch (a lax.map over `train.split_micro`'s split), so
  an evaluation batch never holds more activations than one training micro-batch."""
  logps = pair_logps_fn(graphdef)

  def fn(params, tokens_p2t, answer_mask_p2t):
    P = tokens_p2t.shape[0]
    if chunks <= 1 or P % chunks:
      return logps(params, tokens_p2t, answer_mask_p2t)
    mb = train.split_micro({"tokens": tokens_p2t, "answer_mask": answer_mask_p2t}, chunks)
    out = jax.lax.map(lambda b: logps(params, b["tokens"], b["answer_mask"]), mb)   # [k, P / k, 2] each
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(P, *x.shape[2:]), out)
  return fn


def heldout_metrics(policy_n2, ref_n2, tokens_n2, rating_n, beta: float, label_smoothing: float,
                    margin: str) -> dict[str, float]:
  """The step's metrics over a whole held-out set (`dpo_loss` over its N pairs), plus ref_logps_chosen /
  ref_logps_rejected (means of log pi_ref) and logratio_chosen / logratio_rejected: sum of (log pi - log pi_ref)
  over every answer token of the set / number of those tokens (teacher-forced on the data, not a sampled KL)."""
  policy_n2, ref_n2, tokens_n2 = (np.asarray(x, np.float64) for x in (policy_n2, ref_n2, tokens_n2))
  if len(policy_n2) == 0:
    return {}
  loss, met = dpo_loss(policy_n2[:, 0], policy_n2[:, 1], ref_n2[:, 0], ref_n2[:, 1], beta, label_smoothing,
                       rating_margin(rating_n, margin))
  out = {"loss": float(loss), **{k: float(v) for k, v in met.items()}, "pairs": len(policy_n2)}
  for j, side in enumerate(("chosen", "rejected")):
    out[f"ref_logps_{side}"] = float(ref_n2[:, j].mean())
    out[f"logratio_{side}"] = float((policy_n2[:, j] - ref_n2[:, j]).sum() / max(tokens_n2[:, j].sum(), 1.0))
  return out


def eval_batches(tok, pairs, seq_len: int, batch_pairs: int) -> list[dict[str, np.ndarray]]:
  """This process's share of each held-out batch of `batch_pairs` pairs (the last padded with valid-0 pairs), each
  padded to the bucket of its longest row."""
  local, pi = batch_pairs // jax.process_count(), jax.process_index()
  out = []
  for i in range(0, len(pairs), batch_pairs):
    chunk = pairs[i:i + batch_pairs]
    T = prefs.bucket_len(max(len(r) for r in prefs.pair_batch_rows(tok, chunk, seq_len)), seq_len)
    b = prefs.pair_batch(tok, chunk, T, size=batch_pairs, max_len=seq_len, answer_mask=True)
    out.append({k: b[k][pi * local:(pi + 1) * local] for k in ("tokens", "answer_mask")})
  return out


def eval_hook(cfg: c.DPO, setup: Setup, ref_params, evals: dict, run_dir: Path, every: int) -> train.Hook:
  """Hook: `heldout_metrics` of every held-out set (eval/<set>/<metric>) and run_dir/dpo_eval.json. The
  reference's log-probs never change: computed at the first evaluation and kept."""
  mesh = setup.mesh
  p_sh = shd.tree_shardings(setup.param_axes, mesh, shd.TRAIN_RULES, setup.abstract_params)
  batch_pairs = cfg.eval_batch or cfg.global_batch
  chunks = batch_pairs // cfg.micro_batch if cfg.micro_batch else 1
  fn = jax.jit(chunked_logps_fn(setup.graphdef, chunks), in_shardings=(p_sh, None, None),
               out_shardings=NamedSharding(mesh, PartitionSpec()))
  host: dict[str, list] = {}
  ref: dict[str, np.ndarray] = {}

  def logps(params, name):
    if name not in host:
      host[name] = eval_batches(setup.tokenizer, evals[name], cfg.seq_len, batch_pairs)
    out = []
    with shd.use_rules(mesh, shd.TRAIN_RULES):
      for b in host[name]:
        g = shd.global_batch(b, mesh)
        out.append(jax.device_get(fn(params, g["tokens"], g["answer_mask"])))
    n = len(evals[name])
    return np.concatenate([o[0] for o in out])[:n], np.concatenate([o[1] for o in out])[:n]

  def hook(step, state):
    sets, metrics = {}, {}
    for name, pairs in evals.items():
      if name not in ref:
        ref[name] = logps(ref_params, name)[0]
      policy_n2, tokens_n2 = logps(state["params"], name)
      rating_n = np.asarray([p.rating for p in pairs], np.int32)
      sets[name] = heldout_metrics(policy_n2, ref[name], tokens_n2, rating_n, cfg.beta, cfg.label_smoothing,
                                   cfg.margin)
      metrics.update({f"eval/{name.replace(' ', '_')}/{k}": v for k, v in sets[name].items()})
    if jax.process_index() == 0:
      (run_dir / EVAL_JSON).write_text(json.dumps({"step": int(step), "beta": cfg.beta, "sets": sets}, indent=2)
                                       + "\n")
    return metrics

  return train.Hook(max(every, 1), hook)


# ----------------------------------------------------------------------------------------------- the stage

def dpo_metadata(cfg: c.DPO, summary: dict) -> dict:
  return {"kind": "dpo", "init": cfg.init, "reference": cfg.init, "beta": cfg.beta,
          "label_smoothing": cfg.label_smoothing, "margin": cfg.margin, "seq_len": cfg.seq_len,
          "steps": summary.get("steps"), "global_batch": cfg.global_batch, "train_pairs": summary.get("train_pairs"),
          "name": cfg.name, "part": cfg.data.part}


def run(cfg: c.DPO, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  if not cfg.init:
    raise ValueError("init: DPO starts from a chat model and keeps it frozen as the reference; set an l2jax "
                     "checkpoint directory or an experiment reference (experiments/sft.py:ARG)")
  mesh = shd.mesh_from_config(cfg.mesh)
  setup = model_setup(cfg.model, cfg.init, mesh, cfg.data.tokenizer, cfg.seed)
  model_cfg, tok = setup.model_cfg, setup.tokenizer
  if cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
  pairs, evals, summary = load_preferences(cfg.data, cfg.seed)
  steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(pairs) / cfg.global_batch))
  cfg = dataclasses.replace(cfg, steps=steps, optim=dataclasses.replace(
      cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, steps)))
  summary.update(steps=steps, warmup_steps=cfg.optim.warmup_steps, global_batch=cfg.global_batch)
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(f"dpo: {summary['train_pairs']} training pairs (part {cfg.data.part}; {summary['from_mix']} from the mix; "
        f"{summary['identical_dropped']} with identical answers dropped), {steps} steps of {cfg.global_batch} pairs, "
        f"beta {cfg.beta}, label smoothing {cfg.label_smoothing}, margin {cfg.margin}; reference {cfg.init}; "
        f"eval sets {summary['eval_sets']}", file=sys.stderr)
  batches = prefs.PairBatches(pairs, tok, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=jax.process_count(), buckets=True,
                              answer_mask=True)
  micro = micro_batches(cfg)
  if check_sharding:
    return _sharding_report(cfg, setup, batches)
  optimizer = train.make_optimizer(cfg.optim, steps)
  schedule = train.lr_schedule(cfg.optim, steps)
  step_fn = make_dpo_step(setup.graphdef, optimizer, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                          margin=cfg.margin, micro_batches=micro, schedule=schedule)
  abstract_state = jax.eval_shape(lambda p: train.init_state(p, optimizer, cfg.seed), setup.abstract_params)
  ck = ckpt_lib.TrainCheckpointer(run_dir, keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save,
                                  identity={**identity(cfg, model_cfg), "beta": cfg.beta,
                                            "label_smoothing": cfg.label_smoothing, "margin": cfg.margin})
  # a fresh policy starts as a copy of the reference: its buffers are donated by each step, the reference's never
  state, ref_params = restore_or_init(
      ck, abstract_state, setup, batches,
      lambda p: train.init_state(jax.tree.map(jnp.copy, p), optimizer, cfg.seed))
  if int(jax.device_get(state["step"])) >= steps:   # killed after its last checkpoint, before final/
    result = train.RunResult(steps, "done", state, {})
  else:
    ref_params = setup.init_params() if ref_params is None else ref_params
    first = batches.get_state()
    example = next(batches)
    batches.set_state(first)
    step = compile_dpo_step(step_fn, abstract_state, setup, ref_params, example)
    hooks = (eval_hook(cfg, setup, ref_params, evals, run_dir, cfg.eval_every or steps),) if evals else ()
    result = train.run(step, state, batches, total_steps=steps, run_dir=run_dir, ckpt=ck, ckpt_every=cfg.ckpt.every,
                       mesh=mesh, log_every=cfg.log_every, hooks=hooks,
                       tokens_per_step=2 * cfg.global_batch * cfg.seq_len,
                       flops_per_token=model_cfg.flops_per_token(cfg.seq_len) * 4.0 / 3.0,
                       tensorboard=cfg.tensorboard, description="dpo")
  ck.close()
  if result.status == "done":
    extra = {DPO_JSON: json.dumps(dpo_metadata(cfg, summary), indent=2) + "\n"}
    write_final(run_dir, result.step, result.state["params"],
                lambda d, p: ckpt_lib.save_model_dir(d, model_cfg, p, tok.path, extra_files=extra))
    print(summary_line(run_dir), file=sys.stderr)
  return result


def summary_line(run_dir: Path) -> str:
  """One line per held-out set of the last evaluation (run_dir/dpo_eval.json)."""
  path = Path(run_dir) / EVAL_JSON
  if not path.is_file():
    return "dpo: no held-out evaluation"
  ev = json.loads(path.read_text())
  return "\n".join(
      f"dpo held-out {name} (step {ev['step']}, {m['pairs']} pairs): loss {m['loss']:.4f}, reward accuracy "
      f"{m['reward_accuracy']:.1%}, margin {m['reward_margin']:.4f}, log pi chosen {m['ref_logps_chosen']:.2f} -> "
      f"{m['logps_chosen']:.2f}, rejected {m['ref_logps_rejected']:.2f} -> {m['logps_rejected']:.2f}"
      for name, m in ev["sets"].items() if m)


def _sharding_report(cfg: c.DPO, setup: Setup, batches):
  """`--check-sharding`: the policy's DPO gradient on the configured mesh against one device (common.sharding_report),
  with the reference's log-probs computed first and carried in the batches (the reference forward is the policy's)."""
  ref_params = setup.init_params()
  logps = jax.jit(pair_logps_fn(setup.graphdef))

  class WithRef:
    def __next__(self):
      b = next(batches)
      with shd.use_rules(setup.mesh, shd.TRAIN_RULES):
        g = shd.global_batch({k: b[k] for k in ("tokens", "answer_mask")}, setup.mesh)
        return {**b, "ref_logps": np.asarray(jax.device_get(logps(ref_params, g["tokens"], g["answer_mask"])[0]))}

  loss_fn = dpo_loss_fn(setup.graphdef, cfg.beta, cfg.label_smoothing, cfg.margin)
  return sharding_report(cfg, setup, lambda p, b: (lambda s, aux: (s, aux[0]))(*loss_fn(p, b)), WithRef())
