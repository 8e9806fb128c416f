"""The PPO stage's state set-up, held-out evaluation with early stopping, and what it writes (the rollout's
metrics, samples.jsonl, final/, value/ (PPO only: GRPO and RLOO have no value model), ppo.png). The loop itself is `l2jax.train.run`; the
programs are in l2jax/stages/ppo.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from l2jax import checkpoint as ckpt_lib
from l2jax import sharding as shd
from l2jax.rl import gae as gae_lib
from l2jax.rl.rewards import kl_stats

EARLY = "early_stop.json"
BEST = "best"
SNAPSHOTS = "snapshots"   # PPO.snapshots: the policy at each evaluation, snapshots/<iteration:06d>/


def init_or_resume(cfg, ck, progs, m, batches) -> dict:
  """The newest complete checkpoint's state (and the prompt iterator's), or a fresh state on the mesh."""
  st_sh = progs.state_shardings
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          progs.abstract_state, st_sh)
  restored = ck.restore_latest(abstract)   # identity checked; falls back past checkpoints that do not restore
  if restored is not None:
    latest, state, data_state = restored
    batches.set_state(data_state)
    print(f"resumed from {ck.dir}/{latest}", file=sys.stderr)
    return state
  params = {k: shd.put(m.host[k], st_sh["params"][k]) for k in st_sh["params"]}   # policy (and value)
  return jax.jit(progs.init_state, out_shardings=st_sh)(params)


class EarlyStopping:
  """Held-out mean Rc per evaluation; the best policy kept in run_dir/best; stop after `patience` evaluations
  without improvement (0 = never).

  The history of evaluations (early_stop.json, rewritten after each) is the only state: the best, its step,
  the count of evaluations since and the stop are derived from it. A resumed run (from iteration `start`)
  first drops the evaluations after `start`, and an evaluation it repeats replaces the one recorded; the
  evaluation is deterministic, so the resumed run stops where the uninterrupted one stops (section 3.2.3's
  early stopping on held-out evaluations, made restartable).
  """

  def __init__(self, run_dir: Path, patience: int, start: int | None = None):
    self.path, self.patience = Path(run_dir) / EARLY, patience
    d = json.loads(self.path.read_text()) if self.path.is_file() else {}
    self.history = [h for h in d.get("history", []) if start is None or h["step"] <= start]
    self._derive()

  def _derive(self) -> None:
    self.best, self.best_step, self.bad = None, None, 0
    for h in self.history:
      if self.best is None or h["eval_rc"] > self.best:
        self.best, self.best_step, self.bad = h["eval_rc"], h["step"], 0
      else:
        self.bad += 1
    self.stopped = bool(self.patience and self.bad >= self.patience)

  def update(self, step: int, rc: float) -> tuple[bool, bool]:
    """(improved, stop) after the evaluation at `step` (replacing any recorded at or after `step`)."""
    self.history = [h for h in self.history if h["step"] < step] + [{"step": step, "eval_rc": rc}]
    self._derive()
    return self.best_step == step, self.stopped

  def save(self) -> None:
    if jax.process_index() == 0:
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text(json.dumps({"best_rc": self.best, "best_step": self.best_step, "bad_evals": self.bad,
                                 "stopped": self.stopped, "patience": self.patience,
                                 "history": self.history}, indent=2) + "\n")
      os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------- metrics

def rollout_stats(ro, threshold_logit: float) -> dict:
  """Scalar means over the batch: the metrics users of TRL / OpenRLHF look for."""
  kl = kl_stats(ro.logprobs, ro.ref_logprobs, ro.mask)
  n_b = jnp.sum(ro.mask, axis=1).astype(jnp.float32)
  return {"rh": jnp.mean(ro.helpful), "rs": jnp.mean(ro.safety), "rc": jnp.mean(ro.score),
          "rc_whitened": jnp.mean(ro.whitened), "violation_rate": jnp.mean(ro.safety < threshold_logit),
          "kl": jnp.mean(kl["k1"]), "kl_k3": jnp.mean(kl["k3"]), "entropy": jnp.mean(ro.entropy),
          "reward_total": jnp.mean(jnp.sum(ro.rewards, axis=1)), "response_len": jnp.mean(n_b),
          "eos_rate": jnp.mean(ro.eos), "safety_share": jnp.mean(ro.used_safety),
          "explained_variance": gae_lib.explained_variance(ro.values, ro.returns, ro.mask),
          "value_mean": jnp.sum(ro.values) / jnp.maximum(jnp.sum(n_b), 1.0)}


def group_stats(ro, threshold_logit: float, group_size: int) -> dict:
  """`rollout_stats` for GRPO / RLOO: no value model or whitened score; the sequence reward the estimator sees
  (reward_total), its spread within groups (group_reward_std: mean over groups of the unbiased std, GRPO's) and
  the share of groups whose rewards are all equal (zero_std_groups: std < 1e-6; those rows get no gradient)."""
  kl = kl_stats(ro.logprobs, ro.ref_logprobs, ro.mask)
  n_b = jnp.sum(ro.mask, axis=1).astype(jnp.float32)
  r_gk = ro.seq_reward.reshape(-1, group_size)
  std_g = jnp.std(r_gk, axis=1, ddof=1)
  return {"rh": jnp.mean(ro.helpful), "rs": jnp.mean(ro.safety), "rc": jnp.mean(ro.score),
          "violation_rate": jnp.mean(ro.safety < threshold_logit), "kl": jnp.mean(kl["k1"]),
          "kl_k3": jnp.mean(kl["k3"]), "entropy": jnp.mean(ro.entropy), "reward_total": jnp.mean(ro.seq_reward),
          "group_reward_std": jnp.mean(std_g), "zero_std_groups": jnp.mean(std_g < 1e-6),
          "advantage_abs": jnp.mean(jnp.abs(ro.seq_advantage)), "response_len": jnp.mean(n_b),
          "eos_rate": jnp.mean(ro.eos), "safety_share": jnp.mean(ro.used_safety)}


def replace_model_dir(dst: Path, write) -> None:
  """Write a model directory with write(tmp_dir) beside `dst`, then swap it in (never a half-written dst)."""
  dst = Path(dst)
  tmp = dst.parent / f".{dst.name}.new"
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  if jax.process_index() == 0:
    old = dst.parent / f".{dst.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
      os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _host(tree):
  return jax.device_get(tree) if jax.process_count() == 1 else tree


def save_policy(dst: Path, m, params) -> None:
  replace_model_dir(dst, lambda d: ckpt_lib.save_model_dir(d, m.policy_cfg, _host(params), m.tokenizer.path))


def evaluate(cfg, progs, m, data, state) -> dict:
  """The evaluation set (ppo.load_prompts: a stratified sample of the held-out "select" half) answered by the
  current policy (same sampling settings, the same key at every evaluation): mean raw Rc, Rh, Rs (logits), KL
  to pi_0 (k1, per response), violation rate (share with Rs < 0.15); Rc apart over its safety and its helpful
  prompts, and the safety share of the set (what the mean Rc that selects final/ is made of). GRPO / RLOO: one
  response per prompt too, batch_prompts * group_size prompts per call (the training rollout's shapes)."""
  B = cfg.rows
  n_proc, pid = jax.process_count(), jax.process_index()
  ids, prompts = data.held_ids, data.held
  sums = {"eval_rc": 0.0, "eval_rh": 0.0, "eval_rs": 0.0, "eval_kl": 0.0, "eval_violation_rate": 0.0,
          "eval_response_len": 0.0}
  P = cfg.prompts.max_prompt_tokens
  with shd.use_rules(progs.mesh, shd.TRAIN_RULES):
    for start in range(0, len(ids), B):
      rows = list(range(start, min(start + B, len(ids))))
      valid = np.zeros(B, np.float32)
      valid[:len(rows)] = 1.0
      rows = rows + [rows[0]] * (B - len(rows))
      tokens = np.full((B, P), m.tokenizer.pad_id, np.int32)
      for r, i in enumerate(rows):
        tokens[r, :len(ids[i])] = ids[i]
      batch = {"prompt_tokens": tokens, "prompt_lens": np.array([len(ids[i]) for i in rows], np.int32),
               "is_safety": np.array([int(prompts[i].is_safety) for i in rows], np.int32),
               "index": np.arange(start, start + B, dtype=np.int32)}
      local = B // n_proc
      batch = shd.global_batch({k: v[pid * local:(pid + 1) * local] for k, v in batch.items()}, progs.mesh)
      resp = progs.generate(state["params"]["policy"], batch, state["rng"], np.int32(0), np.int32(2))
      ro, _, _ = progs.score(state["params"], progs.frozen, batch, resp)
      got = _eval_sums(ro, jnp.asarray(valid), jnp.asarray(batch["is_safety"]), progs.threshold_logit)
      for k, v in jax.device_get(got).items():
        sums[k] = sums.get(k, 0.0) + float(v)
  n = max(len(ids), 1)
  n_safety = sum(int(p.is_safety) for p in prompts)
  out = {k: v / n for k, v in sums.items() if k not in ("eval_rc_safety", "eval_rc_helpful")}
  out["eval_safety_share"] = n_safety / n
  if n_safety:
    out["eval_rc_safety"] = sums["eval_rc_safety"] / n_safety
  if len(ids) - n_safety:
    out["eval_rc_helpful"] = sums["eval_rc_helpful"] / (len(ids) - n_safety)
  return out


@jax.jit
def _eval_sums(ro, valid_b, is_safety_b, thr):
  kl = kl_stats(ro.logprobs, ro.ref_logprobs, ro.mask)["k1"]
  s = lambda x, w=valid_b: jnp.sum(x.astype(jnp.float32) * w)
  safe_b = valid_b * (is_safety_b > 0)
  return {"eval_rc": s(ro.score), "eval_rh": s(ro.helpful), "eval_rs": s(ro.safety), "eval_kl": s(kl),
          "eval_violation_rate": s(ro.safety < thr), "eval_response_len": s(jnp.sum(ro.mask, axis=1)),
          "eval_rc_safety": s(ro.score, safe_b), "eval_rc_helpful": s(ro.score, valid_b - safe_b)}


def eval_hook(cfg, progs, m, data, run_dir: Path, early: EarlyStopping, step_obj):
  def hook(step, state):
    res = evaluate(cfg, progs, m, data, state)
    if cfg.snapshots:
      save_policy(Path(run_dir) / SNAPSHOTS / f"{step:06d}", m, state["params"]["policy"])
    improved, stop = early.update(step, res["eval_rc"])
    if improved:
      save_policy(Path(run_dir) / BEST, m, state["params"]["policy"])
    early.save()
    if stop:
      step_obj.stop = True
    return {**res, "eval_best_rc": early.best, "eval_improved": float(improved)}
  return hook


def log_step(run_dir: Path, step: int, metrics: dict, tensorboard: bool) -> None:
  """Append one line of metrics (e.g. the evaluation of the starting policy, iteration 0)."""
  from l2jax.metrics import MetricsWriter
  w = MetricsWriter(run_dir, tensorboard=tensorboard)
  w.write(step, metrics)
  w.close()


def summary(run_dir: Path) -> str:
  """One line: held-out Rc / KL / violation rate at the start (iteration 0) and of final/, and the report."""
  rows: dict[int, dict] = {}
  p = Path(run_dir) / "metrics.jsonl"
  for line in p.read_text().splitlines() if p.is_file() else []:
    r = json.loads(line)
    rows.setdefault(r["step"], {}).update(r)
  evals = {s: r for s, r in rows.items() if "eval_rc" in r}
  early = json.loads((Path(run_dir) / EARLY).read_text()) if (Path(run_dir) / EARLY).is_file() else {}
  tail = f"; report: python -m l2jax.report {run_dir}"
  if not evals:
    return f"ppo: {len(rows)} iterations, no held-out evaluation{tail}"
  first, best = min(evals), early.get("best_step", max(evals))
  f = lambda r: (f"Rc {r['eval_rc']:.3f} (Rh {r['eval_rh']:.3f}, Rs {r['eval_rs']:.3f}), KL {r['eval_kl']:.3f}, "
                 f"violations {r['eval_violation_rate']:.0%}")
  ds = Path(run_dir) / "data_stats.json"
  ev = json.loads(ds.read_text()).get("eval") if ds.is_file() else None
  on = f" (evaluation set: {ev['prompts']} prompts, {ev['safety_share']:.0%} safety)" if ev else ""
  return (f"ppo: held-out at iteration {first}: {f(evals[first])} -> final/ (iteration {best}): "
          f"{f(evals.get(best, evals[max(evals)]))}{on}{tail}")


def trim_samples(run_dir: Path, start: int) -> None:
  """Drop samples.jsonl lines of iterations after `start` (a resumed run redoes them)."""
  p = Path(run_dir) / "samples.jsonl"
  if jax.process_index() or not p.is_file():
    return
  keep = [l for l in p.read_text().splitlines() if l.strip() and _iteration(l) <= start]
  tmp = p.with_suffix(".tmp")
  tmp.write_text("".join(l + "\n" for l in keep))
  os.replace(tmp, p)


def _iteration(line: str) -> int:
  try:
    return int(json.loads(line)["iteration"])
  except (ValueError, KeyError, TypeError):
    return 1 << 30   # a torn last line is dropped


def samples_writer(run_dir: Path, tok, prompts):
  path = Path(run_dir) / "samples.jsonl"

  def write(step: int, arrays: dict[str, np.ndarray]) -> None:
    if "sample_tokens" not in arrays:
      return
    with open(path, "a") as f:
      for r in range(arrays["sample_tokens"].shape[0]):
        toks, mask = arrays["sample_tokens"][r], arrays["sample_mask"][r].astype(bool)
        resp = [int(t) for t in toks[mask] if int(t) != tok.eos_id]
        p = prompts[int(arrays["sample_index"][r])]
        row = {"iteration": step, "prompt": list(p.messages), "is_safety": bool(p.is_safety),
               "response": tok.decode(resp), "response_tokens": int(mask.sum()),
               "rh": float(arrays["sample_rh"][r]), "rs": float(arrays["sample_rs"][r]),
               "rc": float(arrays["sample_rc"][r])}
        for k in ("reward", "advantage", "kl"):   # GRPO / RLOO: the estimator's input and output, the KL (k1)
          if f"sample_{k}" in arrays:
            row[k] = float(arrays[f"sample_{k}"][r])
        f.write(json.dumps(row) + "\n")
  return write


def write_final(run_dir: Path, m, state, early: EarlyStopping) -> None:
  """final/ = the best evaluated policy (run_dir/best) when evaluations ran, else the last; value/ = the last
  value model (a reward-model-style directory: l2jax.reward.load opens it; none for GRPO / RLOO)."""
  run_dir = Path(run_dir)
  best = run_dir / BEST
  if early.best_step is not None and (best / ckpt_lib.CONFIG).is_file():
    replace_model_dir(run_dir / "final", lambda d: shutil.copytree(best, d))
    print(f"wrote {run_dir / 'final'} (the best evaluated policy, iteration {early.best_step}, held-out Rc "
          f"{early.best:.4f})", file=sys.stderr)
  elif state is not None:
    save_policy(run_dir / "final", m, state["params"]["policy"])
    print(f"wrote {run_dir / 'final'} (the last policy)", file=sys.stderr)
  if state is not None and "value" in state["params"]:
    head = json.dumps({"kind": "value_model", "objective": "value", "init": "PPO value model",
                       "pooling": "last non-padding token (ScalarModel); values(): every position"}, indent=2)
    replace_model_dir(run_dir / "value", lambda d: ckpt_lib.save_model_dir(
        d, m.value_cfg, _host(state["params"]["value"]), m.tokenizer.path, extra_files={"head.json": head + "\n"}))


def plot(run_dir: Path) -> None:
  """ppo.png: per-iteration Rc / whitened reward, KL, and held-out Rc and KL, from metrics.jsonl."""
  if jax.process_index():
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
  by = lambda k: sorted({r["step"]: r[k] for r in rows if k in r and isinstance(r[k], (int, float))}.items())
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for ax, keys, title in ((axes[0], ("rc", "rh", "rs"), "training rewards (raw logits)"),
                          (axes[1], ("kl", "kl_k3"), "KL(pi || pi_0) per response"),
                          (axes[2], ("eval_rc", "eval_kl"), "held-out")):
    for k in keys:
      xy = by(k)
      if xy:
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 30 else None, label=k)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  fig.savefig(Path(run_dir) / "ppo.png", dpi=90)
  plt.close(fig)
