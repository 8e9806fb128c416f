"""Reward models (Llama 2 section 3.2.2): a Llama backbone + scalar head trained with the binary ranking loss
with a rating margin on preference pairs, through the one training loop (`run_lm`).

run(cfg, run_dir): reads the preference sources (safety filter, held-out split, mixture), builds the scalar
model (backbone from `cfg.init` or random, head fresh), trains for `epochs` over the mixture, evaluates
accuracy by rating on every held-out set (run_dir/reward_eval.{json,md,png}) and writes the reward-model
directory run_dir/final: params/ ({"backbone": Llama params, "head": {"w", "b"}}), config.json (the backbone's
LlamaConfig), tokenizer.model and head.json. Load it with `l2jax.reward.load`.

A batch holds P pairs as two rows each: tokens / mask [P, 2, T] (row 0 chosen, row 1 rejected), rating [P],
valid [P]; the loss weight is the number of pairs, so the logged "tokens" and "tokens_per_s" count pairs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.checkpoint import save_model_dir
from l2jax.data import preferences as prefs
from l2jax.eval import reward_accuracy
from l2jax.losses import rating_margin, ranking_loss_sum
from l2jax.model import heads, llama
from l2jax.model.config import LlamaConfig
from l2jax.stages.common import Setup, model_setup, run_lm, sharding_report

HEAD_JSON = "head.json"


# ----------------------------------------------------------------------------------------------- model

def pair_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per processed token of a scalar model: the LM count less the output head (6 * V * D)."""
  return cfg.flops_per_token(seq_len) - 6.0 * cfg.vocab_size * cfg.dim


def abstract_scalar_model(cfg: LlamaConfig) -> heads.ScalarModel:
  return nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0)))


def scalar_setup(model_cfg: LlamaConfig, init_dir: str, mesh, tokenizer_path: str, seed: int) -> Setup:
  """`common.model_setup` for heads.ScalarModel: params {"backbone": Llama params, "head": {"w", "b"}}.

  The backbone comes from the l2jax checkpoint `init_dir` (its architecture and tokenizer win) or is random;
  the head is always fresh (w ~ N(0, 1/dim), b = 0).
  """
  base = model_setup(model_cfg, init_dir, mesh, tokenizer_path, seed)
  cfg = base.model_cfg
  abstract = abstract_scalar_model(cfg)
  graphdef, abstract_params = llama.split(abstract)
  axes = llama.logical_axes(abstract)
  p_sh = shd.tree_shardings(axes, mesh, shd.TRAIN_RULES, abstract_params)

  def init_params():
    head = jax.jit(lambda: llama.split(heads.ScalarHead(cfg.dim, rngs=nnx.Rngs(params=seed + 1),
                                                        param_dtype=jnp.dtype(cfg.param_dtype)))[1],
                   out_shardings=p_sh["head"])()
    return {"backbone": heads.backbone_params(base.init_params()), "head": head}

  return Setup(mesh, cfg, base.tokenizer, graphdef, axes, abstract_params, init_params)


def pair_scores_fn(graphdef):
  """scores(params, tokens [P, 2, T], mask [P, 2, T]) -> float32 [P, 2]: the two rows of each pair as 2P rows."""
  def scores(params, tokens_p2t, mask_p2t):
    P, two, T = tokens_p2t.shape
    s_r = nnx.merge(graphdef, params)(tokens_p2t.reshape(P * two, T), mask_p2t.reshape(P * two, T))
    return s_r.reshape(P, two)
  return scores


def pair_loss_fn(graphdef, margin: str):
  """loss_fn(params, batch) -> (sum over pairs of -log sigmoid(r_c - r_r - m(rating)), number of pairs)."""
  scores = pair_scores_fn(graphdef)

  def loss_fn(params, batch):
    s_p2 = scores(params, batch["tokens"], batch["mask"])
    return ranking_loss_sum(s_p2[:, 0], s_p2[:, 1], rating_margin(batch["rating"], margin), batch["valid"])
  return loss_fn


# ----------------------------------------------------------------------------------------------- data

def _set_name(path: str, taken: dict) -> str:
  name = Path(path).name
  for suffix in (".gz", ".jsonl", ".json"):
    name = name.removesuffix(suffix)
  base, i = name, 2
  while name in taken:
    name, i = f"{base}-{i}", i + 1
  return name


