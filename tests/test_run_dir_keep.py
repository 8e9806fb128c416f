"""The run directory survives (DESIGN.md section 2): a failed or interrupted launch removes only a directory it
created that holds nothing a stage wrote; config.json exists from the moment the stage accepts the directory, so
a run stopped before its first checkpoint (rejection sampling's shards) resumes; metrics.jsonl is trimmed to the
checkpoint a run resumes from."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l2jax import launch as L
from l2jax.metrics import MetricsWriter, read_jsonl
from l2jax.rl import offline

ROOT = Path(__file__).resolve().parents[1]
EXP = "experiments/pretrain.py:tiny"


def _stage_that(monkeypatch, action):
  """Replace the pretrain stage's run(cfg, run_dir) by `action(run_dir)` for in-process launches."""
  from l2jax.stages import pretrain
  monkeypatch.chdir(ROOT)   # the experiment's data paths are relative to the repository
  monkeypatch.setattr(pretrain, "run", lambda cfg, run_dir, **kw: action(Path(run_dir)))


def test_ctrl_c_after_a_stage_wrote_keeps_the_directory_and_its_config(tmp_path, monkeypatch):
  """Ctrl-C while a stage that writes before its first checkpoint (shards) runs: nothing is removed, config.json
  is there, and the rerun accepts the directory."""
  d = tmp_path / "run"

  def sample_then_interrupt(run_dir):
    offline.shard_path(run_dir, "samples", 0).parent.mkdir(parents=True)
    offline.shard_path(run_dir, "samples", 0).write_text('{"key": "a"}\n')
    raise KeyboardInterrupt

  _stage_that(monkeypatch, sample_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    L.launch(EXP, [], d)
  assert offline.shard_path(d, "samples", 0).read_text() == '{"key": "a"}\n'
  assert json.loads((d / "config.json").read_text())["stage"] == "pretrain"
  assert not (d / "run.lock").exists()
  seen = []
  _stage_that(monkeypatch, lambda run_dir: seen.append(sorted(os.listdir(run_dir))))
  L.launch(EXP, [], d)   # accepted: a run directory of this stage and name
  assert seen == [["config.json", "run.lock", "shards"]]


def test_a_failure_removes_only_an_empty_directory_this_launch_created(tmp_path, monkeypatch):
  def fail(run_dir):
    raise ValueError("the stage refused its input")

  _stage_that(monkeypatch, fail)
  with pytest.raises(ValueError):
    L.launch(EXP, [], tmp_path / "new")
  assert not (tmp_path / "new").exists()           # created here, holds only config.json and the lock: removed
  (tmp_path / "mine").mkdir()
  with pytest.raises(ValueError):
    L.launch(EXP, [], tmp_path / "mine")
  assert (tmp_path / "mine").is_dir()              # the user's directory: kept

  def write_stats_then_fail(run_dir):
    (run_dir / "data_stats.json").write_text("{}")
    raise ValueError("bad record")

  _stage_that(monkeypatch, write_stats_then_fail)
  with pytest.raises(ValueError):
    L.launch(EXP, [], tmp_path / "wrote")
  assert (tmp_path / "wrote" / "data_stats.json").is_file() and (tmp_path / "wrote" / "config.json").is_file()


def test_a_refused_resume_keeps_the_old_config(tmp_path, monkeypatch):
  """A directory holding an earlier run gets the new config.json only once the stage accepts it."""
  d = tmp_path / "run"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"stage": "pretrain", "name": "pretrain-tiny", "steps": 1}))
  (d / "metrics.jsonl").write_text("")

  def refuse(run_dir):
    raise RuntimeError("holds checkpoints of another experiment")

  _stage_that(monkeypatch, refuse)
  with pytest.raises(RuntimeError):
    L.launch(EXP, [], d)
  assert json.loads((d / "config.json").read_text())["steps"] == 1


# ----------------------------------------------------------------------------------------------- metrics.jsonl

def test_trim_after_drops_later_steps_and_torn_lines(tmp_path):
  from l2jax.metrics import trim_after
  p = tmp_path / "metrics.jsonl"
  p.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (0, 1, 2, 2, 3)) + '{"step": 4, "lo')
  assert trim_after(p, 2) == 2
  assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2, 2]   # a duplicate <= k is not ours to judge
  assert trim_after(p, 2) == 0


