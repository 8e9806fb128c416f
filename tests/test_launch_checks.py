"""Errors early and in one line: every experiment reference and path, the dependencies' own included, is checked
before any dependency runs; the launcher stays a small composition point over l2jax/run_dir.py and
l2jax/experiment_refs.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2jax import config as c
from l2jax import launch as L

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_stage_runs(monkeypatch, tmp_path):
  """Run from the repository with $L2JAX_RUNS in tmp_path; every stage's run() is recorded instead of run."""
  import importlib
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv(L.RUNS_ENV, str(tmp_path / "runs"))
  ran = []
  for stage in ("sft", "reward", "ppo", "pretrain", "rejection"):
    mod = importlib.import_module(f"l2jax.stages.{stage}")
    monkeypatch.setattr(mod, "run", lambda cfg, run_dir, _s=stage, **kw: ran.append((_s, str(run_dir))))
  return ran


def test_a_missing_reference_fails_before_any_dependency_runs(no_stage_runs, tmp_path):
  with pytest.raises(c.ConfigError) as e:
    L.launch("experiments/ppo.py:test", ["policy=experiments/nope.py:test"])
  msg = str(e.value)
  assert "\n" not in msg and "policy=experiments/nope.py:test" in msg and "experiments/nope.py not found" in msg, msg
  assert no_stage_runs == [] and not (tmp_path / "runs").exists()


def test_a_dependency_s_missing_path_fails_before_anything_runs(no_stage_runs, tmp_path):
  """top.py:x -> dep.py:x, whose data file is missing: the error names the chain, the key and the file."""
  dep, top = tmp_path / "dep.py", tmp_path / "top.py"
  dep.write_text("from l2jax import config as c\n"
                 "def get_config(arg=None):\n"
                 "  return c.Pretrain(name='dep-x', data=c.Data(paths=('data/pretrain-text/nope.txt',)))\n")
  top.write_text("from l2jax import config as c\n"
                 "def get_config(arg=None):\n"
                 f"  return c.Pretrain(name='top-x', init={str(dep) + ':x'!r})\n")
  with pytest.raises(c.ConfigError) as e:
    L.launch(f"{top}:x")
  msg = str(e.value)
  assert msg == f"{top}:x -> {dep}:x: data.paths: data/pretrain-text/nope.txt: no such file or directory", msg
  assert no_stage_runs == [] and not (tmp_path / "runs").exists()
  with pytest.raises(c.ConfigError, match=r"prompts\.sources: data/hh-rlhf/nope\.jsonl\.gz: no such file"):
    L.launch("experiments/ppo.py:test", ["prompts.sources=hh-safety:data/hh-rlhf/nope.jsonl.gz"])
  assert no_stage_runs == []


def test_what_counts_as_a_path(monkeypatch):
  from l2jax.experiment_refs import path_problem
  monkeypatch.chdir(ROOT)
  assert path_problem("data/gsm8k/test.jsonl") is None
  assert path_problem("hh-safety:data/hh-rlhf/harmless-base-test.jsonl.gz") is None
  assert path_problem("data/nope/x.jsonl") == "data/nope/x.jsonl: no such file or directory"
  assert path_problem("oasst:data/oasst/*.nope") == "data/oasst/*.nope: no file matches"
  assert path_problem(f"{ROOT}/data/nope.txt") == f"{ROOT}/data/nope.txt: no such file or directory"
  for not_a_path in ("c4/en:3.0.1", "Anthropic/hh-rlhf", "You are helpful and/or brief.", "helpful", "", "/help"):
    assert path_problem(not_a_path) is None, not_a_path


def test_the_cli_says_it_in_one_line_with_exit_2(tmp_path):
  env = {**os.environ, L.RUNS_ENV: str(tmp_path / "runs")}
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/ppo.py:test", "--set",
                      "policy=experiments/nope.py:test"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip().splitlines() == ["error: policy=experiments/nope.py:test: experiment file "
                                           "experiments/nope.py not found"], p.stderr[-2000:]
  assert not (tmp_path / "runs").exists()


def test_the_launcher_is_a_small_composition_point():
  """The run-directory guarantees and the reference resolution live in modules named for them."""
  lines = (ROOT / "l2jax/launch.py").read_text().splitlines()
  assert len(lines) <= 120, len(lines)
  import l2jax.experiment_refs as refs
  import l2jax.run_dir as rd
  assert L.RunLock is rd.RunLock and L.check_run_dir is rd.check_run_dir and L.LaunchError is rd.LaunchError
  assert L.load_experiment is refs.load_experiment and L.default_run_dir is refs.default_run_dir
