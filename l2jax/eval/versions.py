"""The evaluation of an iterative-RLHF run's versions (Llama 2 sections 3.3, 3.4; Figure 11, Table 30).

evaluate(cfg, run_dir, models): every version against SFT with `l2jax.eval.compare` into RUN_DIR/eval, on the
"report" half of the held-out prompts (PPO selects its checkpoint on the "select" half: the prompts that select and
the prompts that report are disjoint), judged by the held-out judges cfg.judge_helpful / judge_safety (reward
models trained on the other half of the preference data, Preferences.part "judge") when set, else by the training
reward models, and compare.md says which. Every number is still a reward model's judgement, not a human's.

consistency(cfg, run_dir, models): multi-turn consistency (Table 30) and attention to the instruction (Figure 10)
of the version GAtt started from and every version from GAtt on (l2jax.eval.consistency, with the GAtt
experiment's own evaluation settings and held-out dialogs) into RUN_DIR/eval/consistency.*, so GAtt's effect is
measured after every later stage (rejection sampling and PPO do not train on multi-turn instructions).

Both are skipped when their JSON already holds the same models and settings, so rerunning the composition
redoes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from l2jax import config as c

JUDGES_NOTE = ("held-out judges: reward models trained on the other half of the preference data than the reward "
               "models that trained the versions")
TRAINERS_NOTE = "the reward models that also trained the versions (no held-out judges set): optimistic"


def settings(cfg: c.RLHF):
  """compare.Settings from cfg.eval (same field names)."""
  from l2jax.eval.compare import Settings
  names = {f.name for f in dataclasses.fields(Settings)}
  return Settings(**{k: v for k, v in dataclasses.asdict(cfg.eval).items() if k in names})


def judges(cfg: c.RLHF) -> tuple[str, str, str]:
  """(helpfulness judge, safety judge, note): the held-out judges when set, else the training reward models;
  ValueError when only one judge is set."""
  if bool(cfg.judge_helpful) != bool(cfg.judge_safety):
    raise ValueError(f"judge_helpful={cfg.judge_helpful!r}, judge_safety={cfg.judge_safety!r}: set both held-out "
                     f"judges or neither (then the training reward models judge)")
  if cfg.judge_helpful:
    return cfg.judge_helpful, cfg.judge_safety, JUDGES_NOTE
  return cfg.rm_helpful, cfg.rm_safety, TRAINERS_NOTE


def _same(path: Path, want: dict) -> bool:
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(old, dict) and all(old.get(k) == v for k, v in want.items())


def evaluate(cfg: c.RLHF, run_dir: Path, models: dict[str, str]) -> dict | None:
  """Every version ({name: final dir}) against SFT into RUN_DIR/eval (module docstring); None when disabled."""
  from l2jax.eval import compare
  if not cfg.eval.enabled:
    return None
  s = settings(cfg)
  helpful, safety, note = judges(cfg)
  judge = cfg.eval.judge or None
  out = Path(run_dir) / "eval"
  want = {"settings": json.loads(json.dumps(dataclasses.asdict(s))), "models": models,
          "reference": {"name": "SFT", "dir": cfg.sft},
          "rms": {"helpful": helpful, "safety": safety, "judge": judge, "note": note}}
  if _same(out / "compare.json", want):
    print(f"rlhf: {out / 'compare.json'} is up to date", file=sys.stderr)
    return json.loads((out / "compare.json").read_text())
  return compare.compare(models, ("SFT", cfg.sft), helpful, safety, judge, out, s, rm_note=note)


def gatt_config(cfg: c.RLHF) -> c.GAtt:
  """The GAtt experiment of the composition with its overrides: its evaluation settings and held-out dialogs."""
  from l2jax.launch import load_experiment
  return c.apply_overrides(load_experiment(f"experiments/gatt.py:{cfg.gatt_arg}")[0], list(cfg.gatt_sets))


def consistency(cfg: c.RLHF, run_dir: Path, models: dict[str, str]) -> dict | None:
  """Table 30 of `models` ({label: final dir}) into RUN_DIR/eval/consistency.*; None when off or no GAtt."""
  if not (cfg.eval.enabled and cfg.eval.consistency and models):
    return None
  from l2jax.data import gatt as gd
  from l2jax.eval import consistency as cons
  from l2jax.stages.gatt import held_out_users
  g = gatt_config(cfg)
  e, k = g.eval, g.constraints
  if e.dialogs == 0:
    return None
  out = Path(run_dir) / "eval"
  meta = {"versions": models, "gatt": {"eval": dataclasses.asdict(e), "constraints": dataclasses.asdict(k),
                                       "max_user_words": g.max_user_words, "data": dataclasses.asdict(g.data)}}
  meta = json.loads(json.dumps(meta))
  if _same(out / "consistency.json", {"meta": {**meta, **_run_meta(models, e, k)}}):
    print(f"rlhf: {out / 'consistency.json'} is up to date", file=sys.stderr)
    return json.loads((out / "consistency.json").read_text())
  print(f"rlhf: multi-turn consistency (Table 30) of {', '.join(models)}", file=sys.stderr)
  return cons.run_eval(models, held_out_users(g), out_dir=out, n=e.dialogs, turns=e.turns, kinds=k.kinds,
                       lists=gd.load_lists(k.lists_dir), placement=k.placement,
                       max_per_instruction=k.max_per_instruction, short_prob=k.short_prob,
                       max_user_words=g.max_user_words, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                       seed=e.seed, bins=e.attention_bins, meta=meta)


def _run_meta(models: dict, e, k) -> dict:
  """The fields consistency.run_eval adds to the meta it writes (to recognise an up-to-date consistency.json)."""
  return {"checkpoints": {a: str(b) for a, b in models.items()}, "dialogs": e.dialogs, "turns": e.turns,
          "kinds": list(k.kinds), "placement": k.placement, "temperature": e.temperature, "seed": e.seed}