def test_resumed_loop_writes_each_step_once(tmp_path):
  """A kill between step 3's metrics line and its checkpoint: the run resumes from checkpoint 2 and writes step 3
  again; metrics.jsonl must hold every step once."""
  w = MetricsWriter(tmp_path, tensorboard=False)
  for s in (1, 2, 3):
    w.write(s, {"loss": 1.0 / s})
  w.close()
  w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)   # what train.run opens on resume
  w.write(3, {"loss": 0.3})
  w.close()
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


SMALL = ["--set", "model.vocab_size=512", "--set", "model.dim=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64",
         "--set", "data.tokenizer=data/stories260K/tok512.model",
         "--set", "seq_len=32", "--set", "global_batch=8", "--set", "log_every=1", "--set", "eval_every=0",
         "--set", "tensorboard=false", "--set", "optim.warmup_steps=1", "--set", "ckpt.async_save=false"]


def launch(run_dir, steps, every):
  cmd = [sys.executable, "-m", "l2jax.launch", EXP, "--run-dir", str(run_dir), *SMALL, "--set", f"steps={steps}",
         "--set", f"ckpt.every={every}"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
def test_sigkill_before_a_checkpoint_leaves_no_duplicate_metrics(tmp_path):
  """Through the launcher: a run killed after logging steps 3-4 but with checkpoints only at 2 resumes from 2
  and logs 3..6 once each."""
  d = tmp_path / "run"
  rc, out, err = launch(d, steps=4, every=2)
  assert rc == 0, err
  import shutil
  shutil.rmtree(d / "checkpoints" / "4")   # as if killed between step 4's metrics line and its checkpoint
  shutil.rmtree(d / "final")
  rc, out, err = launch(d, steps=6, every=2)
  assert rc == 0, err
  steps = [r["step"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6], steps


# ----------------------------------------------------------------------------------------------- rejection sampling

WRAPPER = textwrap.dedent("""
    import json, sys
    from l2jax import launch
    from l2jax.rl import offline
    seen, stop_after, log = [], int(sys.argv[1]), sys.argv[2]
    real_run = offline.run
    def run(items, *, work, name, **kw):
      if name == "samples":   # the sampling phase's main pass
        inner = work
        def work(batch):
          if len(seen) >= stop_after:
            raise KeyboardInterrupt   # Ctrl-C in the middle of the sampling phase
          recs = inner(batch)
          seen.append([kw["key"](x) for x in batch])
          json.dump(seen, open(log, "w"))
          return recs
      return real_run(items, work=work, name=name, **kw)
    offline.run = run
    sys.exit(launch.main(sys.argv[3:]))
    """)


@pytest.mark.slow
def test_rejection_interrupted_while_sampling_keeps_its_shards_and_resumes(tmp_path):
  """experiments/rejection.py:test (its SFT and reward models built first through references): Ctrl-C after the
  first chunk of samples is written leaves the directory with its shard and config.json; the rerun resumes,
  samples only the prompts not done, and finishes."""
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path / "runs"), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  run_dir = tmp_path / "runs" / "rejection-test"
  script = tmp_path / "wrapper.py"
  script.write_text(WRAPPER)

  def run(stop_after, log):
    return subprocess.run([sys.executable, str(script), str(stop_after), str(log), "experiments/rejection.py:test"],
                          cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=1200)

  p = run(1, tmp_path / "first.json")
  assert p.returncode == 130, p.stderr[-3000:]
  shard = offline.shard_path(run_dir, "samples", 0)
  first = json.loads((tmp_path / "first.json").read_text())[0]
  before = shard.read_text()
  assert [r["key"] for r in offline.read_jsonl(shard)] == first
  assert json.loads((run_dir / "config.json").read_text())["stage"] == "rejection"
  assert "Traceback" not in p.stderr and "interrupted" in p.stderr, p.stderr[-3000:]
  p = run(1000, tmp_path / "second.json")
  assert p.returncode == 0, p.stderr[-3000:]
  again = [k for chunk in json.loads((tmp_path / "second.json").read_text()) for k in chunk]
  assert again and not set(again) & set(first)                 # the finished shard was not sampled again
  assert shard.read_text().startswith(before)
  keys = [r["key"] for r in offline.read_jsonl(run_dir / "samples.jsonl")]
  assert sorted(keys) == sorted(first + again) and len(set(keys)) == len(keys)
  assert (run_dir / "final" / "config.json").is_file()
