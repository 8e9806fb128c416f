"""The run directory cannot be damaged (DESIGN.md section 2): refusal of non-run directories, the lock, config.json
only after acceptance, final/ always the last step, fallback past corrupt checkpoints, litter cleanup, one-line
errors, config ranges, skip_bad counts."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2jax import config as c
from l2jax.launch import RunDirLocked, RunLock, load_experiment

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.vocab_size=512", "--set", "model.dim=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64",
         "--set", "data.tokenizer=data/stories260K/tok512.model", "--set", "seq_len=32", "--set", "global_batch=8",
         "--set", "log_every=1", "--set", "eval_every=0", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=1", "--set", "ckpt.async_save=false"]


def launch(run_dir, *extra, steps=4, every=2, experiment="experiments/pretrain.py:tiny", small=True):
  cmd = [sys.executable, "-m", "l2jax.launch", experiment, "--run-dir", str(run_dir), *(SMALL if small else []),
         "--set", f"steps={steps}", "--set", f"ckpt.every={every}", *extra]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout, p.stderr


def snapshot(d: Path) -> dict:
  return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
          for p in sorted(d.rglob("*"))}


def error_lines(err: str) -> list[str]:
  return [l for l in err.splitlines() if l.startswith("error:")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A JSONL corpus with two bad lines, read with data.skip_bad=true."""
  d = tmp_path_factory.mktemp("corpus")
  text = (ROOT / "data/pretrain-text/tinyshakespeare.txt").read_text().split("\n\n")[:300]
  lines = [json.dumps({"text": t}) for t in text]
  lines.insert(5, "{not json")
  lines.insert(50, json.dumps({"title": "no text field"}))
  (d / "c.jsonl").write_text("\n".join(lines) + "\n")
  return ["--set", "data.kind=jsonl", "--set", f"data.paths={d / 'c.jsonl'}", "--set", "data.skip_bad=true"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
  d = tmp_path_factory.mktemp("runs") / "run"
  rc, out, err = launch(d, *corpus, steps=4, every=2)
  assert rc == 0, err
  return d


def test_skip_bad_counts_are_printed_and_written(finished_run):
  stats = json.loads((finished_run / "data_stats.json").read_text())
  assert stats["skipped_bad"] == 2 and stats["documents"] == 300, stats
  assert len(stats["skipped_examples"]) == 2 and "c.jsonl:6" in stats["skipped_examples"][0]
  assert json.loads((finished_run / "final" / "final_step.json").read_text())["step"] == 4


def test_model_dir_as_run_dir_is_refused_and_untouched(tmp_path):
  from l2jax import checkpoint as ck
  from l2jax.model import llama, presets
  cfg = presets.get("test")
  model_dir = tmp_path / "model"
  ck.save_model_dir(model_dir, cfg, llama.split(llama.init(cfg, 0))[1], None)
  before = snapshot(model_dir)
  rc, out, err = launch(model_dir, "--set", "data.paths=/nonexistent.txt")
  assert rc != 0 and "not an l2jax run directory" in err and str(model_dir) in err, err
  assert len(error_lines(err)) == 1
  assert snapshot(model_dir) == before
  ck.load_model_dir(model_dir)   # still loads


def test_run_dir_that_is_a_file_and_a_non_python_experiment_are_one_line_errors(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  rc, out, err = launch(f)
  assert rc != 0 and "is a file" in err and len(err.strip().splitlines()) == 1, err
  assert f.read_text() == "x"
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "README.md:tiny"], cwd=ROOT, capture_output=True,
                     text=True)
  assert p.returncode != 0 and "README.md: not an experiment file" in p.stderr, p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and "NoneType" not in p.stderr


@pytest.mark.parametrize("setting,key", [("steps=-5", "steps"), ("ckpt.every=0", "ckpt.every"),
                                         ("optim.lr=nan", "optim.lr"), ("optim.lr=-1", "optim.lr")])
def test_out_of_range_values_are_rejected_before_anything_is_written(tmp_path, setting, key):
  rc, out, err = launch(tmp_path / "run", "--set", setting)
  assert rc == 2 and f"--set {setting}: {key}: expected" in err, err
  assert not (tmp_path / "run").exists()


