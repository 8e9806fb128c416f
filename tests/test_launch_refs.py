"""Experiment references (DESIGN.md section 5): 'path/to/exp.py[:ARG]' in a config field resolves to that run's final/,
running it first when missing; $L2JAX_RUNS, --no-deps, cycles; and the test chain sft:test -> rm_*:test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2jax import config as c
from l2jax import launch as L

ROOT = Path(__file__).resolve().parents[1]


def run_launch(*args, runs, cwd=ROOT):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", L.RUNS_ENV: str(runs)}
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", *args], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=600)
  return p.returncode, p.stdout, p.stderr


def write_exp(path: Path, init: str, paths=("x.txt",)):
  path.write_text(
      "from l2jax import config as c\n"
      "def get_config(arg=None):\n"
      f"  return c.Pretrain(name={path.stem + '-' + 'x'!r}, init={init!r}, data=c.Data(paths={tuple(paths)!r}))\n")


def test_references_resolve_recursively_into_tuples_and_runs_root(tmp_path, monkeypatch):
  monkeypatch.setenv(L.RUNS_ENV, str(tmp_path / "myruns"))
  dep = tmp_path / "dep.py"
  write_exp(dep, "")
  final = tmp_path / "myruns" / "dep-v" / "final"
  final.mkdir(parents=True)
  (final / "config.json").write_text("{}")
  cfg = c.Pretrain(init=f"{dep}:v", data=c.Data(paths=("plain.txt", f"{dep}:v")))
  out = L.resolve_references(cfg, no_deps=True)
  assert out.init == str(final) and out.data.paths == ("plain.txt", str(final))
  assert out.data.tokenizer == cfg.data.tokenizer   # not a reference: untouched
  assert L.default_run_dir("experiments/sft.py:tiny") == tmp_path / "myruns" / "sft-tiny"
  assert not L.is_reference("experiments/nope.py:tiny") and not L.is_reference("README.md")


def test_missing_dependency_with_no_deps_and_cycles_are_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(L.RUNS_ENV, str(tmp_path / "runs"))
  a, b = tmp_path / "a.py", tmp_path / "b.py"
  write_exp(a, f"{b}:x")
  write_exp(b, f"{a}:x")
  with pytest.raises(L.LaunchError, match=r"b\.py:x: .*b-x/final does not exist and --no-deps"):
    L.resolve_references(L.load_experiment(f"{a}:x")[0], no_deps=True)
  with pytest.raises(c.ConfigError, match=r"experiment reference cycle: .*a\.py:x -> .*b\.py:x -> .*a\.py:x"):
    L.launch(f"{a}:x")
  assert not (tmp_path / "runs" / "a-x").exists() and not (tmp_path / "runs" / "b-x").exists()
  rc, out, err = run_launch(f"{a}:x", runs=tmp_path / "runs")
  assert rc == 2 and "experiment reference cycle" in err and len(err.strip().splitlines()) <= 3, err
  rc, out, err = run_launch(f"{a}:x", "--print-config", runs=tmp_path / "runs")   # as written, runs nothing
  assert rc == 0 and json.loads(out)["init"] == f"{b}:x", err


@pytest.mark.slow
def test_test_chain_runs_dependencies_once(tmp_path):
  """rm_helpful:test runs sft:test first (in-process, its own run dir); rm_safety:test then reuses it, also with
  --no-deps; config.json holds the resolved path; a rerun redoes nothing."""
  runs = tmp_path / "runs"
  rc, out, err = run_launch("experiments/rm_helpful.py:test", runs=runs)
  assert rc == 0, err[-3000:]
  sft_final = runs / "sft-test" / "final"
  assert "running experiments/sft.py:test first" in err and f"using {sft_final}" in err
  assert (sft_final / "config.json").is_file() and (runs / "rm_helpful-test" / "final" / "head.json").is_file()
  saved = json.loads((runs / "rm_helpful-test" / "config.json").read_text())
  assert saved["init"] == str(sft_final)
  assert json.loads((runs / "sft-test" / "config.json").read_text())["name"] == "sft-test"
  assert not (runs / "sft-test" / "run.lock").exists() and not (runs / "rm_helpful-test" / "run.lock").exists()
  rc, out, err = run_launch("experiments/rm_safety.py:test", "--no-deps", runs=runs)
  assert rc == 0 and "running" not in err and f"using {sft_final}" in err, err[-3000:]
  import l2jax.reward as R
  assert R.load(runs / "rm_safety-test" / "final") is not None
  mtime = (sft_final / "config.json").stat().st_mtime_ns
  rc, out, err = run_launch("experiments/rm_helpful.py:test", runs=runs)
  assert rc == 0 and "running" not in err and (sft_final / "config.json").stat().st_mtime_ns == mtime, err[-2000:]
