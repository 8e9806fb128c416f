"""Iterative RLHF (Llama 2 sections 3.2.3, 3.3, 3.4): the composition's plan (V5 = rejection sampling then PPO,
temperature rescaling, held-out judges, Table 30 per version), and experiments/rlhf.py:test end to end, rerun
redoing nothing."""
import json
import re
from pathlib import Path

import pytest

from l2jax import config as c
from l2jax.launch import load_experiment
from l2jax.stages import rlhf


def _sets(step) -> dict:
  return dict(s.split("=", 1) for s in step.sets)


def test_plan_chains_versions_pool_gatt_and_ppo(tmp_path, repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)
  cfg = load_experiment("experiments/rlhf.py:tiny")[0]
  cfg = c.apply_overrides(cfg, ["sft=S", "rm_helpful=H", "rm_safety=R", "rejection_sets=max_prompts=4"])
  steps = rlhf.plan(cfg, tmp_path)
  assert [s.version for s in steps] == ["V1", "V2", "V3", "V3+GAtt", "V4", "V5-RS", "V5"]
  assert [s.stage for s in steps] == ["rejection"] * 3 + ["gatt", "rejection", "rejection", "ppo"]
  fin = lambda d: str(tmp_path / d / "final")
  v1, v2, v3, g, v4, v5rs, v5 = map(_sets, steps)
  assert v1["sampler"] == v1["init"] == "S" and v1["pool"] == "" and v1["iteration"] == "1"
  assert v2["sampler"] == fin("v1-rs") and v2["pool"] == str(tmp_path / "v1-rs" / "pool.jsonl")   # pooled from V2
  assert v3["pool"] == str(tmp_path / "v2-rs" / "pool.jsonl")
  assert g["sampler"] == g["init"] == fin("v3-rs")
  assert v4["sampler"] == v4["init"] == fin("v3-gatt") and v4["pool"] == str(tmp_path / "v3-rs" / "pool.jsonl")
  # V5: one more rejection-sampling iteration from V4 (pooling V4's), then PPO on its checkpoint (section 3.2.3)
  assert v5rs["sampler"] == v5rs["init"] == fin("v4-rs") and v5rs["iteration"] == "5"
  assert v5rs["pool"] == str(tmp_path / "v4-rs" / "pool.jsonl")
  assert v5["policy"] == fin("v5-rs") and v5["iterations"] == "30" and steps[-1].source == "V5-RS"
  # temperature rescaling: every rejection-sampling iteration after the first takes the previous one's Figure 8
  assert "temperature_from" not in v1
  assert [s["temperature_from"] for s in (v2, v3, v4, v5rs)] == [str(tmp_path / f"v{n}-rs") for n in (1, 2, 3, 4)]
  assert all(s["reward_models.helpful"] == "H" and s["reward_models.safety"] == "R" for s in (v1, v4, v5rs, v5))
  assert v1["max_prompts"] == "4" and steps[0].sets[-1] == "max_prompts=4"          # user overrides come last
  direct = rlhf.plan(c.apply_overrides(cfg, ["ppo_after_rs=false", "rescale_temperature=false"]), tmp_path)
  assert [s.version for s in direct][-2:] == ["V4", "V5"] and _sets(direct[-1])["policy"] == fin("v4-rs")
  assert not any("temperature_from" in _sets(s) for s in direct)
  no_gatt = rlhf.plan(c.apply_overrides(cfg, ["gatt_after=0", "ppo=false", "rs_versions=2", "pool_from=3"]), tmp_path)
  assert [s.version for s in no_gatt] == ["V1", "V2"] and _sets(no_gatt[1])["pool"] == ""
  assert rlhf.consistency_models(cfg, tmp_path, no_gatt) == {}
  # the last version by GRPO or RLOO (the same rollout and loop), and a DPO version beside it from the same checkpoint
  grpo = rlhf.plan(c.apply_overrides(cfg, ["final_stage=grpo", "dpo=true", "dpo_sets=beta=0.2"]), tmp_path)
  assert [(s.version, s.stage, s.spec, s.run_dir) for s in grpo[-2:]] == [
      ("V5", "grpo", "experiments/grpo.py:tiny", "v5-grpo"), ("V5-DPO", "dpo", "experiments/dpo.py:tiny", "v5-dpo")]
  assert _sets(grpo[-2])["policy"] == _sets(grpo[-1])["init"] == fin("v5-rs") and _sets(grpo[-1])["beta"] == "0.2"
  assert grpo[-1].source == "V5-RS" and rlhf.main_line(grpo).version == "V5"     # RUN_DIR/final: the RL version
  only_dpo = rlhf.plan(c.apply_overrides(cfg, ["ppo=false", "dpo=true", "ppo_after_rs=false"]), tmp_path)
  assert [s.version for s in only_dpo][-2:] == ["V4", "V5-DPO"] and _sets(only_dpo[-1])["init"] == fin("v4-rs")
  assert rlhf.main_line(only_dpo).version == "V5-DPO"
  with pytest.raises(c.ConfigError, match="final_stage: expected one of ppo, grpo, rloo, found 'dpo'"):
    c.apply_overrides(cfg, ["final_stage=dpo"])
  with pytest.raises(c.ConfigError, match="gatt_after=5"):
    c.apply_overrides(cfg, ["gatt_after=5"])
  with pytest.raises(c.ConfigError, match="rs_versions: expected an int >= 1"):
    c.apply_overrides(cfg, ["gatt_after=0", "rs_versions=0"])