def test_every_number_is_range_checked_for_every_stage():
  cfg = load_experiment("experiments/pretrain.py:tiny")[0]
  for bad in ("global_batch=0", "seq_len=0", "log_every=0", "optim.b2=1.5", "optim.eps=inf", "data.eval_every_nth=-1",
              "mesh.fsdp=0", "model.rope_theta=0"):
    with pytest.raises(c.ConfigError, match=bad.split("=")[0].replace(".", r"\.") + ": expected"):
      c.apply_overrides(cfg, [bad])
  assert c.apply_overrides(cfg, ["mesh.fsdp=-1"]).mesh.fsdp == -1
  for exp in ("sft", "rm_helpful"):   # registered stages validate their whole tree when built
    cfg = load_experiment(f"experiments/{exp}.py:tiny")[0]
    with pytest.raises(c.ConfigError, match=r"optim\.lr: expected a finite float >= 0, found nan"):
      c.apply_overrides(cfg, ["optim.lr=nan"])
  with pytest.raises(c.ConfigError, match=r"data\.heldout_fraction|fraction"):
    c.apply_overrides(load_experiment("experiments/rm_helpful.py:tiny")[0], ["data.heldout_fraction=2"])


def test_a_new_config_class_is_covered_and_can_declare_limits():
  import dataclasses
  from typing import ClassVar

  @dataclasses.dataclass(frozen=True)
  class Part:
    LIMITS: ClassVar[dict] = {"offset": c.ANY}
    offset: int = -3          # allowed by its LIMITS
    count: int = 1            # default: ints >= 0
    keep_fraction: float = 0.5

  @c.register
  @dataclasses.dataclass(frozen=True)
  class NewStage:
    stage: ClassVar[str] = "new_stage_for_test"
    part: Part = Part()
    kl_beta: float = 0.01

  try:
    assert NewStage().part.offset == -3
    with pytest.raises(c.ConfigError, match=r"part\.count: expected an int >= 0, found -1"):
      NewStage(part=Part(count=-1))
    with pytest.raises(c.ConfigError, match=r"part\.keep_fraction: expected a finite float in \[0, 1\]"):
      NewStage(part=Part(keep_fraction=1.5))
    with pytest.raises(c.ConfigError, match=r"kl_beta: expected a finite float"):
      c.apply_overrides(NewStage(), ["kl_beta=inf"])
  finally:
    c.STAGES.pop("new_stage_for_test")


