"""The one training loop: a pure step jitted once with explicit shardings, plus hooks (DESIGN.md section 6).

Every stage (pretraining, SFT, reward models, rejection-sampling fine-tuning) supplies a `loss_fn(params,
batch) -> (loss_sum, weight)` and a batch iterator; this module owns the optimizer, gradient accumulation,
sharding of state and batches, progress, metrics, checkpoints with exact resume, SIGTERM and NaN handling.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2jax import sharding as shd
from l2jax.checkpoint import TrainCheckpointer
from l2jax.config import AdamW
from l2jax.metrics import MetricsWriter, mfu

State = dict[str, Any]   # {"params": ..., "opt": ..., "step": int32 [], "rng": uint32 [2]}
Batch = dict[str, Any]
LossFn = Callable[[Any, Batch], tuple[jax.Array, jax.Array]]


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class BatchIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


# ----------------------------------------------------------------------------------------------- optimizer

def lr_schedule(o: AdamW, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over `warmup_steps`, then cosine decay to `decay_to * lr` at `total_steps`.

  Llama 2 section 2.2: "cosine learning rate schedule, with warmup of 2000 steps, and decay final learning
  rate down to 10% of the peak learning rate". lr(t) for t >= w:
    decay_to*lr + (1 - decay_to)*lr * (1 + cos(pi * (t - w) / (T - w))) / 2.
  """
  warmup = max(0, min(o.warmup_steps, total_steps))
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warmup, 1)), optax.constant_schedule(o.lr)],
                                [max(warmup, 1)]) if warmup else optax.constant_schedule(o.lr)
  if o.schedule != "cosine":
    raise ValueError(f"optim.schedule: expected 'cosine' or 'constant', found {o.schedule!r}")
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
                                            decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.decay_to)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and embeddings, not on RMSNorm gains (names containing 'norm') or scalars."""
  def keep(path, leaf):
    names = [str(getattr(k, "key", "")) for k in path]
    return not any("norm" in n for n in names) and len(getattr(leaf, "shape", ())) >= 2
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(o: AdamW, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW(b1, b2, eps, weight_decay) on the schedule (Llama 2 section 2.2)."""
  chain = [optax.clip_by_global_norm(o.clip)] if o.clip > 0 else []
  chain.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


# ----------------------------------------------------------------------------------------------- the step

def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int = 0) -> State:
  return {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(seed))}


def all_finite(*trees: Any) -> jax.Array:
  """float32 [] 1.0 when every floating-point leaf of `trees` is finite, else 0.0 (the "finite" step metric)."""
  oks = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)
         if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(oks)).astype(jnp.float32) if oks else jnp.float32(1.0)


def split_micro(batch: Batch, k: int) -> Batch:
  """[k*m, ...] -> [k, m, ...] for every leaf: micro-batch i takes rows i, i+k, i+2k, ... (each device's share of
  a batch sharded over its rows splits evenly)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_eval_step(loss_fn: LossFn, micro_batches: int = 1) -> LossFn:
  """eval(params, batch) -> (sum of loss, sum of weight) over `micro_batches` sequential micro-batches (a scan),
  so evaluating a global batch never holds more activations than one training micro-batch. Without it the
  held-out pass of a paper-size run needs about its whole batch's activations at once (the TPU compiler puts
  the 7B evaluation on 4 v5p chips at 92 GiB per chip where the accumulated train step needs 44; docs/tpu.md)."""
  if micro_batches <= 1:
    return loss_fn

  def step(params, batch):
    if jax.tree.leaves(batch)[0].shape[0] % micro_batches:   # a short last batch: in one piece
      return loss_fn(params, batch)

    def body(acc, mb):
      l, w = loss_fn(params, mb)
      return (acc[0] + l, acc[1] + w), None
    return jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), split_micro(batch, micro_batches))[0]
  return step


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batches: int = 1,
                    schedule: optax.Schedule | None = None) -> Callable[[State, Batch], tuple[State, dict]]:
  """The pure step: gradient of sum(loss) / sum(weight) over `micro_batches` accumulation steps, then update.

  Micro-batch i takes rows i, i+k, i+2k, ... so each device's share of the batch is split evenly.
  Accumulating sums and dividing once makes k micro-batches equal one batch of k times the size.
  Metrics: loss, loss_weight, grad_norm, lr (with `schedule`) and "finite": 1.0 when the loss, the gradient
  norm and every updated parameter are finite, else 0.0 (`run` never saves or continues from such a state).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: State, batch: Batch) -> tuple[State, dict]:
    params = state["params"]
    if micro_batches == 1:
      (loss_sum, weight), grads = grad_fn(params, batch)
    else:
      micro = split_micro(batch, micro_batches)

      def body(acc, mb):
        (l, w), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, acc[0], g), acc[1] + l, acc[2] + w), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (grads, loss_sum, weight), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    updates, opt = optimizer.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    new = {"params": new_params, "opt": opt, "step": state["step"] + 1, "rng": state["rng"]}
    loss, grad_norm = loss_sum / denom, optax.global_norm(grads)
    metrics = {"loss": loss, "loss_weight": weight, "grad_norm": grad_norm,
               "finite": all_finite(loss, grad_norm, new_params)}
    if schedule is not None:
      metrics["lr"] = schedule(state["step"])
    return new, metrics

  return step


