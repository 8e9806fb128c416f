"""Reward models: the margin ranking loss, pair scoring with padding, init from a checkpoint, learning a synthetic
preference, accuracy by rating, the schedule, both experiments through the launcher, and the l2jax.reward API."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.eval import reward_accuracy as ra
from l2jax.launch import load_experiment
from l2jax.losses import MARGINS, rating_margin, ranking_loss_sum
from l2jax.model import heads, presets
from l2jax.stages import reward as stage

ROOT = Path(__file__).resolve().parents[1]
TOK512 = ROOT / "data/stories260K/tok512.model"


def _nll(x):  # -log sigmoid(x), by hand
  return math.log1p(math.exp(-x))


def test_ranking_loss_equals_hand_values_under_each_margin_table():
  rc = jnp.array([2.0, 0.5, -1.0, 0.3, 1.0])
  rr = jnp.array([1.0, 0.5, 0.0, 0.3, 3.0])
  rating = jnp.array([0, 1, 2, 3, -1])   # significantly better, better, slightly better, negligibly, unrated
  diff = [1.0, 0.0, -1.0, 0.0, -2.0]
  tables = {"none": [0, 0, 0, 0, 0], "small": [1, 2 / 3, 1 / 3, 0, 0], "large": [3, 2, 1, 0, 0]}
  assert MARGINS["small"] == (1.0, 2 / 3, 1 / 3, 0.0) and MARGINS["large"] == (3.0, 2.0, 1.0, 0.0)
  for name, m in tables.items():
    np.testing.assert_allclose(rating_margin(rating, name), m, rtol=1e-6)
    total, n = ranking_loss_sum(rc, rr, rating_margin(rating, name))
    want = sum(_nll(d - mm) for d, mm in zip(diff, m))
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert float(n) == 5.0
  # small margin, first pair: -log sigmoid(2 - 1 - 1) = log 2
  np.testing.assert_allclose(float(ranking_loss_sum(rc[:1], rr[:1], jnp.array([1.0]))[0]), math.log(2), rtol=1e-6)
  # no margin at all, and padding pairs (weight 0) count for nothing
  total, n = ranking_loss_sum(rc, rr, None, jnp.array([1.0, 1.0, 1.0, 0.0, 0.0]))
  np.testing.assert_allclose(float(total), _nll(1.0) + _nll(0.0) + _nll(-1.0), rtol=1e-6)
  assert float(n) == 3.0
  # stable for large gaps
  big, _ = ranking_loss_sum(jnp.array([100.0, -100.0]), jnp.array([0.0, 0.0]))
  np.testing.assert_allclose(float(big), 100.0, rtol=1e-5)


def test_pair_scores_read_the_last_real_token_of_each_row():
  cfg = presets.get("test")
  model = heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  score = jax.jit(stage.pair_scores_fn(graphdef))
  apply = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m))
  rows = [[1, 5, 6, 7, 2], [1, 5, 6, 9, 9, 9, 2], [1, 8, 2], [1, 5, 6, 7, 2]]  # pair 0, pair 1
  from l2jax.data.preferences import rows_to_arrays
  out = {}
  for T in (8, 16):
    toks, mask = rows_to_arrays(rows, T, pad_id=0)
    toks[mask == 0] = 77  # padding content must not matter
    out[T] = np.asarray(score(params, jnp.asarray(toks.reshape(2, 2, T)), jnp.asarray(mask.reshape(2, 2, T))))
  np.testing.assert_allclose(out[8], out[16], rtol=1e-5, atol=1e-6)
  for i, r in enumerate(rows):  # each score is the model on the unpadded row
    want = float(apply(params, jnp.asarray([r], jnp.int32), jnp.ones((1, len(r)), jnp.int32))[0])
    np.testing.assert_allclose(out[8].reshape(-1)[i], want, rtol=1e-5)
  np.testing.assert_allclose(out[8][0, 0], out[8][1, 1], rtol=1e-6)  # same row, same score wherever it sits


def test_scalar_setup_backbone_from_checkpoint_and_fresh_head(tmp_path):
  from l2jax.checkpoint import save_model_dir
  from l2jax.model import llama
  cfg = presets.get("test", vocab_size=512)
  _, lm_params = llama.split(llama.init(cfg, seed=7))
  save_model_dir(tmp_path / "sft", cfg, lm_params, TOK512)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = stage.scalar_setup(presets.get("tiny"), str(tmp_path / "sft"), mesh, "unused.model", seed=0)
  assert setup.model_cfg.dim == 32 and str(setup.tokenizer.path).endswith("tokenizer.model")
  params = jax.device_get(setup.init_params())
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(heads.backbone_params(lm_params))):
    np.testing.assert_array_equal(a, b)
  assert "lm_head" not in params["backbone"]
  assert params["head"]["w"].shape == (32,) and float(params["head"]["b"]) == 0.0
  assert jax.tree.structure(params) == jax.tree.structure(setup.abstract_params)
  random = jax.device_get(stage.scalar_setup(cfg, "", mesh, str(TOK512), seed=0).init_params())
  assert not np.allclose(random["backbone"]["embed"], lm_params["embed"])


def _synthetic_pairs(rng, n, T=16, good=5):
  """Pairs whose chosen response contains token `good` somewhere and whose rejected one does not."""
  tokens = np.zeros((n, 2, T), np.int32)
  mask = np.zeros((n, 2, T), np.int32)
  for i in range(n):
    prompt = list(rng.integers(10, 100, rng.integers(2, 5)))
    for j in range(2):
      resp = list(rng.integers(10, 100, rng.integers(3, 8)))
      if j == 0:
        resp[rng.integers(len(resp))] = good
      row = [1] + prompt + resp + [2]
      tokens[i, j, :len(row)], mask[i, j, :len(row)] = row, 1
  return {"tokens": tokens, "mask": mask, "rating": rng.integers(-1, 4, n).astype(np.int32),
          "valid": np.ones((n,), np.float32)}


def test_tiny_reward_model_learns_a_synthetic_preference():
  cfg = presets.get("test")
  graphdef, params = nnx.split(heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0)))
  params = nnx.to_pure_dict(params)
  steps = 120
  optimizer = train.make_optimizer(c.AdamW(lr=3e-3, warmup_steps=10, weight_decay=0.0), steps)
  step = jax.jit(train.make_train_step(stage.pair_loss_fn(graphdef, "small"), optimizer))
  state = train.init_state(params, optimizer)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    state, m = step(state, _synthetic_pairs(rng, 32))
  held = _synthetic_pairs(np.random.default_rng(123), 256)
  s = np.asarray(jax.jit(stage.pair_scores_fn(graphdef))(state["params"], held["tokens"], held["mask"]))
  acc = ra.accuracy_by_rating(s[:, 0], s[:, 1], held["rating"])
  assert acc["avg"] >= 0.95, acc


def test_accuracy_by_rating_on_known_scores(tmp_path):
  chosen = np.array([1.0, 2.0, 0.0, 5.0, 1.0, 1.0, 3.0, 0.0])
  rejected = np.array([0.0, 3.0, 1.0, 4.0, 1.0, 0.0, 2.0, 0.0])
  rating = np.array([0, 0, 1, 1, 2, 3, -1, -1])
  acc = ra.accuracy_by_rating(chosen, rejected, rating)
  assert acc["significantly_better"] == 0.5 and acc["better"] == 0.5
  assert acc["slightly_better"] == 0.5  # a tie counts one half
  assert acc["negligibly_better_or_unsure"] == 1.0
  assert acc["avg"] == pytest.approx((1 + 0 + 0 + 1 + 0.5 + 1 + 1 + 0.5) / 8)
  assert acc["counts"] == {"significantly_better": 2, "better": 2, "slightly_better": 1,
                           "negligibly_better_or_unsure": 1, "unrated": 2, "all": 8}
  none_rated = ra.accuracy_by_rating([1.0], [0.0], [-1])
  assert none_rated["better"] is None and none_rated["avg"] == 1.0
  results = ra.evaluate({"A": (chosen, rejected, rating), "B": (np.ones(3), np.zeros(3), -np.ones(3))})
  d = results["A"]["scores"]
  assert sum(d["chosen_counts"]) == 8 and sum(d["rejected_counts"]) == 8
  assert d["chosen"]["mean"] == pytest.approx(chosen.mean()) and d["gap"]["mean"] == pytest.approx(0.25)
  table = ra.table8(results).splitlines()
  assert table[0].startswith("| Test set | Significantly Better | Better | Slightly Better | Negligibly Better")
  assert table[2] == "| A | 50.0 | 50.0 | 50.0 | 100.0 | 62.5 | 8 |" and table[3] == "| B | - | - | - | - | 100.0 | 3 |"
  paths = ra.write_report(tmp_path, results, {"title": "t"})
  saved = json.loads(paths["json"].read_text())
  assert saved["sets"]["A"]["accuracy"]["avg"] == acc["avg"] and "Avg" in saved["table"]
  if "png" in paths:
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_and_paper_settings():
  cfg = c.RewardModel(global_batch=512)
  r = stage.resolve_schedule(cfg, 10_000)
  assert r.steps == 20 and r.optim.warmup_steps == 5          # 3% of 20 < 5: the minimum
  r = stage.resolve_schedule(cfg, 1_000_000)
  assert r.steps == 1954 and r.optim.warmup_steps == 59       # ceil(0.03 * 1954)
  fixed = stage.resolve_schedule(c.RewardModel(global_batch=512, steps=7, warmup_fraction=0.0), 1)
  assert fixed.steps == 7 and fixed.optim.warmup_steps == 5   # optim.warmup_steps kept
  for exp in ("rm_helpful", "rm_safety"):
    for size, lr in (("7b", 1e-5), ("13b", 1e-5), ("70b", 5e-6)):
      cfg = load_experiment(str(ROOT / f"experiments/{exp}.py:{size}"))[0]
      o = cfg.optim
      assert (o.lr, o.decay_to, o.schedule, cfg.global_batch, cfg.epochs, cfg.warmup_fraction, cfg.min_warmup,
              cfg.margin, cfg.steps) == (lr, 0.1, "cosine", 512, 1.0, 0.03, 5, "small", 0)
      assert cfg.init == f"runs/sft-{size}/final" and cfg.seq_len == 4096
      assert c.from_dict(type(cfg), c.to_dict(cfg)) == cfg
  assert load_experiment(str(ROOT / "experiments/rm_helpful.py:7b"))[0].data.mix_fraction == 0.5
  assert load_experiment(str(ROOT / "experiments/rm_safety.py:7b"))[0].data.mix_fraction == 0.1
  with pytest.raises(ValueError, match="margin"):
    c.RewardModel(margin="huge")
  with pytest.raises(c.ConfigError, match="FORMAT:PATH"):
    c.apply_overrides(c.RewardModel(), ["data.sources=csv:x.csv"])


SMALL = ["--set", "model.vocab_size=512", "--set", "model.dim=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64",
         "--set", f"data.tokenizer={TOK512}", "--set", "seq_len=48", "--set", "global_batch=8",
         "--set", "steps=4", "--set", "data.eval_pairs=16", "--set", "eval_batch=8", "--set", "log_every=1",
         "--set", "init="]   # the tiny RMs start from experiments/sft.py:tiny; these small ones from random


def launch(exp, run_dir, *extra):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "-m", "l2jax.launch", f"experiments/{exp}.py:tiny", "--run-dir",
                         str(run_dir), *SMALL, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.parametrize("exp,objective", [("rm_helpful", "helpfulness"), ("rm_safety", "safety")])
def test_tiny_experiment_through_the_launcher_and_the_api(tmp_path, exp, objective):
  import l2jax.reward
  p = launch(exp, tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  final = tmp_path / "final"
  head = json.loads((final / "head.json").read_text())
  assert head["objective"] == objective and head["margin"] == "small" and head["seq_len"] == 48
  assert (final / "tokenizer.model").is_file() and json.loads((final / "config.json").read_text())["dim"] == 32
  report = json.loads((tmp_path / "reward_eval.json").read_text())
  assert report["step"] == 4 and "helpful-base-test held-out" in report["sets"]
  assert report["sets"]["en_100_tree held-out"]["accuracy"]["counts"]["all"] == 16
  assert (tmp_path / "reward_eval.md").is_file() and (tmp_path / "reward_eval.png").is_file()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert any("eval/helpful-base-test_held-out/accuracy" in r for r in rows)
  summary = json.loads((tmp_path / "data_summary.json").read_text())
  assert summary["steps"] == 4 and summary["train_pairs"] > 1000 and summary["part"] == "trainer"

  rm = l2jax.reward.load(final, batch_size=4)
  dialogs = ["How do I bake bread?", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "Tell me a joke"}], "Name a colour."]
  responses = ["Mix flour, water, yeast and salt, then bake.", "No.", "Blue."]
  s = rm.score(dialogs, responses)
  assert s.shape == (3,) and s.dtype == np.float32 and np.all(np.isfinite(s))
  one = np.concatenate([rm.score([d], [r]) for d, r in zip(dialogs, responses)])
  np.testing.assert_allclose(s, one, rtol=1e-5, atol=1e-5)   # batching and padding do not change scores
  with pytest.raises(ValueError, match="2 dialogs but 1 responses"):
    rm.score(dialogs[:2], responses[:1])
  with pytest.raises(FileNotFoundError, match="not a reward-model directory"):
    l2jax.reward.load(_lm_dir(tmp_path))  # a language-model directory is refused with a clear message


def _lm_dir(tmp_path):
  from l2jax.checkpoint import save_model_dir
  from l2jax.model import llama
  cfg = presets.get("test", vocab_size=512)
  return save_model_dir(tmp_path / "lm", cfg, llama.split(llama.init(cfg))[1], TOK512)


def test_bad_preference_file_through_the_launcher_names_file_and_line(tmp_path):
  bad = tmp_path / "prefs.jsonl"
  bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "q"}\n')
  p = launch("rm_helpful", tmp_path / "run", "--set", f"data.sources=jsonl:{bad}", "--set", "data.mix=",
             "--set", "data.mix_fraction=0")
  assert p.returncode == 1 and f"{bad}:2: missing field 'chosen'" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_check_sharding_on_eight_devices(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rm_safety.py:tiny", "--run-dir",
                      str(tmp_path), "--check-sharding", *SMALL, "--set", "micro_batch=4", "--set", "mesh.tensor=2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr[-2000:]
