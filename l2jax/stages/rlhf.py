"""Iterative RLHF (Llama 2 sections 3.2.3, 3.3, Figure 11): the versions as a composition of existing stages.

run(cfg, run_dir), after the launcher resolved cfg.sft / rm_helpful / rm_safety / judge_* (running them if missing):
  V1 .. VN   experiments/rejection.py:<rejection_arg> into RUN_DIR/v<n>-rs: sampler = init = version n-1's final
             (V0 = SFT; the GAtt model once GAtt ran), iteration n, pool = version n-1's pool.jsonl for
             n >= pool_from (each pool keeps the best answer per prompt over all iterations it merged); from
             n = 2 on, temperature_from = the previous rejection run (its Figure 8's best temperature: the paper's
             "temperature rescaling", section 3.2.3) unless rescale_temperature is off;
  GAtt       experiments/gatt.py:<gatt_arg> into RUN_DIR/v<g>-gatt after version g = gatt_after: sampler = init =
             V<g>'s final; the versions after it sample from the GAtt model (the paper added GAtt after RLHF V3);
  V N+1      with ppo_after_rs, one more rejection-sampling iteration from VN (V<N+1>-RS, RUN_DIR/v<N+1>-rs), then
             experiments/<final_stage>.py:<ppo_arg> (ppo.py by default; grpo.py, rloo.py: the same rollout and
             loop with group advantages) into RUN_DIR/v<N+1>-<final_stage> with policy = that checkpoint (section
             3.2.3: "applying PPO on top of the resulted Rejection Sampling checkpoint before sampling again");
             without it, straight on VN;
  V N+1-DPO  with dpo, experiments/dpo.py:<dpo_arg> into RUN_DIR/v<N+1>-dpo with init (= its frozen reference)
             = the same checkpoint the RL stage starts from: a branch beside V N+1, evaluated with the versions;
each through `l2jax.launch.launch` (its run-dir checks, lock, resume), with `*_sets` overrides last. A sub-run
whose final/ exists is not launched again, so rerunning the command redoes nothing. Then RUN_DIR/versions.json
(every stage in order), the versions evaluation (l2jax.eval.versions: every version against SFT, judged by the
held-out judges, on the "report" half of the held-out prompts; Table 30 consistency from GAtt on) in
RUN_DIR/eval, RUN_DIR/final (a symlink to the RL stage's final/, else the last version's, so
`experiments/rlhf.py:ARG` is itself an
experiment reference), and report.md (l2jax.report).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from l2jax import checkpoint as ckpt_lib
from l2jax import config as c

VERSIONS = "versions.json"
RL_STAGES = ("ppo", "grpo", "rloo")   # experiments/<stage>.py, all stage "ppo" (PPO.estimator)


@dataclasses.dataclass(frozen=True)
class Step:
  """One sub-run of the composition."""
  version: str      # "V1", "V3+GAtt", "V5"
  stage: str        # rejection | gatt | ppo | grpo | rloo | dpo
  spec: str         # experiments/<file>.py:<arg>
  run_dir: str      # relative to RUN_DIR
  sets: tuple[str, ...]
  source: str       # the version it starts from


def _final(run_dir: Path) -> Path:
  return run_dir / "final"


def _done(d: Path) -> bool:
  return (d / "final" / ckpt_lib.CONFIG).is_file()


def plan(cfg: c.RLHF, run_dir: Path) -> list[Step]:
  """The sub-runs in order, with their overrides; paths of earlier sub-runs are known before they exist."""
  rms = (f"reward_models.helpful={cfg.rm_helpful}", f"reward_models.safety={cfg.rm_safety}")
  steps: list[Step] = []
  prev_name, prev_final, prev_pool, prev_rs = "SFT", cfg.sft, "", ""
  n_rs = cfg.rs_versions + int((cfg.ppo or cfg.dpo) and cfg.ppo_after_rs)
  for n in range(1, n_rs + 1):
    d, name = f"v{n}-rs", (f"V{n}" if n <= cfg.rs_versions else f"V{n}-RS")
    pool = prev_pool if n >= cfg.pool_from else ""
    temp = (f"temperature_from={run_dir / prev_rs}",) if cfg.rescale_temperature and prev_rs else ()
    sets = (f"name={cfg.name}-v{n}", f"sampler={prev_final}", f"init={prev_final}", f"iteration={n}",
            f"pool={pool}") + temp + rms + tuple(cfg.rejection_sets)
    steps.append(Step(name, "rejection", f"experiments/rejection.py:{cfg.rejection_arg}", d, sets, prev_name))
    prev_name, prev_final, prev_pool, prev_rs = name, str(run_dir / d / "final"), str(run_dir / d / "pool.jsonl"), d
    rs_name, rs_final = prev_name, prev_final
    if n == cfg.gatt_after:
      g = f"v{n}-gatt"
      sets = (f"name={cfg.name}-v{n}-gatt", f"sampler={prev_final}", f"init={prev_final}") + tuple(cfg.gatt_sets)
      steps.append(Step(f"V{n}+GAtt", "gatt", f"experiments/gatt.py:{cfg.gatt_arg}", g, sets, prev_name))
      prev_name, prev_final = f"V{n}+GAtt", str(run_dir / g / "final")
  n = cfg.rs_versions + 1
  if cfg.ppo:
    rl = cfg.final_stage
    sets = (f"name={cfg.name}-v{n}", f"policy={rs_final}") + rms
    sets += ((f"iterations={cfg.ppo_iterations}",) if cfg.ppo_iterations > 0 else ()) + tuple(cfg.ppo_sets)
    steps.append(Step(f"V{n}", rl, f"experiments/{rl}.py:{cfg.ppo_arg}", f"v{n}-{rl}", sets, rs_name))
  if cfg.dpo:
    sets = (f"name={cfg.name}-v{n}-dpo", f"init={rs_final}") + tuple(cfg.dpo_sets)
    steps.append(Step(f"V{n}-DPO", "dpo", f"experiments/dpo.py:{cfg.dpo_arg}", f"v{n}-dpo", sets, rs_name))
  return steps


def main_line(steps: list[Step]) -> Step | None:
  """The version RUN_DIR/final points to: the RL stage's when there is one (a DPO version is a branch beside
  it), else the last step."""
  rl = [s for s in steps if s.stage in RL_STAGES]
  return rl[-1] if rl else (steps[-1] if steps else None)


def _write_versions(cfg: c.RLHF, run_dir: Path, steps: list[Step]) -> list[dict]:
  out = [{"version": "SFT", "stage": "sft", "from": "", "run_dir": str(Path(cfg.sft).parent), "final": cfg.sft},
         {"version": "RM helpful", "stage": "reward", "from": "SFT", "run_dir": str(Path(cfg.rm_helpful).parent),
          "final": cfg.rm_helpful},
         {"version": "RM safety", "stage": "reward", "from": "SFT", "run_dir": str(Path(cfg.rm_safety).parent),
          "final": cfg.rm_safety}]
  out += [{"version": f"Judge {k}", "stage": "reward", "from": "SFT", "run_dir": str(Path(d).parent), "final": d}
          for k, d in (("helpful", cfg.judge_helpful), ("safety", cfg.judge_safety)) if d]
  out += [{"version": s.version, "stage": s.stage, "from": s.source, "run_dir": s.run_dir,
           "final": str(run_dir / s.run_dir / "final"), "experiment": s.spec, "sets": list(s.sets)} for s in steps]
  (run_dir / VERSIONS).write_text(json.dumps(out, indent=1) + "\n")
  return out


def consistency_models(cfg: c.RLHF, run_dir: Path, steps: list[Step]) -> dict[str, str]:
  """{label: final dir} for Table 30: the version GAtt started from, then every version from GAtt on ({} without
  GAtt)."""
  at = next((i for i, s in enumerate(steps) if s.stage == "gatt"), None)
  if at is None:
    return {}
  g = steps[at]
  before = str(cfg.sft) if g.source == "SFT" else str(run_dir / steps[at - 1].run_dir / "final")
  return {f"{g.source} (before GAtt)": before, **{s.version: str(run_dir / s.run_dir / "final") for s in steps[at:]}}


def _link_final(run_dir: Path, target: Path) -> None:
  """RUN_DIR/final -> the last version's final/ (relative symlink, replaced atomically)."""
  link = run_dir / "final"
  rel = os.path.relpath(target, run_dir)
  if link.is_symlink() and os.readlink(link) == rel:
    return
  tmp = run_dir / f".final.tmp-{os.getpid()}"
  tmp.unlink(missing_ok=True)
  os.symlink(rel, tmp)
  os.replace(tmp, link)