@dataclasses.dataclass
class Compiled:
  """A step jitted once with explicit in/out shardings and state donation, traced under the train rules."""
  fn: Callable
  mesh: jax.sharding.Mesh
  rules: shd.Rules
  state_shardings: Any

  def __call__(self, state: State, batch: Batch):
    with shd.use_rules(self.mesh, self.rules):
      return self.fn(state, batch)


def state_shardings(abstract_state: State, param_axes: Any, mesh, rules=shd.TRAIN_RULES) -> Any:
  """Shardings for the whole train state: params by their logical axes, optimizer state alike, rest replicated."""
  p_sh = shd.tree_shardings(param_axes, mesh, rules, abstract_state["params"])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return {"params": p_sh, "opt": shd.like_params(abstract_state["opt"], p_sh, mesh), "step": rep, "rng": rep}


def compile_step(step_fn, abstract_state: State, param_axes: Any, mesh, example_batch: Batch,
                 rules=shd.TRAIN_RULES) -> Compiled:
  st_sh = state_shardings(abstract_state, param_axes, mesh, rules)
  b_sh = {k: shd.batch_sharding(mesh, rules, np.ndim(v)) for k, v in example_batch.items()}
  fn = jax.jit(step_fn, in_shardings=(st_sh, b_sh), out_shardings=(st_sh, None), donate_argnums=0)
  return Compiled(fn, mesh, rules, st_sh)


# ----------------------------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Hook:
  """Call `fn(step, state) -> dict | None` every `every` steps (and at the last step if `at_end`)."""
  every: int
  fn: Callable[[int, State], dict | None]
  at_end: bool = True


def batch_fingerprint(batch: dict[str, np.ndarray]) -> int:
  """A cheap hash of a batch's tokens: lets tests and users check that a resumed run sees the same data."""
  x = batch["tokens"] if "tokens" in batch else batch[sorted(batch)[0]]  # e.g. PPO's prompt_tokens
  return zlib.crc32(np.ascontiguousarray(x).tobytes())


@dataclasses.dataclass
class RunResult:
  step: int
  status: str          # "done" | "preempted"
  state: State
  last_metrics: dict


class _Sigterm:
  def __init__(self):
    self.hit = False
    self.prev = None

  def __enter__(self):
    try:
      self.prev = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self.prev = None
    return self

  def _handle(self, signum, frame):
    self.hit = True

  def __exit__(self, *exc):
    if self.prev is not None:
      signal.signal(signal.SIGTERM, self.prev)


class Throughput:
  """Tokens per second of the training steps alone, over the steps since the last `rate()`.

  A step's time runs from the completion of the step before it to its own completion; time spent in hooks (the
  held-out evaluations) in between is left out (`exclude`), and hooks' tokens are never counted. Completion is
  when the host first sees the step's metrics ready: before the next step is dispatched when the step blocked
  the host (a PPO iteration), else when its metrics are read. Pure: the caller passes the clock's readings.
  """

  def __init__(self, t0: float):
    self.t_last, self.t_done, self.tokens, self.excluded = t0, t0, 0.0, 0.0

  def step_done(self, t: float, tokens: float) -> None:
    self.t_done, self.tokens = max(t, self.t_done), self.tokens + tokens

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def rate(self) -> float:
    """Tokens per second since the previous call; starts the next window."""
    dt = self.t_done - self.t_last - self.excluded
    r = self.tokens / max(dt, 1e-9)
    self.t_last, self.tokens, self.excluded = self.t_done, 0.0, 0.0
    return r


def _ready(dev_metrics: Any) -> bool:
  return all(x.is_ready() for x in jax.tree.leaves(dev_metrics) if hasattr(x, "is_ready"))