def test_lock_names_its_holder_and_stale_locks_are_taken_over(tmp_path):
  d = tmp_path / "run"
  d.mkdir()
  held = RunLock(d).acquire()
  # another process (this test holds it, alive) -> a second launch exits non-zero naming the holder
  rc, out, err = launch(d)
  assert rc != 0 and f"locked by process {os.getpid()}" in err and socket.gethostname() in err, err
  assert not (d / "config.json").exists() and (d / "run.lock").exists()
  held.release()
  assert not (d / "run.lock").exists()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (d / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  lock = RunLock(d).acquire()   # stale: its process is gone
  assert json.loads((d / "run.lock").read_text())["pid"] == os.getpid()
  with pytest.raises(RunDirLocked, match="already in use by this process"):
    RunLock(d).acquire()
  lock.release()
  (d / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(RunDirLocked, match=r"locked by process 1 on host 'elsewhere'"):
    RunLock(d).acquire()


def test_refused_resume_keeps_config_json(finished_run, tmp_path, corpus):
  d = tmp_path / "copy"
  shutil.copytree(finished_run, d)
  before = (d / "config.json").read_bytes()
  rc, out, err = launch(d, *corpus, "--set", "model.n_layers=3", steps=6)
  assert rc != 0 and "holds checkpoints of another experiment" in err, err
  assert (d / "config.json").read_bytes() == before
  assert not (d / "run.lock").exists()


@pytest.mark.slow
def test_extend_with_corrupt_newest_checkpoint_and_litter(finished_run, tmp_path, corpus):
  """Rerun a finished 4-step run with steps=6 after corrupting checkpoint 4 and leaving SIGKILL litter: it falls
  back to step 2 saying why, trains to 6, and final/ is rewritten to step 6 (equal to checkpoint 6)."""
  from l2jax.checkpoint import restore_params
  d = tmp_path / "copy"
  shutil.copytree(finished_run, d)
  tensors = [p for p in (d / "checkpoints/4/state").rglob("*") if p.is_file() and p.parent.name == "d"]
  big = max(tensors, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  for litter in (".final.tmp-abc123", ".x.tmp-p999999-q"):
    (d / litter).mkdir()
    (d / litter / "junk").write_text("x")
  old_final = [np.asarray(x) for x in __import__("jax").tree.leaves(restore_params(d / "final" / "params"))]
  rc, out, err = launch(d, *corpus, steps=6)
  assert rc == 0, err
  assert "skipping checkpoint" in err and "checkpoints/4" in err and "resumed from" in err and "/2" in err, err
  assert not (d / ".final.tmp-abc123").exists() and not (d / ".x.tmp-p999999-q").exists()
  assert json.loads((d / "final" / "final_step.json").read_text())["step"] == 6
  import jax
  new_final = jax.tree.leaves(restore_params(d / "final" / "params"))
  assert any(not np.array_equal(a, b) for a, b in zip(old_final, new_final))
  ckpt6 = restore_params(d / "checkpoints" / "6" / "state")["params"]
  for a, b in zip(jax.tree.leaves(ckpt6), new_final):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  assert {r["step"] for r in rows if "loss" in r} >= {3, 4, 5, 6}


def _two_checkpoints(d):
  import jax.numpy as jnp
  from l2jax.checkpoint import TrainCheckpointer
  ck = TrainCheckpointer(d, keep=5, async_save=False, identity={"a": 1})
  for s in (1, 2):
    ck.save(s, {"w": jnp.asarray(np.random.default_rng(s).normal(size=(64, 64)), jnp.float32)}, {"i": s}, force=True)
  ck.close()


def _corrupt(step_dir: Path, how: str):
  if how == "truncated tensor file":
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
            key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif how == "deleted _METADATA":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "truncated _METADATA":
    f = step_dir / "state" / "_METADATA"
    f.write_bytes(f.read_bytes()[:40])
  elif how == "deleted data/metadata":
    (step_dir / "data" / "metadata").unlink()


@pytest.mark.parametrize("how,names", [("truncated tensor file", "array w"), ("deleted _METADATA", "_METADATA: missing"),
                                       ("truncated _METADATA", "_METADATA: truncated"),
                                       ("deleted data/metadata", "data/metadata: missing")])
def test_corrupt_newest_checkpoint_falls_back(tmp_path, capsys, how, names):
  import jax
  import jax.numpy as jnp
  from l2jax.checkpoint import CheckpointError, TrainCheckpointer
  _two_checkpoints(tmp_path)
  _corrupt(tmp_path / "checkpoints" / "2", how)
  target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  ck = TrainCheckpointer(tmp_path, keep=5, async_save=False, identity={"a": 1})
  step, state, data = ck.restore_latest(target)
  assert step == 1 and data == {"i": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32))
  err = capsys.readouterr().err
  assert f"skipping checkpoint {tmp_path / 'checkpoints' / '2'}" in err and names in err, err
  assert ck.latest_step() == 1 and (tmp_path / "corrupt-checkpoints" / "2").is_dir()
  ck.close()
  # none restores: one line naming the checkpoint and the file
  _corrupt(tmp_path / "checkpoints" / "1", how)
  ck = TrainCheckpointer(tmp_path, keep=5, async_save=False, identity={"a": 1})
  with pytest.raises(CheckpointError) as e:
    ck.restore_latest(target)
  msg = str(e.value)
  assert "\n" not in msg and "checkpoints/1" in msg and names in msg, msg
  ck.close()


def test_atomic_dir_removes_litter_of_dead_writers(tmp_path):
  from l2jax.checkpoint import atomic_dir
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = [tmp_path / f".out.tmp-p{dead.pid}-abc", tmp_path / ".out.tmp-oldstyle"]
  live = tmp_path / f".out.tmp-p{os.getpid()}-zzz"
  for p in stale + [live]:
    p.mkdir()
  with atomic_dir(tmp_path / "out") as tmp:
    (tmp / "f").write_text("x")
  assert (tmp_path / "out" / "f").read_text() == "x"
  assert not any(p.exists() for p in stale) and live.exists()