def test_consistency_is_measured_for_every_version_from_gatt_on(tmp_path, repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)
  cfg = c.apply_overrides(load_experiment("experiments/rlhf.py:tiny")[0], ["sft=S", "rm_helpful=H", "rm_safety=R"])
  models = rlhf.consistency_models(cfg, tmp_path, rlhf.plan(cfg, tmp_path))
  fin = lambda d: str(tmp_path / d / "final")
  assert models == {"V3 (before GAtt)": fin("v3-rs"), "V3+GAtt": fin("v3-gatt"), "V4": fin("v4-rs"),
                    "V5-RS": fin("v5-rs"), "V5": fin("v5-ppo")}
  first = c.apply_overrides(cfg, ["gatt_after=1"])
  labels = list(rlhf.consistency_models(first, tmp_path, rlhf.plan(first, tmp_path)))
  assert labels[:2] == ["V1 (before GAtt)", "V1+GAtt"]


def test_versions_are_judged_by_held_out_judges(repo_root, monkeypatch):
  from l2jax.eval import versions
  monkeypatch.chdir(repo_root)
  cfg = load_experiment("experiments/rlhf.py:tiny")[0]
  assert (cfg.judge_helpful, cfg.judge_safety) == ("experiments/rm_helpful.py:tiny-judge",
                                                   "experiments/rm_safety.py:tiny-judge")
  trainer, judge = (load_experiment(x)[0] for x in (cfg.rm_helpful, cfg.judge_helpful))
  assert (trainer.data.part, judge.data.part) == ("trainer", "judge")       # disjoint halves of the pairs
  assert versions.judges(cfg) == (cfg.judge_helpful, cfg.judge_safety, versions.JUDGES_NOTE)
  own = c.apply_overrides(cfg, ["judge_helpful=", "judge_safety="])
  assert versions.judges(own) == (cfg.rm_helpful, cfg.rm_safety, versions.TRAINERS_NOTE)
  with pytest.raises(ValueError, match="set both held-out judges or neither"):
    versions.judges(c.apply_overrides(cfg, ["judge_safety="]))
  assert cfg.eval.heldout_part == "report" and versions.settings(cfg).heldout_part == "report"


def test_eval_settings_match_compare():
  from l2jax.eval import versions
  from l2jax.eval.compare import Settings
  s = versions.settings(c.RLHF(eval=c.VersionsEval(prompts_per_set=7, diversity_temperatures=(0.3,), seed=5)))
  assert isinstance(s, Settings) and s.prompts_per_set == 7 and s.diversity_temperatures == (0.3,) and s.seed == 5
  # every evaluation field but the switches and the judge is a compare setting
  import dataclasses
  names = {f.name for f in dataclasses.fields(c.VersionsEval)} - {"enabled", "judge", "consistency"}
  assert names <= {f.name for f in dataclasses.fields(Settings)}


def _launch(tmp_path, repo_root, *sets, run_dir=None):
  """experiments/rlhf.py:test through the launcher in a subprocess on one CPU device: (exit code, stderr)."""
  import os
  import subprocess
  import sys
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  args = [a for x in sets for a in ("--set", x)] + (["--run-dir", str(run_dir)] if run_dir else [])
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rlhf.py:test", *args], cwd=repo_root,
                     env=env, capture_output=True, text=True, timeout=900)
  return p.returncode, p.stderr