def run(cfg: c.RLHF, run_dir: Path, check_sharding: bool = False):
  from l2jax import launch, report
  from l2jax.eval import versions
  if check_sharding:
    raise ValueError("rlhf: --check-sharding applies to one stage; run it on experiments/rejection.py or ppo.py")
  run_dir = Path(run_dir)
  versions.judges(cfg)   # both held-out judges or neither, before anything runs
  for k in ("sft", "rm_helpful", "rm_safety") + tuple(k for k in ("judge_helpful", "judge_safety") if getattr(cfg, k)):
    if not (Path(getattr(cfg, k)) / ckpt_lib.CONFIG).is_file():
      raise FileNotFoundError(f"rlhf: {k}={getattr(cfg, k)!r} is not a checkpoint directory (give a directory or "
                              f"an experiment reference such as experiments/sft.py:tiny)")
  steps = plan(cfg, run_dir)
  for s in steps:   # every stage's variant and overrides are valid before the first one runs for hours
    launch.load_config(s.spec, list(s.sets))
  run_dir.mkdir(parents=True, exist_ok=True)
  ckpt_lib.run_dir_accepted(run_dir)   # config.json now, so a rerun after a failed stage is accepted
  _write_versions(cfg, run_dir, steps)
  for s in steps:
    d = run_dir / s.run_dir
    if _done(d):
      print(f"rlhf: {s.version} ({s.stage}) done: {d / 'final'}", file=sys.stderr)
      continue
    print(f"rlhf: {s.version} ({s.stage}) from {s.source}: {s.spec} into {d}", file=sys.stderr)
    result = launch.launch(s.spec, list(s.sets), d)
    if not _done(d):
      status = getattr(result, "status", "")
      print(f"rlhf: {s.version} stopped ({status or 'no final/'}); rerun the same command to resume", file=sys.stderr)
      return result
  last = main_line(steps)
  if last is not None:
    _link_final(run_dir, run_dir / last.run_dir / "final")
  versions.evaluate(cfg, run_dir, {s.version: str(run_dir / s.run_dir / "final") for s in steps})
  versions.consistency(cfg, run_dir, consistency_models(cfg, run_dir, steps))
  out = report.write(run_dir)
  print(f"rlhf: wrote {out} (python -m l2jax.report {run_dir} rewrites it)", file=sys.stderr)
  return None