def load_preferences(d: c.Preferences, seed: int) -> tuple[list[prefs.Pair], dict[str, list[prefs.Pair]], dict]:
  """(training mixture, {eval set name: pairs}, summary) for a Preferences config.

  Every file of `sources` and `mix` is safety-filtered and split; its held-out part is an eval set named after
  the file (+ " held-out"); of the rest, only the conversations of `d.part` are trained on ("all", or the
  "trainer" / "judge" half of `prefs.data_part`; held-out sets stay whole, so reward models of both halves are
  evaluated on the same pairs); `eval_sources` files are eval sets in full. Pairs whose two answers are identical
  are dropped from every file and counted (`identical_dropped`, per file and in total).
  """
  errors: list[str] | None = [] if d.skip_bad else None
  primary: list[prefs.Pair] = []
  pool: list[prefs.Pair] = []
  evals: dict[str, list[prefs.Pair]] = {}
  files: dict[str, dict] = {}
  for group, specs in (("sources", d.sources), ("mix", d.mix)):
    for spec in specs:
      for path, pairs in prefs.read_source(spec, errors).items():
        distinct, identical = prefs.drop_identical(pairs)
        kept, dropped = prefs.safety_filter(distinct) if d.safety_filter else (distinct, 0)
        tr, held = prefs.split_heldout(kept, d.heldout_fraction)
        mine = prefs.select_part(tr, d.part)
        (primary if group == "sources" else pool).extend(mine)
        if held:
          evals[_set_name(path, evals) + " held-out"] = held
        files[path] = {"group": group, "pairs": len(pairs), "identical_dropped": identical,
                       "safety_dropped": dropped, "train": len(mine), "other_part": len(tr) - len(mine),
                       "heldout": len(held)}
  for spec in d.eval_sources:
    for path, pairs in prefs.read_source(spec, errors).items():
      distinct, identical = prefs.drop_identical(pairs)
      evals[_set_name(path, evals)] = distinct
      files[path] = {"group": "eval", "pairs": len(pairs), "identical_dropped": identical}
  if not primary:
    raise prefs.DataError("data.sources: no training pairs (set data.sources to FORMAT:PATH entries)")
  mixture = prefs.mixture(primary, pool, d.mix_fraction, seed)
  if d.eval_pairs > 0:
    evals = {k: v[:d.eval_pairs] for k, v in evals.items()}
  summary = {"files": files, "part": d.part, "train_pairs": len(mixture), "from_sources": len(primary),
             "from_mix": len(mixture) - len(primary), "mix_fraction": d.mix_fraction,
             "identical_dropped": sum(f["identical_dropped"] for f in files.values()),
             "eval_sets": {k: len(v) for k, v in evals.items()}}
  if errors:
    summary["skipped_bad_records"] = len(errors)
    summary["skipped_examples"] = errors[:10]
    print(f"skipped {len(errors)} bad preference records, e.g. {errors[0]}", file=sys.stderr)
  return mixture, evals, summary


# ----------------------------------------------------------------------------------------------- evaluation

def score_pairs(score_fn, params, tok, pairs, seq_len: int, batch_pairs: int, mesh, cache: dict | None = None):
  """(chosen [N], rejected [N], rating [N]) scores of `pairs`, batch by batch (host batches cached in `cache`)."""
  n_proc, pi = jax.process_count(), jax.process_index()
  local = batch_pairs // n_proc
  batches = cache.get("batches") if cache is not None else None
  if batches is None:
    batches = []
    for i in range(0, len(pairs), batch_pairs):
      chunk = pairs[i:i + batch_pairs]   # padded to its longest row's bucket (all processes see every chunk)
      T = prefs.bucket_len(max(len(r) for r in prefs.pair_batch_rows(tok, chunk, seq_len)), seq_len)
      b = prefs.pair_batch(tok, chunk, T, size=batch_pairs, max_len=seq_len)
      batches.append({k: v[pi * local:(pi + 1) * local] for k, v in b.items()})
    if cache is not None:
      cache["batches"] = batches
  out = []
  with shd.use_rules(mesh, shd.TRAIN_RULES):
    for b in batches:
      gb = shd.global_batch({k: b[k] for k in ("tokens", "mask")}, mesh)
      out.append(np.asarray(jax.device_get(score_fn(params, gb["tokens"], gb["mask"]))))
  s_n2 = np.concatenate(out)[:len(pairs)] if out else np.zeros((0, 2), np.float32)
  return s_n2[:, 0], s_n2[:, 1], np.asarray([p.rating for p in pairs], np.int32)