def test_a_bad_stage_variant_stops_before_anything_runs(tmp_path, repo_root, monkeypatch):
  monkeypatch.chdir(repo_root)
  for d in ("S", "H", "R"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "config.json").write_text("{}")
  cfg = c.apply_overrides(load_experiment("experiments/rlhf.py:tiny")[0],
                          [f"sft={tmp_path / 'S'}", f"rm_helpful={tmp_path / 'H'}", f"rm_safety={tmp_path / 'R'}",
                           "judge_helpful=", "judge_safety=", "dpo=true", "dpo_arg=34b"])
  with pytest.raises(c.ConfigError, match="unknown variant '34b'"):
    rlhf.run(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_rlhf_test_variant_end_to_end_and_rerun_redoes_nothing(tmp_path, repo_root):
  rc, err = _launch(tmp_path, repo_root)
  assert rc == 0, err[-3000:]
  run = tmp_path / "rlhf-test"
  versions = json.loads((run / "versions.json").read_text())
  assert [v["version"] for v in versions] == ["SFT", "RM helpful", "RM safety", "Judge helpful", "Judge safety", "V1",
                                              "V1+GAtt", "V2", "V3-RS", "V3"]
  finals = [Path(v["final"]) / "config.json" for v in versions]
  assert all(f.is_file() for f in finals)
  assert (run / "final").resolve() == (run / "v3-ppo" / "final").resolve()
  assert json.loads((run / "v2-rs" / "config.json").read_text())["pool"] == str(run / "v1-rs" / "pool.jsonl")
  assert json.loads((run / "v3-ppo" / "config.json").read_text())["policy"] == str(run / "v3-rs" / "final")
  res = json.loads((run / "eval" / "compare.json").read_text())
  assert list(res["versions"]) == ["SFT", "V1", "V1+GAtt", "V2", "V3-RS", "V3"]
  assert res["rms"]["helpful"] == str(tmp_path / "rm_helpful-test-judge" / "final")          # held-out judges
  assert res["prompts"]["heldout_part"] == "report" and "safety_share" in res["prompts"]["eval"]
  # the table agrees with the answers' own judge scores (a check that can fail, unlike SFT against itself)
  rows = [json.loads(x) for x in (run / "eval" / "compare_samples.jsonl").read_text().splitlines()]
  for kind, rm in (("helpful", "rh"), ("safety", "rs")):
    v3, sft = ([r[rm] for r in rows if r["version"] == v and r["kind"] == kind] for v in ("V3", "SFT"))
    from l2jax.eval import winrate
    assert res["versions"]["V3"]["win"][kind]["win_rate"] == pytest.approx(winrate.win_rate(v3, sft)["win_rate"])
  cons = json.loads((run / "eval" / "consistency.json").read_text())
  assert list(cons["models"]) == ["V1 (before GAtt)", "V1+GAtt", "V2", "V3-RS", "V3"]          # Table 30 per version
  md = (run / "report.md").read_text()
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
  assert "eval/fig11_winrate.png" in links and all((run / l).is_file() for l in links)
  assert "## V1+GAtt (gatt)" in md and "## V3 (ppo)" in md and "| V3-RS: " in md
  evals = [run / "eval" / "compare.json", run / "eval" / "consistency.json"]
  stamps = {str(f): f.stat().st_mtime_ns for f in finals + evals}
  rc, err = _launch(tmp_path, repo_root)
  assert rc == 0, err[-3000:]
  assert "running " not in err and err.count(") done: ") == 5 and err.count("is up to date") == 2, err
  assert {f: Path(f).stat().st_mtime_ns for f in stamps} == stamps
  # the chain ending with GRPO, and a DPO version beside it (SFT and the reward models are the ones above)
  run = tmp_path / "rlhf-test-grpo"
  rc, err = _launch(tmp_path, repo_root, "name=rlhf-test-grpo", "rs_versions=1", "gatt_after=0", "ppo_after_rs=false",
                    "final_stage=grpo", "dpo=true", run_dir=run)
  assert rc == 0, err[-3000:]
  assert [v["version"] for v in json.loads((run / "versions.json").read_text())][-3:] == ["V1", "V2", "V2-DPO"]
  assert (run / "final").resolve() == (run / "v2-grpo" / "final").resolve()
  grpo = json.loads((run / "v2-grpo" / "config.json").read_text())
  assert grpo["estimator"] == "grpo" and grpo["policy"] == str(run / "v1-rs" / "final")
  assert json.loads((run / "v2-dpo" / "config.json").read_text())["init"] == str(run / "v1-rs" / "final")
  assert not (run / "v2-grpo" / "value").exists()   # no value model
  assert list(json.loads((run / "eval" / "compare.json").read_text())["versions"]) == ["SFT", "V1", "V2", "V2-DPO"]
