"""Iterative RLHF (issue 13): the composition's plan, and experiments/rlhf.py:test end to end, rerun redoing nothing."""
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
  assert [s.version for s in steps] == ["V1", "V2", "V3", "V3+GAtt", "V4", "V5"]
  assert [s.stage for s in steps] == ["rejection"] * 3 + ["gatt", "rejection", "ppo"]
  fin = lambda d: str(tmp_path / d / "final")
  v1, v2, v3, g, v4, v5 = map(_sets, steps)
  assert v1["sampler"] == v1["init"] == "S" and v1["pool"] == "" and v1["iteration"] == "1"
  assert v2["sampler"] == fin("v1-rs") and v2["pool"] == str(tmp_path / "v1-rs" / "pool.jsonl")   # pooled from V2
  assert v3["pool"] == str(tmp_path / "v2-rs" / "pool.jsonl")
  assert g["sampler"] == g["init"] == fin("v3-rs")
  assert v4["sampler"] == v4["init"] == fin("v3-gatt") and v4["pool"] == str(tmp_path / "v3-rs" / "pool.jsonl")
  assert v5["policy"] == fin("v4-rs") and v5["iterations"] == "30"                 # PPO on the last RS checkpoint
  assert all(s["reward_models.helpful"] == "H" and s["reward_models.safety"] == "R" for s in (v1, v4, v5))
  assert v1["max_prompts"] == "4" and steps[0].sets[-1] == "max_prompts=4"          # user overrides come last
  no_gatt = rlhf.plan(c.apply_overrides(cfg, ["gatt_after=0", "ppo=false", "rs_versions=2", "pool_from=3"]), tmp_path)
  assert [s.version for s in no_gatt] == ["V1", "V2"] and _sets(no_gatt[1])["pool"] == ""
  with pytest.raises(c.ConfigError, match="gatt_after=5"):
    c.apply_overrides(cfg, ["gatt_after=5"])
  with pytest.raises(c.ConfigError, match="rs_versions: expected an int >= 1"):
    c.apply_overrides(cfg, ["gatt_after=0", "rs_versions=0"])


def test_eval_settings_match_compare():
  from l2jax.eval.compare import Settings
  s = rlhf.eval_settings(c.RLHF(eval=c.VersionsEval(prompts_per_set=7, diversity_temperatures=(0.3,))))
  assert isinstance(s, Settings) and s.prompts_per_set == 7 and s.diversity_temperatures == (0.3,)
  # every evaluation field but the switch and the judge is a compare setting
  import dataclasses
  names = {f.name for f in dataclasses.fields(c.VersionsEval)} - {"enabled", "judge"}
  assert names <= {f.name for f in dataclasses.fields(Settings)}


def _launch(tmp_path, repo_root):
  """experiments/rlhf.py:test through the launcher in a subprocess on one CPU device: (exit code, stderr)."""
  import os
  import subprocess
  import sys
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rlhf.py:test"], cwd=repo_root, env=env,
                     capture_output=True, text=True, timeout=900)
  return p.returncode, p.stderr


@pytest.mark.slow
def test_rlhf_test_variant_end_to_end_and_rerun_redoes_nothing(tmp_path, repo_root):
  rc, err = _launch(tmp_path, repo_root)
  assert rc == 0, err[-3000:]
  run = tmp_path / "rlhf-test"
  versions = json.loads((run / "versions.json").read_text())
  assert [v["version"] for v in versions] == ["SFT", "RM helpful", "RM safety", "V1", "V1+GAtt", "V2", "V3"]
  finals = [Path(v["final"]) / "config.json" for v in versions]
  assert all(f.is_file() for f in finals)
  assert (run / "final").resolve() == (run / "v3-ppo" / "final").resolve()
  assert json.loads((run / "v2-rs" / "config.json").read_text())["pool"] == str(run / "v1-rs" / "pool.jsonl")
  res = json.loads((run / "eval" / "compare.json").read_text())
  assert list(res["versions"]) == ["SFT", "V1", "V1+GAtt", "V2", "V3"]
  assert res["versions"]["SFT"]["win"]["helpful"]["win_rate"] == 0.5        # the reference against itself
  md = (run / "report.md").read_text()
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
  assert "eval/fig11_winrate.png" in links and all((run / l).is_file() for l in links)
  assert "## V1+GAtt (gatt)" in md and "## V3 (ppo)" in md
  stamps = {str(f): f.stat().st_mtime_ns for f in finals + [run / "eval" / "compare.json"]}
  rc, err = _launch(tmp_path, repo_root)
  assert rc == 0, err[-3000:]
  assert "running " not in err and err.count(") done: ") == 4 and "is up to date" in err, err
  assert {f: Path(f).stat().st_mtime_ns for f in stamps} == stamps
