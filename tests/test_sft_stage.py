"""The SFT stage through the launcher: starts from `init`, answer-only loss falls on real dialogs, held-out loss and
samples, exact resume after SIGKILL, derived steps, paper settings, bad records reported."""
import json
import math
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
from tests.test_pretrain_stage import complete_steps, final_params, per_step_crc

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
# the tiny experiment, smaller: 60 GSM8K records (every 20th held out), 2 epochs of 4 rows x 256 tokens
SMALL = ["--set", "global_batch=4", "--set", "data.max_dialogs=60", "--set", "log_every=1", "--set", "eval_every=8",
         "--set", "eval_batches=1", "--set", "sample_prompts=2", "--set", "sample_max_new_tokens=8",
         "--set", "tensorboard=false", "--set", "optim.warmup_steps=2", "--set", "optim.lr=1e-2",
         "--set", "ckpt.every=3"]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
  """A small random l2jax checkpoint directory (stands in for runs/pretrain-tiny/final)."""
  from l2jax import checkpoint
  from l2jax.model import llama, presets
  cfg = presets.get("tiny", **SMALL_MODEL)
  d = tmp_path_factory.mktemp("init") / "ckpt"
  checkpoint.save_model_dir(d, cfg, llama.split(llama.init(cfg, seed=7))[1],
                            ROOT / "data/llama2-tokenizer/tokenizer.model")
  return d


def launch(run_dir, init, *extra, wait=True):
  cmd = [sys.executable, "-m", "l2jax.launch", "experiments/sft.py:tiny", "--run-dir", str(run_dir), *SMALL,
         "--set", f"init={init}", *extra]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return p
  out, err = p.communicate(timeout=600)
  return p.returncode, out, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, init_dir):
  d = tmp_path_factory.mktemp("sft_ref")
  rc, out, err = launch(d, init_dir)
  assert rc == 0, err
  return d


def metrics(run_dir):
  return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def small_cfg(init_dir):
  cfg = load_experiment("experiments/sft.py:tiny")[0]
  return c.apply_overrides(cfg, [s for s in SMALL if s != "--set"] + [f"init={init_dir}"])


