"""Shared by the LM stages (pretraining, SFT, rejection-sampling fine-tuning): model setup, state build or
resume, the run, evaluation hook, final model directory, and the `--check-sharding` report.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from l2jax import checkpoint as ckpt_lib
from l2jax import sharding as shd
from l2jax import train
from l2jax.data.tokenizer import Tokenizer
from l2jax.losses import masked_nll_sum
from l2jax.model import llama


class Subset:
  """Documents of `source` at `indices` (a held-out or training split by document)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


def split_documents(source, every_nth: int) -> tuple[Any, Any | None]:
  """(train, held-out): every `every_nth`-th document is held out (deterministic); 0 = no held-out split."""
  n = len(source)
  if every_nth <= 0:
    return source, None
  idx = np.arange(n)
  held = idx % every_nth == every_nth - 1
  if held.sum() == 0 or (~held).sum() == 0:
    raise ValueError(f"data.eval_every_nth={every_nth}: the source has only {n} documents, too few to split")
  return Subset(source, idx[~held]), Subset(source, idx[held])


def lm_loss_fn(graphdef: nnx.GraphDef):
  """loss_fn(params, batch) -> (sum of token NLL over loss_mask, number of those tokens)."""
  def loss_fn(params, batch):
    logits_btv = nnx.merge(graphdef, params)(batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_nll_sum(logits_btv, batch["targets"], batch["loss_mask"])
  return loss_fn


@dataclasses.dataclass
class Setup:
  """Everything a run of an LM stage needs, built once from the config."""
  mesh: Any
  model_cfg: Any
  tokenizer: Tokenizer
  graphdef: Any
  param_axes: Any
  abstract_params: Any
  init_params: Any   # callable -> sharded params


def model_setup(model_cfg, init_dir: str, mesh, tokenizer_path: str, seed: int) -> Setup:
  """Model config, tokenizer and a parameter initialiser (random, or the l2jax checkpoint `init_dir`)."""
  if init_dir:
    ckpt_lib.check_model_dir(init_dir)
    saved = ckpt_lib.LlamaConfig.load(Path(init_dir) / ckpt_lib.CONFIG)
    # numerics (dtype, remat, scan) come from this config; the architecture from the checkpoint
    model_cfg = saved.replace(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat=model_cfg.remat,
                              scan_layers=model_cfg.scan_layers, attention_impl=model_cfg.attention_impl)
    tok_in_ckpt = Path(init_dir) / ckpt_lib.TOKENIZER
    if tok_in_ckpt.is_file():
      tokenizer_path = str(tok_in_ckpt)
  tokenizer = Tokenizer(tokenizer_path)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces but model.vocab_size is "
                     f"{model_cfg.vocab_size}")
  abstract_model = llama.abstract(model_cfg)
  graphdef, abstract_params = llama.split(abstract_model)
  axes = llama.logical_axes(abstract_model)
  p_sh = shd.tree_shardings(axes, mesh, shd.TRAIN_RULES, abstract_params)

  def init_params():
    if init_dir:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, p_sh)
      _, params = ckpt_lib.load_model_dir(init_dir)  # validates keys and shapes
      return shd.put(jax.tree.map(lambda x, t: np.asarray(x, t.dtype), params, target), p_sh)
    return jax.jit(lambda: llama.split(llama.init(model_cfg, seed))[1], out_shardings=p_sh)()

  return Setup(mesh, model_cfg, tokenizer, graphdef, axes, abstract_params, init_params)


def micro_batches(cfg) -> int:
  """Accumulation steps per optimizer step: global_batch / micro_batch (1 without micro_batch)."""
  return cfg.global_batch // cfg.micro_batch if cfg.micro_batch else 1


def make_eval_hook(loss_fn, setup: Setup, batches_fn, n_batches: int, every: int, micro_batches: int = 1):
  """Hook: held-out loss and perplexity over the first `n_batches` held-out batches (the same ones each time),
  each evaluated in `micro_batches` sequential micro-batches as the train step accumulates (train.make_eval_step)."""
  mesh = setup.mesh
  p_sh = shd.tree_shardings(setup.param_axes, mesh, shd.TRAIN_RULES, setup.abstract_params)
  eval_fn = jax.jit(train.make_eval_step(loss_fn, micro_batches), in_shardings=(p_sh, None))
  fixed: list = []

  def hook(step, state):
    if not fixed:
      it = batches_fn()
      for _ in range(n_batches):
        try:
          fixed.append(next(it))
        except StopIteration:
          break
    total, count = 0.0, 0.0
    with shd.use_rules(mesh, shd.TRAIN_RULES):
      for b in fixed:
        s, w = eval_fn(state["params"], shd.global_batch(b, mesh))
        total, count = total + float(s), count + float(w)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

  return train.Hook(every, hook)


ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta")


def identity(cfg, model_cfg) -> dict:
  """What makes a run directory's checkpoints belong to this experiment: stage, name, init and the model's
  architecture (numerics such as dtype or remat may change between a run and its resumption)."""
  return {"stage": type(cfg).stage, "name": cfg.name, "init": getattr(cfg, "init", ""),
          "model": {k: getattr(model_cfg, k) for k in ARCHITECTURE}}


def restore_or_init(ck: ckpt_lib.TrainCheckpointer, abstract_state, setup: Setup, batches, init_state):
  """(state, params or None): the newest checkpoint that restores (identity checked; falls back past those that do
  not) with `batches` set to its data state, or else jit(init_state)(setup.init_params()) placed in the state's
  shardings, returning the initial params too (DPO keeps them as its frozen reference)."""
  st_sh = train.state_shardings(abstract_state, setup.param_axes, setup.mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, st_sh)
  restored = ck.restore_latest(target)
  if restored is not None:
    latest, state, data_state = restored
    batches.set_state(data_state)
    print(f"resumed from {ck.dir}/{latest}", file=sys.stderr)
    return state, None
  params = setup.init_params()
  return jax.jit(init_state, out_shardings=st_sh)(params), params