def accuracy_hook(setup: Setup, evals: dict, seq_len: int, batch_pairs: int, margin: str, every: int,
                  run_dir: Path, meta: dict) -> train.Hook:
  """Hook: held-out ranking loss and accuracy by rating of every eval set; writes run_dir/reward_eval.*."""
  mesh = setup.mesh
  p_sh = shd.tree_shardings(setup.param_axes, mesh, shd.TRAIN_RULES, setup.abstract_params)
  score_fn = jax.jit(pair_scores_fn(setup.graphdef), in_shardings=(p_sh, None, None),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
  caches: dict[str, dict] = {name: {} for name in evals}

  def hook(step, state):
    scores, metrics = {}, {}
    for name, pairs in evals.items():
      ch, rej, rating = score_pairs(score_fn, state["params"], setup.tokenizer, pairs, seq_len, batch_pairs, mesh,
                                    caches[name])
      scores[name] = (ch, rej, rating)
      loss_sum, n = ranking_loss_sum(jnp.asarray(ch), jnp.asarray(rej), rating_margin(rating, margin))
      key = name.replace(" ", "_")
      metrics[f"eval/{key}/loss"] = float(loss_sum) / max(float(n), 1.0)
      metrics[f"eval/{key}/accuracy"] = float(reward_accuracy.pair_correct(ch, rej).mean()) if len(ch) else math.nan
    if jax.process_index() == 0 and scores:
      results = reward_accuracy.evaluate(scores)
      reward_accuracy.write_report(run_dir, results, {**meta, "step": int(step)})
    return metrics

  return train.Hook(max(every, 1), hook)


# ----------------------------------------------------------------------------------------------- the stage

def resolve_schedule(cfg: c.RewardModel, n_pairs: int) -> c.RewardModel:
  """cfg with steps = ceil(epochs * pairs / global_batch) unless set, and warmup = max(min_warmup,
  ceil(warmup_fraction * steps)) (Llama 2 section 3.2.2: 3% of the steps, at least 5) unless the fraction is 0."""
  steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * n_pairs / cfg.global_batch))
  warmup = cfg.optim.warmup_steps
  if cfg.warmup_fraction > 0:
    warmup = max(cfg.min_warmup, math.ceil(cfg.warmup_fraction * steps))
  return dataclasses.replace(cfg, steps=steps, optim=dataclasses.replace(cfg.optim, warmup_steps=min(warmup, steps)))


def head_metadata(cfg: c.RewardModel, model_cfg: LlamaConfig, summary: dict) -> dict:
  return {"kind": "reward_model", "objective": cfg.objective, "margin": cfg.margin, "seq_len": cfg.seq_len,
          "dim": model_cfg.dim, "pooling": "hidden state of the last non-padding token (heads.ScalarModel)",
          "input": "encode_chat(dialog) + exchange_pieces answer ids ending with EOS "
                   "(l2jax.data.preferences.encode_responses); rows longer than seq_len keep BOS + the tail",
          "params": {"backbone": "Llama parameters (llama.split)", "head": {"w": [model_cfg.dim], "b": []}},
          "init": cfg.init, "name": cfg.name, "train_pairs": summary.get("train_pairs"), "part": cfg.data.part}


def run(cfg: c.RewardModel, run_dir: Path, check_sharding: bool = False):
  shd.initialize_distributed()
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  setup = scalar_setup(cfg.model, cfg.init, mesh, cfg.data.tokenizer, cfg.seed)
  model_cfg = setup.model_cfg
  if cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  pairs, evals, summary = load_preferences(cfg.data, cfg.seed)
  cfg = resolve_schedule(cfg, len(pairs))
  summary.update(steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps, global_batch=cfg.global_batch)
  if jax.process_index() == 0:
    (run_dir / "data_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(f"reward model: {summary['train_pairs']} training pairs (part {cfg.data.part}; {summary['from_mix']} from "
        f"the mix; "
        f"{summary['identical_dropped']} pairs with identical answers dropped), {cfg.steps} steps of "
        f"{cfg.global_batch} pairs, warmup {cfg.optim.warmup_steps}; eval sets {summary['eval_sets']}",
        file=sys.stderr)
  loss_fn = pair_loss_fn(setup.graphdef, cfg.margin)
  batches = prefs.PairBatches(pairs, setup.tokenizer, seq_len=cfg.seq_len, global_batch=cfg.global_batch,
                              seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                              buckets=cfg.buckets)   # padded to the batch's longest row's bucket
  if check_sharding:
    return sharding_report(cfg, setup, loss_fn, batches)
  hooks = ()
  if evals:
    meta = {"title": f"{cfg.name} ({cfg.objective} RM, margin {cfg.margin})", "name": cfg.name,
            "objective": cfg.objective, "margin": cfg.margin}
    hooks = (accuracy_hook(setup, evals, cfg.seq_len, cfg.eval_batch or cfg.global_batch, cfg.margin,
                           cfg.eval_every or cfg.steps, run_dir, meta),)

  def save_final(final, params):
    save_model_dir(final, model_cfg, params, setup.tokenizer.path,
                   extra_files={HEAD_JSON: json.dumps(head_metadata(cfg, model_cfg, summary), indent=2) + "\n"})

  return run_lm(cfg, run_dir, setup, loss_fn, batches, None, save_final=save_final, hooks=hooks,
                extra_identity={"objective": cfg.objective, "margin": cfg.margin},
                tokens_per_step=2 * cfg.global_batch * cfg.seq_len,
                flops_per_token=pair_flops_per_token(model_cfg, cfg.seq_len))