def test_answer_loss_falls_from_init_with_eval_and_samples(reference_run, init_dir):
  rows = metrics(reference_run)
  stats = json.loads((reference_run / "data_stats.json").read_text())
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == stats["steps"] > 10
  assert np.mean(losses[-3:]) < losses[0] - 3.0, losses          # answer-only loss falls clearly
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  assert len(evals) >= 2 and evals[-1] < evals[0] - 1.0, evals    # held-out answer-only loss too
  assert stats["train"]["dialogs"] > 30 and stats["eval"]["dialogs"] >= 1

  # step 1 started from `init`: its loss is the init model's answer-only loss on the first batch
  import jax
  from l2jax import checkpoint
  from l2jax.data import dialog_packing as dp
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.model import llama
  from l2jax.stages import sft
  from l2jax.stages.common import lm_loss_fn
  cfg = small_cfg(init_dir)
  tok = Tokenizer(cfg.data.tokenizer)
  prep = sft.prepare(cfg, tok)
  assert prep.steps == stats["steps"] == math.ceil(sum(stats["rows_per_epoch"]) / cfg.global_batch)
  batch = next(dp.make_sft_iterator(prep.train, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                                    epochs=prep.epochs)[0])
  mcfg, params = checkpoint.load_model_dir(init_dir)
  graphdef = llama.split(llama.abstract(mcfg))[0]
  loss_sum, n = jax.jit(lm_loss_fn(graphdef))(params, batch)
  assert n == batch["loss_mask"].sum() > 0
  np.testing.assert_allclose(losses[0], float(loss_sum / n), rtol=1e-5)

  samples = [json.loads(l) for l in (reference_run / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == 2
  for s in samples:
    assert s["messages"][-1]["role"] == "user" and s["reference"] and isinstance(s["answer"], str)
    assert 1 <= s["new_tokens"] <= 8 and s["stop_reason"] in ("eos", "length")
  saved = json.loads((reference_run / "config.json").read_text())
  assert saved["stage"] == "sft" and saved["init"] == str(init_dir)
  import l2jax
  assert l2jax.load(reference_run / "final").cfg.dim == 32


@pytest.mark.slow
def test_killed_run_resumes_exactly(reference_run, init_dir, tmp_path):
  p = launch(tmp_path, init_dir, wait=False)
  deadline = time.time() + 300
  while not complete_steps(tmp_path) and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  time.sleep(random.Random(5).uniform(0.0, 0.3))   # a random point after the first checkpoint
  p.send_signal(signal.SIGKILL)
  p.communicate(timeout=300)
  assert not (tmp_path / "final").exists(), "the run ended before the signal: make it longer"
  assert p.returncode == -signal.SIGKILL
  rc, out, err = launch(tmp_path, init_dir)
  assert rc == 0 and "resumed from" in err, err
  ref = per_step_crc(reference_run)
  assert per_step_crc(tmp_path) == ref and len(ref) == json.loads((reference_run / "data_stats.json").read_text())["steps"]
  for a, b in zip(final_params(tmp_path), final_params(reference_run)):
    np.testing.assert_array_equal(a, b)
  assert (tmp_path / "samples.jsonl").read_text() == (reference_run / "samples.jsonl").read_text()


def test_killed_after_its_last_checkpoint_writes_final_on_resume(reference_run, init_dir, tmp_path):
  """A run killed between its last checkpoint and final/ (the data iterator is exhausted) resumes to final/."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(reference_run, run)
  shutil.rmtree(run / "final")
  rc, out, err = launch(run, init_dir)
  assert rc == 0 and "resumed from" in err, err[-2000:]
  for a, b in zip(final_params(run), final_params(reference_run)):
    np.testing.assert_array_equal(a, b)


def test_steps_follow_epochs_and_override(init_dir):
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.stages import sft
  cfg = small_cfg(init_dir)
  tok = Tokenizer(cfg.data.tokenizer)
  one = sft.prepare(c.apply_overrides(cfg, ["epochs=1"]), tok)
  two = sft.prepare(cfg, tok)
  assert one.stats["rows_per_epoch"] == two.stats["rows_per_epoch"][:1]
  assert two.steps == math.ceil(sum(two.stats["rows_per_epoch"]) / 4) and two.steps > one.steps
  more = sft.prepare(c.apply_overrides(cfg, [f"steps={3 * two.steps}"]), tok)
  assert more.steps == 3 * two.steps and more.epochs > 2


def test_bad_records_fail_with_file_line_or_are_reported(tmp_path, init_dir):
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.stages import sft
  good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
  bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hello!"}]}
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good, good]) + "\n{oops\n")
  rc, out, err = launch(tmp_path / "run", init_dir, "--set", "data.kind=messages", "--set", f"data.paths={path}",
                        "--set", "data.max_dialogs=0", "--set", "data.eval_every_nth=0")
  assert rc == 1 and "bad.jsonl:3: message 1: unknown role 'robot'" in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()
  cfg = c.apply_overrides(small_cfg(init_dir), ["data.kind=messages", f"data.paths={path}", "data.max_dialogs=0",
                                                "data.eval_every_nth=0", "data.skip_bad=true"])
  prep = sft.prepare(cfg, Tokenizer(cfg.data.tokenizer))
  s = prep.stats["train"]
  assert s["dialogs"] == 4 and s["skipped_bad"] == 2
  assert s["skipped"] == {"unknown role 'robot'": 1, "invalid JSON": 1}
  assert "bad.jsonl:6: invalid JSON" in s["skipped_examples"][1]
  assert "2 bad records skipped" in sft.summary(prep.stats)


def test_paper_settings_for_sizes():
  for size in ("7b", "13b", "70b"):
    cfg = load_experiment(f"experiments/sft.py:{size}")[0]
    o = cfg.optim
    assert (o.lr, o.schedule, o.weight_decay, o.warmup_steps) == (2e-5, "cosine", 0.1, 0)
    assert (cfg.global_batch, cfg.seq_len, cfg.epochs, cfg.steps) == (64, 4096, 2, 0)
    assert cfg.init and cfg.model.max_seq_len == 4096
    assert c.from_dict(type(cfg), c.to_dict(cfg)) == cfg
  assert load_experiment("experiments/sft.py:70b")[0].mesh.tensor == 8
  with pytest.raises(c.ConfigError, match="epochs must be >= 1"):
    c.apply_overrides(load_experiment("experiments/sft.py:tiny")[0], ["epochs=0"])
  with pytest.raises(c.ConfigError, match="data.kind"):
    c.apply_overrides(load_experiment("experiments/sft.py:tiny")[0], ["data.kind=csv"])
