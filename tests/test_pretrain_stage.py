"""The pretraining stage through the launcher: exact resume after SIGKILL / SIGTERM, configs, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from l2jax import config as c
from l2jax.launch import load_experiment

ROOT = Path(__file__).resolve().parents[1]

# a small model on the 512-piece stories260K tokenizer: fast on 2 cores
SMALL = ["--set", "model.vocab_size=512", "--set", "model.dim=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64",
         "--set", "data.tokenizer=data/stories260K/tok512.model", "--set", "seq_len=32", "--set", "global_batch=8",
         "--set", "log_every=1", "--set", "eval_every=0", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=2"]


def launch(run_dir, *extra, steps=30, every=3, wait=True, env_extra=None):
  cmd = [sys.executable, "-m", "l2jax.launch", "experiments/pretrain.py:tiny", "--run-dir", str(run_dir), *SMALL,
         "--set", f"steps={steps}", "--set", f"ckpt.every={every}", *extra]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", **(env_extra or {})}
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return p
  out, err = p.communicate(timeout=600)
  return p.returncode, out, err


def per_step_crc(run_dir):
  """The batch fingerprint of each step; a resumed run's re-done steps overwrite earlier lines."""
  rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["batch_crc"] for r in rows if "batch_crc" in r}


def final_params(run_dir):
  from l2jax.checkpoint import restore_params
  import jax
  return jax.tree.leaves(restore_params(Path(run_dir) / "final" / "params"))


def complete_steps(run_dir):
  d = Path(run_dir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("ref")
  rc, out, err = launch(d)
  assert rc == 0, err
  return d


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_exactly(reference_run, tmp_path, sig):
  p = launch(tmp_path, wait=False)
  deadline = time.time() + 300
  while not complete_steps(tmp_path) and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  time.sleep(random.Random(int(sig)).uniform(0.0, 0.3))  # a random point after the first checkpoint
  p.send_signal(sig)
  out, err = p.communicate(timeout=300)
  assert not (tmp_path / "final").exists(), "the run ended before the signal: make it longer"
  if sig == signal.SIGTERM:
    assert p.returncode == 0 and "SIGTERM: saved a checkpoint at step" in err, err
  else:
    assert p.returncode == -signal.SIGKILL
  rc, out, err = launch(tmp_path)
  assert rc == 0, err
  assert per_step_crc(tmp_path) == per_step_crc(reference_run)
  assert len(per_step_crc(reference_run)) == 30
  for a, b in zip(final_params(tmp_path), final_params(reference_run)):
    np.testing.assert_array_equal(a, b)


def test_loss_falls_and_final_checkpoint_loads(reference_run):
  import l2jax
  rows = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.3, losses
  model = l2jax.load(reference_run / "final")
  import jax.numpy as jnp
  assert model(jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 512)
  saved = json.loads((reference_run / "config.json").read_text())
  assert saved["stage"] == "pretrain" and saved["model"]["dim"] == 32


def test_every_experiment_builds():
  for f in sorted((ROOT / "experiments").glob("*.py")):
    mod = load_experiment(str(f))[0]
    assert type(mod).stage in c.STAGES
    doc = f.read_text()
    for arg in ("tiny", "test", "7b", "13b", "70b"):
      if f":{arg}" in doc or f'"{arg}"' in doc:
        cfg = load_experiment(f"{f}:{arg}")[0]
        assert c.from_dict(type(cfg), c.to_dict(cfg)) == cfg


def test_paper_settings_for_sizes():
  for size, lr in (("7b", 3e-4), ("13b", 3e-4), ("34b", 1.5e-4), ("70b", 1.5e-4)):
    cfg = load_experiment(f"experiments/pretrain.py:{size}")[0]
    o = cfg.optim
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip, o.warmup_steps, o.decay_to) == \
        (lr, 0.9, 0.95, 1e-5, 0.1, 1.0, 2000, 0.1)
    assert cfg.seq_len == 4096 and cfg.global_batch * cfg.seq_len == 4 * 1024 * 1024


def test_set_typing_and_unknown_key():
  cfg = load_experiment("experiments/pretrain.py:tiny")[0]
  cfg = c.apply_overrides(cfg, ["steps=7", "optim.lr=0.5", "model.scan_layers=false", "data.paths=a.txt,b.txt"])
  assert cfg.steps == 7 and cfg.optim.lr == 0.5 and cfg.model.scan_layers is False
  assert cfg.data.paths == ("a.txt", "b.txt")
  with pytest.raises(c.ConfigError, match="expected an int"):
    c.apply_overrides(cfg, ["steps=seven"])
  with pytest.raises(c.ConfigError, match=r"(?s)unknown config key 'optim.learning_rate'.*optim\.lr"):
    c.apply_overrides(cfg, ["optim.learning_rate=1"])
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/pretrain.py:tiny", "--set", "stepz=3"],
                     cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 2 and "unknown config key 'stepz'" in p.stderr and "global_batch" in p.stderr


@pytest.mark.parametrize("bad,match", [
    (["--set", "data.paths=does/not/exist.txt"], "does/not/exist.txt"),
    (["--set", "data.tokenizer=data/pretrain-text/c4_demo.jsonl"], "not a readable SentencePiece model"),
])
def test_bad_input_is_a_clear_error(tmp_path, bad, match):
  rc, out, err = launch(tmp_path / "run", *bad, steps=2)
  assert rc != 0 and match in err, err
  assert not (tmp_path / "run").exists()  # nothing half-written left behind


def test_empty_dataset_is_a_clear_error(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  rc, out, err = launch(tmp_path / "run", "--set", f"data.paths={empty}", steps=2)
  assert rc != 0 and "empty.txt" in err, err


def test_run_dir_of_another_experiment_is_refused(reference_run, tmp_path):
  import shutil
  d = tmp_path / "other"
  shutil.copytree(reference_run, d)
  shutil.rmtree(d / "final")
  rc, out, err = launch(d, "--set", "model.n_layers=3", steps=40)
  assert rc != 0 and "holds checkpoints of another experiment" in err and "model" in err, err


@pytest.mark.slow
def test_two_processes_train_together_through_jax_distributed(reference_run, tmp_path):
  """Multi-host for real: two processes on localhost (CPU, gloo collectives) form one 2-device mesh, start from
  an l2jax checkpoint, each feeds its own shard of documents, and they write one set of checkpoints and one
  final model."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [launch(tmp_path / "run", "--set", "eval_every=3", "--set", f"init={reference_run / 'final'}",
                  steps=6, every=3, wait=False,
                  env_extra={"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
  ref_rows = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
  assert steps[0]["loss"] < [r["loss"] for r in ref_rows if "loss" in r][0] - 0.3  # started from the trained model
  assert all(r["loss_weight"] > 8 * 32 * 0.9 for r in steps)  # the global batch: 8 rows of 32 from both processes
  assert any("eval_loss" in r for r in rows)
  assert complete_steps(tmp_path / "run") == [3, 6]
  import l2jax
  import jax.numpy as jnp
  assert np.isfinite(np.asarray(l2jax.load(tmp_path / "run" / "final")(jnp.ones((1, 4), jnp.int32)))).all()