def run_lm(cfg, run_dir: Path, setup: Setup, loss_fn, train_batches, eval_hook, *, extra_identity=None,
           save_final=None, hooks=(), tokens_per_step: float | None = None, flops_per_token: float | None = None):
  """Shared by training stages: build or resume the state, run the loop, write run_dir/final when done.

  cfg must have: steps, optim, global_batch, micro_batch, seed, ckpt, log_every, tensorboard, seq_len, name.
  save_final(final_dir, params): writes the final model directory (default: an l2jax Llama model directory).
  hooks: more train.Hook objects (e.g. sampling answers at the end).
  tokens_per_step / flops_per_token: throughput accounting (default: global_batch x seq_len tokens, the LM's
  training FLOPs per token); a stage whose rows differ (reward pairs: 2 rows each, no LM head) passes its own.
  """
  mesh = setup.mesh
  micro = micro_batches(cfg)
  if cfg.micro_batch and cfg.global_batch % cfg.micro_batch:
    raise ValueError(f"global_batch={cfg.global_batch} is not a multiple of micro_batch={cfg.micro_batch}")
  optimizer = train.make_optimizer(cfg.optim, cfg.steps)
  schedule = train.lr_schedule(cfg.optim, cfg.steps)
  step_fn = train.make_train_step(loss_fn, optimizer, micro, schedule)
  abstract_state = jax.eval_shape(lambda p: train.init_state(p, optimizer, cfg.seed), setup.abstract_params)
  ck = ckpt_lib.TrainCheckpointer(run_dir, keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save,
                               identity={**identity(cfg, setup.model_cfg), **(extra_identity or {})})
  state, _ = restore_or_init(ck, abstract_state, setup, train_batches,
                             lambda p: train.init_state(p, optimizer, cfg.seed))
  done_step = int(jax.device_get(state["step"]))
  if done_step >= cfg.steps:   # killed after its last checkpoint, before final/: nothing left to train
    result = train.RunResult(done_step, "done", state, {})
  else:
    first = train_batches.get_state()
    example = next(train_batches)   # (a finite iterator at its end has nothing left for the example batch)
    train_batches.set_state(first)
    step = train.compile_step(step_fn, abstract_state, setup.param_axes, mesh, example)
    result = train.run(step, state, train_batches, total_steps=cfg.steps, run_dir=run_dir, ckpt=ck,
                       ckpt_every=cfg.ckpt.every, mesh=mesh, log_every=cfg.log_every,
                       hooks=((eval_hook,) if eval_hook else ()) + tuple(hooks),
                       tokens_per_step=tokens_per_step or cfg.global_batch * cfg.seq_len,
                       flops_per_token=flops_per_token or setup.model_cfg.flops_per_token(cfg.seq_len),
                       tensorboard=cfg.tensorboard, description=type(cfg).stage)
  ck.close()
  if result.status == "done":
    write_final(run_dir, result.step, result.state["params"],
                save_final or (lambda d, p: ckpt_lib.save_model_dir(d, setup.model_cfg, p, setup.tokenizer.path)))
  return result


FINAL_STEP = "final_step.json"


def final_step(run_dir: Path) -> int | None:
  """The training step run_dir/final holds (from final/final_step.json), or None when final/ is missing."""
  final = Path(run_dir) / "final"
  if not (final / ckpt_lib.CONFIG).is_file():
    return None
  try:
    return int(json.loads((final / FINAL_STEP).read_text())["step"])
  except (OSError, ValueError, KeyError, TypeError):
    return -1   # written before final_step.json existed: unknown, so rewritten


def write_final(run_dir: Path, step: int, params, save_final) -> bool:
  """Make run_dir/final the model of training step `step` unless it already is: `save_final(dir, params)` builds
  the new one in a hidden sibling, which then replaces final/ (the old one is renamed aside, then removed), so
  final/ is always a complete model directory, and after a finished run always the last step's. Returns
  whether it wrote."""
  run_dir = Path(run_dir)
  final = run_dir / "final"
  if final_step(run_dir) == step:
    return False
  if jax.process_count() == 1:
    params = jax.device_get(params)
  lead = jax.process_index() == 0
  new = run_dir / ".final.tmp-new"   # the same name on every process of a multi-host run
  if jax.process_count() == 1 and new.exists():
    shutil.rmtree(new)
  save_final(new, params)
  if lead:
    (new / FINAL_STEP).write_text(json.dumps({"step": int(step)}) + "\n")
    old = run_dir / ".final.tmp-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
      os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {final} (step {step})", file=sys.stderr)
  return True


def sharding_report(cfg, setup: Setup, loss_fn, it, steps: int = 3) -> dict:
  """`--check-sharding`: the configured mesh against one device over `steps` steps; prints and returns errors."""
  batches = [next(it) for _ in range(steps)]
  params = jax.device_get(setup.init_params())
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  micro = cfg.global_batch // cfg.micro_batch if cfg.micro_batch else 1
  err = train.check_sharding(loss_fn, params, setup.param_axes, train.make_optimizer(cfg.optim, cfg.steps),
                             batches, setup.mesh, one, micro)
  ok = err["grad_rel_err"] < 1e-4 and err["param_rel_err"] < 1e-4
  print(f"mesh {dict(setup.mesh.shape)} vs one device over {steps} steps: gradient rel. error "
        f"{err['grad_rel_err']:.2e}, parameter rel. error {err['param_rel_err']:.2e}: {'OK' if ok else 'MISMATCH'}")
  if not ok:
    raise SystemExit(1)
  return err