def split_metrics(host_metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """(scalars as float, arrays with ndim > 0 as numpy) of one step's host metrics."""
  scalars, arrays = {}, {}
  for k, v in host_metrics.items():
    if np.ndim(v) > 0:
      arrays[k] = np.asarray(v)
    else:
      scalars[k] = float(v)
  return scalars, arrays


def step_ok(scalars: dict[str, float]) -> bool:
  """The "finite" contract: a step's state may be kept when its "finite" metric (if any) is nonzero and its
  "loss" (if any) is finite."""
  if "finite" in scalars and not (np.isfinite(scalars["finite"]) and scalars["finite"] != 0):
    return False
  return "loss" not in scalars or bool(np.isfinite(scalars["loss"]))


def run(step: Compiled, state: State, batches: BatchIterator, *, total_steps: int, run_dir: str | Path,
        ckpt: TrainCheckpointer | None, ckpt_every: int, mesh, log_every: int = 10,
        hooks: tuple[Hook, ...] = (), tokens_per_step: float | None = None,
        flops_per_token: float | None = None, tensorboard: bool = True,
        progress: bool = True, description: str = "train",
        outputs_fn: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> RunResult:
  """Run `step` from `state["step"]` to `total_steps`.

  step(state, batch) -> (new state, metrics): any pure step function (make_train_step's, or a stage's own,
  e.g. a PPO iteration) wrapped by `compile_step`. Its metrics are a dict of device arrays:
    - scalars (ndim 0) are converted to float, logged to metrics.jsonl / TensorBoard every `log_every` steps
      and kept in RunResult.last_metrics. "loss" is optional (a step without it is never stopped for NaN).
    - "finite" (the NaN contract; optional, scalar): 1.0 when the step's own update produced only finite values
      (loss, gradient norms, every updated parameter), 0.0 otherwise; make_train_step computes it from the
      loss, the gradient norm and the new parameters (`all_finite`), and a stage writing its own step should
      return it too. When "finite" is 0 or "loss" is not finite, the run stops before that step's state is
      saved or used, and raises NonFiniteLoss naming the step and the last good checkpoint: every saved
      checkpoint holds a state whose update was finite.
    - arrays (ndim > 0) are never logged or converted to float: when the step's metrics settle, process 0
      calls `outputs_fn(step, {name: host numpy array})` with them (dropped when outputs_fn is None), e.g.
      sampled tokens or per-row rewards to write to a JSONL file.
  tokens_per_step: tokens the model processes per step (rows x seq_len, padding included), for tokens/s and
  MFU (flops_per_token per token); default: the step's "loss_weight" metric (0 without one). The rate counts the
  steps alone (`Throughput`): hook time (evaluations) and hook tokens are left out.
  metrics.jsonl lines of steps after the starting step (left by a kill before their checkpoint) are dropped.
  Saves every `ckpt_every` steps and at the end (state, data-iterator state); on SIGTERM saves and returns
  status "preempted". Metrics of step s are read after step s+1 is dispatched, so the host never stalls the
  device; a step due for a checkpoint or a hook is settled (and checked) first.
  """
  if ckpt_every < 1:
    raise ValueError(f"ckpt_every: expected >= 1, found {ckpt_every}")
  if log_every < 1:
    raise ValueError(f"log_every: expected >= 1, found {log_every}")
  start = int(jax.device_get(state["step"]))
  writer = MetricsWriter(run_dir, tensorboard=tensorboard, resume_step=start)   # drops lines of steps > start
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, desc=description, dynamic_ncols=True, file=sys.stderr)
  pending: list | None = None   # [step, device metrics, batch fingerprint, time first seen ready or None]
  last: dict = {}
  speed = Throughput(time.perf_counter())

  def last_good() -> str:
    s = ckpt.latest_step() if ckpt else None
    return f"last good checkpoint: step {s}" if s is not None else "no checkpoint was saved"

  def settle(p) -> dict:
    nonlocal last
    s, dev_metrics, fp, t_ready = p
    m, arrays = split_metrics(jax.device_get(dev_metrics))
    t_done = t_ready if t_ready is not None else time.perf_counter()
    if not step_ok(m):
      if ckpt:
        ckpt.wait()
      what = (f"non-finite loss ({m['loss']})" if "loss" in m and not np.isfinite(m["loss"]) else
              f"non-finite values in the update (loss {m.get('loss', float('nan')):.4g}, grad_norm "
              f"{m.get('grad_norm', float('nan')):.4g})")
      raise NonFiniteLoss(f"{what} at step {s}; stopping without saving it; {last_good()}")
    if arrays and outputs_fn is not None and jax.process_index() == 0:
      outputs_fn(s, arrays)
    speed.step_done(t_done, tokens_per_step if tokens_per_step else m.get("loss_weight", 0.0))
    m["batch_crc"] = fp
    last = m
    if s % log_every == 0 or s == total_steps:
      tps = speed.rate()
      m["tokens_per_s"] = tps
      u = mfu(tps, flops_per_token) if flops_per_token else None
      if u is not None:
        m["mfu"] = u
      writer.write(s, m)
      if bar is not None:
        bar.set_postfix({k: f"{m[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu") if k in m}, refresh=False)
    return m

  status = "done"
  try:
    with _Sigterm() as sigterm:
      for s in range(start + 1, total_steps + 1):
        if pending is not None and pending[3] is None and _ready(pending[1]):
          pending[3] = time.perf_counter()   # the previous step blocked the host until it was done
        host_batch = next(batches)
        fp = batch_fingerprint(host_batch)
        state, dev_metrics = step(state, shd.global_batch(host_batch, mesh, step.rules))
        if pending is not None:
          settle(pending)
        pending = [s, dev_metrics, fp, None]
        if bar is not None:
          bar.update(1)
        due_ckpt = ckpt is not None and (s % ckpt_every == 0 or s == total_steps or sigterm.hit)
        due_hooks = [h for h in hooks if s % h.every == 0 or (h.at_end and s == total_steps)]
        if due_ckpt or due_hooks or sigterm.hit:
          settle(pending)
          pending = None
        for h in due_hooks:
          t_hook = time.perf_counter()
          extra = h.fn(s, state)
          speed.exclude(time.perf_counter() - t_hook)   # evaluation time is not training throughput
          if extra:
            writer.write(s, extra)
            last.update(extra)
        if due_ckpt:
          ckpt.save(s, state, batches.get_state(), force=True)
        if sigterm.hit:
          status = "preempted"
          print(f"\nSIGTERM: saved a checkpoint at step {s}; resume by running the same command.",
                file=sys.stderr)
          break
      if pending is not None:
        settle(pending)
  finally:
    if ckpt is not None:
      ckpt.wait()
    if bar is not None:
      bar.close()
    writer.close()
  return RunResult(int(jax.device_get(state["step"])), status, state, last)


