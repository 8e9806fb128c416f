"""The DPO stage (l2jax/stages/dpo.py): one step's loss, metrics and gradients against a direct full-sequence
log-softmax reference (with micro-batches and a padding pair), log 2 and zero rewards when policy == reference,
the answer-only mask of the preference rows, held-out metrics, config errors, and experiments/dpo.py:test through
the launcher from an empty run directory (a rerun redoes nothing)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2jax import config as c
from l2jax.data import preferences as prefs
from l2jax.data.tokenizer import Tokenizer, encode_chat
from l2jax.losses import MARGINS
from l2jax.model import llama, presets
from l2jax.stages import dpo

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/llama2-tokenizer/tokenizer.model"
P, T = 4, 16


@pytest.fixture(scope="module")
def models():
  """(graphdef, policy params, a different reference's params) of the 2-layer, vocab-128 "test" preset."""
  cfg = presets.get("test")
  graphdef, policy = llama.split(llama.init(cfg, seed=0))
  return graphdef, policy, llama.split(llama.init(cfg, seed=1))[1]


def synthetic_batch(seed=0):
  """P pairs of rows of T tokens: prompt, answer, right padding; the last pair is padding (valid 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 128, (P, 2, T)).astype(np.int32)
  answer = np.zeros((P, 2, T), np.int32)
  for p in range(P):
    for r in range(2):
      start, end = int(rng.integers(2, 7)), int(rng.integers(9, T + 1))
      answer[p, r, start:end] = 1
      tokens[p, r, end:] = 0
  return {"tokens": tokens, "answer_mask": answer, "rating": np.array([0, -1, 2, 1], np.int32),
          "valid": np.array([1, 1, 1, 0], np.float32)}


def direct_loss(graphdef, params, ref, batch, beta, ls, margin):
  """(mean DPO loss over the valid pairs, per-pair implicit rewards and log-probs) from the full log-softmax."""
  from flax import nnx

  def seq_logp(p):
    tokens_rt = jnp.asarray(batch["tokens"]).reshape(2 * P, T)
    logp_rtv = jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens_rt), axis=-1)
    tok_rt = jnp.take_along_axis(logp_rtv[:, :-1], tokens_rt[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(tok_rt * jnp.asarray(batch["answer_mask"]).reshape(2 * P, T)[:, 1:], axis=1).reshape(P, 2)
  pol, rf = seq_logp(params), jax.lax.stop_gradient(seq_logp(ref))
  r_c, r_r = beta * (pol[:, 0] - rf[:, 0]), beta * (pol[:, 1] - rf[:, 1])
  table = np.asarray(MARGINS[margin])
  m = np.where(batch["rating"] >= 0, table[np.clip(batch["rating"], 0, 3)], 0.0)
  z = r_c - r_r - m
  loss_p = -(1 - ls) * jax.nn.log_sigmoid(z) - ls * jax.nn.log_sigmoid(-z)
  v = jnp.asarray(batch["valid"])
  return jnp.sum(loss_p * v) / jnp.sum(v), (r_c, r_r, pol)


@pytest.mark.parametrize("micro", [1, 2])
def test_one_step_loss_metrics_and_gradients_equal_a_direct_reference(models, micro):
  graphdef, params, ref = models
  batch = synthetic_batch()
  beta, ls, margin = 0.5, 0.1, "small"
  # SGD with lr 1: the step's update is minus its gradient
  step = jax.jit(dpo.make_dpo_step(graphdef, optax.sgd(1.0), beta=beta, label_smoothing=ls, margin=margin,
                                   micro_batches=micro))
  state = {"params": params, "opt": optax.sgd(1.0).init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  new, met = step(state, ref, batch)
  (want, (r_c, r_r, pol)), want_g = jax.value_and_grad(
      lambda p: direct_loss(graphdef, p, ref, batch, beta, ls, margin), has_aux=True)(params)
  v = batch["valid"].astype(bool)
  np.testing.assert_allclose(float(met["loss"]), float(want), rtol=1e-5)
  assert float(met["loss_weight"]) == 3.0 and float(met["finite"]) == 1.0
  for k, x in (("rewards_chosen", r_c), ("rewards_rejected", r_r), ("reward_margin", r_c - r_r),
               ("logps_chosen", pol[:, 0]), ("logps_rejected", pol[:, 1])):
    # rewards are beta times differences of float32 log-probs of about -30: a few ulps of 30 apart
    np.testing.assert_allclose(float(met[k]), float(np.mean(np.asarray(x)[v])), rtol=1e-5, atol=2e-5, err_msg=k)
  np.testing.assert_allclose(float(met["reward_accuracy"]), np.mean(np.asarray(r_c > r_r)[v]))
  got_g = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new["params"])
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    w = np.asarray(w)   # float32 sums over tokens: equal up to 1e-4 of the leaf's largest entry
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
  assert max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want_g)) > 1e-4   # a real gradient


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(models):
  graphdef, params, _ = models
  batch = synthetic_batch(1)
  opt = optax.adamw(1e-3)
  step = jax.jit(dpo.make_dpo_step(graphdef, opt, beta=0.1))
  state = {"params": params, "opt": opt.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  _, met = step(state, params, batch)
  np.testing.assert_allclose(float(met["loss"]), math.log(2), rtol=1e-6)
  for k in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
    assert abs(float(met[k])) < 1e-6, (k, float(met[k]))
  assert float(met["logps_chosen"]) < 0 and float(met["grad_norm"]) > 0


def test_heldout_metrics_by_hand():
  pol = np.array([[-10.0, -12.0], [-8.0, -7.0]])
  ref = np.array([[-11.0, -11.0], [-8.0, -8.0]])
  n = np.array([[5, 4], [3, 2]])
  m = dpo.heldout_metrics(pol, ref, n, np.array([-1, -1]), beta=0.5, label_smoothing=0.0, margin="none")
  # rewards: pair 0: r_c = 0.5, r_r = -0.5 (z = 1); pair 1: r_c = 0, r_r = 0.5 (z = -0.5)
  np.testing.assert_allclose(m["loss"], (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5))) / 2, rtol=1e-6)
  assert m["reward_accuracy"] == 0.5 and m["pairs"] == 2
  np.testing.assert_allclose([m["rewards_chosen"], m["rewards_rejected"], m["reward_margin"]], [0.25, 0.0, 0.25])
  np.testing.assert_allclose([m["logps_chosen"], m["ref_logps_chosen"]], [-9.0, -9.5])
  np.testing.assert_allclose(m["logratio_chosen"], 1.0 / 8)       # (1 + 0) / (5 + 3) answer tokens
  np.testing.assert_allclose(m["logratio_rejected"], 0.0 / 6)     # (-1 + 1) / (4 + 2)


def test_answer_mask_covers_the_answer_tokens_only():
  tok = Tokenizer(TOKENIZER)
  pairs = [prefs.Pair((("user", "What is two plus two?"),), "Four.", "It is five, I think.", rating=1),
           prefs.Pair((("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a colour.")), "Blue", "Red, or green",
                      rejected_finished=False)]
  b = prefs.pair_batch(tok, pairs, 64, size=3, answer_mask=True)
  plain = prefs.pair_batch(tok, pairs, 64, size=3)
  assert set(b) - set(plain) == {"answer_mask"}
  for k in plain:
    np.testing.assert_array_equal(b[k], plain[k])           # the existing keys are unchanged
  assert b["answer_mask"].shape == (3, 2, 64) and not b["answer_mask"][2].any()   # padding pair
  for i, p in enumerate(pairs):
    start = len(encode_chat(tok, p.messages()))
    for j, (text, done) in enumerate(((p.chosen, p.chosen_finished), (p.rejected, p.rejected_finished))):
      ids = b["tokens"][i, j][b["mask"][i, j] == 1]
      ans = b["tokens"][i, j][b["answer_mask"][i, j] == 1]
      assert np.all(b["answer_mask"][i, j][:start] == 0)
      np.testing.assert_array_equal(ans, ids[start:])          # everything after the prompt, nothing else
      assert (ans[-1] == tok.eos_id) == done                   # EOS only on a finished answer
      assert tok.decode([int(t) for t in ans if t != tok.eos_id]).strip() == text
  # cut from the left to 8 tokens: BOS + the tail; the answer is the tail, never BOS
  short = prefs.pair_batch(tok, pairs[:1], 8, answer_mask=True)
  lens = prefs.pair_answer_lengths(tok, pairs[:1])
  for j in range(2):
    assert short["mask"][0, j].sum() == 8 and short["tokens"][0, j, 0] == tok.bos_id
    assert short["answer_mask"][0, j].sum() == min(lens[j], 7) and short["answer_mask"][0, j, 0] == 0
    assert short["answer_mask"][0, j, -1] == 1


def test_pair_batches_carry_the_answer_mask_on_request():
  tok = Tokenizer(TOKENIZER)
  pairs = [prefs.Pair((("user", f"Question {i}?"),), f"Answer {i}.", f"No {i}.") for i in range(5)]
  a = prefs.PairBatches(pairs, tok, seq_len=64, global_batch=2, seed=3, buckets=True, answer_mask=True)
  b = prefs.PairBatches(pairs, tok, seq_len=64, global_batch=2, seed=3, buckets=True)
  for _ in range(3):
    x, y = next(a), next(b)
    assert "answer_mask" in x and "answer_mask" not in y
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert np.all(x["answer_mask"] <= x["mask"]) and x["answer_mask"].sum() > 0


def test_config_errors():
  assert c.MARGIN_TABLES == tuple(MARGINS)
  with pytest.raises(ValueError, match="margin"):
    c.DPO(margin="huge")
  with pytest.raises(ValueError, match="micro_batch"):
    c.DPO(global_batch=64, micro_batch=6)
  with pytest.raises(c.ConfigError, match="beta"):
    c.override(c.DPO(), "beta", "0")
  with pytest.raises(c.ConfigError, match=r"label_smoothing.*\[0, 0.5\)"):
    c.override(c.DPO(), "label_smoothing", "0.5")


def _launch(*args, runs, timeout=900):
  env = {**os.environ, "L2JAX_RUNS": str(runs), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "-m", "l2jax.launch", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_a_bad_config_value_is_one_line_through_the_launcher(tmp_path):
  p = _launch("experiments/dpo.py:test", "--set", "margin=huge", runs=tmp_path / "runs")
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert len(p.stderr.strip().splitlines()) == 1 and "margin" in p.stderr and "'huge'" in p.stderr, p.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_test_experiment_through_the_launcher_from_an_empty_run_dir_and_rerun_redoes_nothing(tmp_path):
  runs = tmp_path / "runs"
  p = _launch("experiments/dpo.py:test", runs=runs)
  assert p.returncode == 0, p.stderr[-3000:]
  d = runs / "dpo-test"
  assert "running experiments/sft.py:test first" in p.stderr
  for f in ("final/config.json", "final/tokenizer.model", "final/dpo.json", "data_summary.json", "dpo_eval.json"):
    assert (d / f).is_file(), f
  assert json.loads((d / "final/final_step.json").read_text()) == {"step": 3}
  assert json.loads((d / "config.json").read_text())["init"] == str(runs / "sft-test" / "final")
  rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for k in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
            "logps_rejected", "grad_norm", "lr"):
    assert all(np.isfinite(r[k]) for r in train_rows), k
  # step 1's metrics are the starting policy's: equal to the reference
  assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(train_rows[0]["reward_margin"]) < 1e-5
  ev = {k: v for r in rows if r["step"] == 3 for k, v in r.items() if k.startswith("eval/")}
  sets = json.loads((d / "dpo_eval.json").read_text())["sets"]
  assert sets and all(m["pairs"] == 16 for m in sets.values())
  for name in sets:
    for k in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logratio_chosen", "logratio_rejected"):
      assert np.isfinite(ev[f"eval/{name.replace(' ', '_')}/{k}"]), (name, k)
  before = (d / "metrics.jsonl").read_text()
  mtime = (d / "final/config.json").stat().st_mtime_ns
  p = _launch("experiments/dpo.py:test", runs=runs)
  assert p.returncode == 0 and "running" not in p.stderr, p.stderr[-2000:]
  assert (d / "metrics.jsonl").read_text() == before and (d / "final/config.json").stat().st_mtime_ns == mtime
  # the 2-device mesh against one device (DESIGN.md section 4)
  p = _launch("experiments/dpo.py:test", "--check-sharding", "--run-dir", str(tmp_path / "check"), runs=runs)
  assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr[-2000:]