# ----------------------------------------------------------------------------------------------- sharding check

def _rel_err(a: Any, b: Any) -> float:
  """max over leaves of ||a - b|| / max(||b||, tiny), computed on host in float64."""
  errs = [np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)) /
          max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30)
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return float(max(errs)) if errs else 0.0


def check_sharding(loss_fn: LossFn, params: Any, param_axes: Any, optimizer: optax.GradientTransformation,
                   batches: list[Batch], mesh, reference_mesh, micro_batches: int = 1,
                   rules=shd.TRAIN_RULES) -> dict[str, float]:
  """Run the same steps on `mesh` and on `reference_mesh` (one device) and compare gradients and parameters.

  Returns {"grad_rel_err": max over steps and leaves, "param_rel_err": after the last step}. This is the
  guard against wrong SPMD gradients (DESIGN.md section 4): run it on any new mesh or rule set.
  """
  step_fn = make_train_step(loss_fn, optimizer, micro_batches)
  grad_fn = jax.grad(lambda p, b: (lambda ls, w: ls / jnp.maximum(w, 1.0))(*loss_fn(p, b)))
  results = {}
  for name, m in (("test", mesh), ("ref", reference_mesh)):
    state = init_state(jax.tree.map(np.asarray, params), optimizer)
    abstract = jax.eval_shape(lambda s: s, state)
    step = compile_step(step_fn, abstract, param_axes, m, batches[0], rules)
    state = jax.device_put(state, step.state_shardings)
    g_sh = step.state_shardings["params"]
    b_sh = {k: shd.batch_sharding(m, rules, np.ndim(v)) for k, v in batches[0].items()}
    gjit = jax.jit(grad_fn, in_shardings=(g_sh, b_sh), out_shardings=g_sh)
    grads = []
    for b in batches:
      gb = shd.global_batch(b, m, rules)
      with shd.use_rules(m, rules):
        grads.append(jax.device_get(gjit(state["params"], gb)))
      state, _ = step(state, gb)
    results[name] = (grads, jax.device_get(state["params"]))
  (g_test, p_test), (g_ref, p_ref) = results["test"], results["ref"]
  return {"grad_rel_err": max(_rel_err(a, b) for a, b in zip(g_test, g_ref)),
          "param_rel_err": _rel_err(p_test, p_ref)}
