"""tools/bench.py gold: the matched-KL interpolation, gold per minute and the table with hand numbers; the PPO
overrides the same as the over-optimisation stage's; the proxy reward model's HF export (LlamaForSequenceClassification
with a biased score) scoring as l2jax.reward does (torch and transformers only; TRL's own run is the benchmark's)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_gold  # noqa: E402

TOK = ROOT / "data" / "stories260K" / "tok512.model"


def test_at_kl_interpolates_where_the_trajectory_first_reaches_each_kl():
  kl, gold = [0.0, 2.0, 4.0], [0.0, 1.0, 3.0]
  np.testing.assert_allclose(bench_gold.at_kl(kl, gold, [0.0, 1.0, 3.0, 4.0]), [0.0, 0.5, 2.0, 3.0])
  # KL falls back after 4 (noise): 5 is first reached between the snapshots at KL 2 and 6
  np.testing.assert_allclose(bench_gold.at_kl([0, 4, 2, 6], [0, 2, 9, 4], [3.0, 5.0]), [1.5, 9 + 0.75 * (4 - 9)])
  assert bench_gold.at_kl([0.5, 1.0], [7.0, 8.0], [0.2])[0] == 7.0     # at or below the first KL: its value
  assert math.isnan(bench_gold.at_kl(kl, gold, [4.5])[0])              # never reached
  with pytest.raises(ValueError, match="equal-length"):
    bench_gold.at_kl([0, 1], [0, 1, 2], [0.5])


def test_matched_kls_spread_over_the_range_both_sides_reach():
  np.testing.assert_allclose(bench_gold.matched_kls([0.0, 1.0, 4.0], [0.5, 2.0, 3.0], 2), [1.75, 3.0])
  np.testing.assert_allclose(bench_gold.matched_kls([0.0, 8.0], [0.0, 2.0, 1.0], 4), [0.5, 1.0, 1.5, 2.0])
  assert bench_gold.matched_kls([0.0, 1.0], [2.0, 3.0], 3).size == 0     # no common range
  with pytest.raises(ValueError, match="points=0"):
    bench_gold.matched_kls([0, 1], [0, 1], 0)


def test_gold_per_minute_at_the_peak_and_at_the_end():
  g = bench_gold.gold_per_minute([0.1, 0.5, 0.3], [0.0, 2.0, 4.0])
  assert g["peak_gold"] == 0.5 and g["peak_index"] == 1 and g["peak_minutes"] == 2.0
  assert g["per_min"] == pytest.approx(0.2) and g["final_per_min"] == pytest.approx(0.05)
  g = bench_gold.gold_per_minute([0.4, 0.2], [0.0, 1.0])                # no gain: the peak is the start
  assert g["peak_index"] == 0 and math.isnan(g["per_min"]) and g["final_per_min"] == pytest.approx(-0.2)


def _sides():
  a = {"step": [0, 4, 8], "kl": [0.0, 2.0, 4.0], "gold": [0.1, 0.5, 0.9], "gold_se": [0.03, 0.04, 0.04],
       "proxy": [-1.0, 0.5, 1.0], "minutes": [0.0, 0.5, 1.0]}
  b = {"step": [0, 4, 8], "kl": [0.0, 1.0, 2.0], "gold": [0.1, 0.2, 0.4], "gold_se": [0.03, 0.0, 0.03],
       "proxy": [-1.0, 0.0, 0.4], "minutes": [0.0, 2.0, 4.0]}
  return {"l2jax": a, "trl": b}


def test_compare_and_table_with_hand_numbers():
  sides = _sides()
  cmp = bench_gold.compare(sides, 2)
  assert cmp["kl"] == [1.0, 2.0]
  r1, r2 = cmp["rows"]
  # l2jax at KL 1: half way to its KL-2 snapshot: gold 0.3, se 0.035, 0.25 min; TRL's snapshot at KL 1 itself
  assert (r1["l2jax_gold"], r1["trl_gold"], r1["l2jax_min"], r1["trl_min"]) == pytest.approx((0.3, 0.2, 0.25, 2.0))
  assert r1["diff"] == pytest.approx(0.1) and r1["diff_se"] == pytest.approx(0.035)
  assert r1["time_ratio"] == pytest.approx(0.125)
  assert (r2["l2jax_gold"], r2["trl_gold"], r2["diff"]) == pytest.approx((0.5, 0.4, 0.1))
  assert r2["diff_se"] == pytest.approx(0.05) and r2["time_ratio"] == pytest.approx(0.125)
  assert cmp["gold_at_least"] and cmp["gold_within_2se"] and cmp["half_time"]
  summary = {k: {**bench_gold.gold_per_minute(s["gold"], s["minutes"]), "s_per_iter": 0.1 if k == "l2jax" else 0.5,
                 "first_iter_s": 5.0, "train_s": 60 * s["minutes"][-1]} for k, s in sides.items()}
  text = bench_gold.table(sides, cmp, summary)
  assert "| l2jax | 4 | 0.50 | 2.00 | 0.500 | 0.040 | 0.500 |" in text
  assert "| 1.00 | 0.300 | 0.200 | +0.100 | 0.035 | 0.25 | 2.00 | 0.12 |" in text
  assert "| l2jax | 0.900 | 4.00 | 1.00 | 0.800 | 0.800 | 0.100 | 5.00 | 1.00 |" in text
  assert "| trl | 0.400 | 2.00 | 4.00 | 0.075 | 0.075 | 0.500 | 5.00 | 4.00 |" in text
  worse = {"l2jax": {**sides["l2jax"], "gold": [0.1, 0.15, 0.9]}, "trl": sides["trl"]}
  cmp = bench_gold.compare(worse, 2)                       # at KL 1: 0.125 < 0.2, by more than 2 se (0.035)
  assert not cmp["gold_at_least"] and not cmp["gold_within_2se"]
  assert "no KL range" in bench_gold.table(worse, bench_gold.compare({"l2jax": sides["l2jax"], "trl": {
      **sides["trl"], "kl": [5.0, 6.0, 7.0]}}, 2), summary)


def test_ppo_sets_are_the_stages(tmp_path, monkeypatch):
  """bench gold launches PPO with exactly the overrides the over-optimisation stage launches it with."""
  from l2jax.experiment_refs import load_config
  from l2jax.stages import overoptimization as stage
  ov = load_config("experiments/overoptimization.py:test", ["ppo_sets=[\"eval_every=2\"]"])
  seen = []
  monkeypatch.setattr(stage, "_launch", lambda spec, sets, d: seen.append((spec, sets, d)) or False)
  assert stage.rl(ov, tmp_path, tmp_path / "base", {"64 pairs": tmp_path / "proxy-64" / "final"}, None, "ppo") is None
  assert seen == [(f"{stage.EXPERIMENT}:{ov.ppo}", bench_gold.ppo_sets(ov, tmp_path, 64), tmp_path / "ppo-64")]
  assert bench_gold.ppo_sets(ov, tmp_path, 64)[-1] == "eval_every=2"


def test_trl_settings_map_the_budget_and_refuse_what_trl_lacks():
  from l2jax.experiment_refs import load_config
  p = load_config("experiments/overoptimization.py:tiny-ppo")
  b = bench_gold.trl_settings(p)
  assert (b["iterations"], b["batch_prompts"], b["minibatch"], b["max_new_tokens"], b["eval_every"]) == \
      (60, 64, 16, 48, 4)
  assert b["kl_beta"] == 0.02 and b["optim"]["lr"] == 1e-4 and b["value_optim"]["lr"] == 1e-3
  with pytest.raises(ValueError, match="value_init='policy'"):
    bench_gold.trl_settings(load_config("experiments/overoptimization.py:tiny-ppo", ["value_init=policy"]))
  with pytest.raises(ValueError, match="estimator='grpo'"):
    bench_gold.trl_settings(load_config("experiments/overoptimization.py:tiny-grpo"))
  with pytest.raises(ValueError, match="schedule 'cosine'"):
    bench_gold.trl_settings(load_config("experiments/overoptimization.py:tiny-ppo", ["optim.schedule=cosine"]))


def test_proxy_export_scores_as_l2jax(tmp_path):
  """The HF LlamaForSequenceClassification (score with the l2jax head's bias) scores token rows as
  l2jax.reward's score_tokens, within the benchmark's 1e-4, also through TRL-style left padding."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import jax
  from flax import nnx

  from l2jax import checkpoint as ck
  from l2jax import reward
  from l2jax.model import heads, llama, presets
  cfg = presets.get("test", vocab_size=512, max_seq_len=64)
  model = heads.ScalarModel(cfg, rngs=nnx.Rngs(params=3))
  model.head.b.value = jax.numpy.float32(0.37)   # a bias HF's score would drop
  params = jax.device_get(llama.split(model)[1])
  rm_dir = tmp_path / "rm"
  ck.save_model_dir(rm_dir, cfg, params, TOK, extra_files={"head.json": json.dumps({"kind": "reward_model"})})
  head = bench_gold.export_rm_backbone(rm_dir, tmp_path / "hf")
  assert head["b"] == pytest.approx(0.37) and len(head["w"]) == cfg.dim
  hf = bench_gold.hf_reward_model(tmp_path / "hf")
  assert hf.score.bias is not None and hf.score.bias.item() == pytest.approx(0.37)
  rng = np.random.default_rng(0)
  rows = [[1] + rng.integers(3, 512, n).tolist() for n in (5, 17, 30, 9)]
  rm = reward.load(rm_dir, batch_size=4)
  tokens = np.zeros((4, 32), np.int32)
  mask = np.zeros((4, 32), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, 1
  want = np.asarray(rm.score_tokens(tokens, mask))
  got = bench_gold.hf_scores(hf, rows, 0)
  assert np.max(np.abs(got - want)) < bench_gold.RM_TOLERANCE, (got, want)
  assert np.std(want) > 1e-3                    # the rows are told apart: not a constant head
  assert isinstance(hf.score, torch.nn.Linear)


def test_recorded_sets_restore_what_the_stages_run_had():
  now = {"stage": "ppo", "name": "a", "policy": "/x", "iterations": 60, "optim": {"lr": 1e-4, "clip": 1.0},
         "prompts": {"sources": ("jsonl:/x",), "max_prompt_tokens": 64}, "snapshots": True, "top_p": 1.0}
  rec = {"stage": "ppo", "name": "b", "policy": "/y", "iterations": 30, "optim": {"lr": 5e-4, "clip": 1.0},
         "prompts": {"sources": ["jsonl:/y"], "max_prompt_tokens": 32}, "snapshots": False, "top_p": 1.0}
  assert bench_gold.recorded_sets(now, rec) == ["iterations=30", "optim.lr=0.0005", "prompts.max_prompt_tokens=32"]
  assert bench_gold.recorded_sets(now, rec, ("iterations",)) == ["optim.lr=0.0005", "prompts.max_prompt_tokens=32"]
  assert bench_gold.recorded_sets(now, {**now, "prompts": {"sources": ["jsonl:/x"], "max_prompt_tokens": 64}}) == []


def test_load_budget_takes_the_stages_recorded_ppo_config_under_the_given_options(tmp_path):
  from l2jax import config as c
  from l2jax.experiment_refs import load_config
  ov = load_config("experiments/overoptimization.py:test")
  (tmp_path / "config.json").write_text(c.to_json(ov))
  for f in ("base/config.json", "proxy-64/final/head.json", "prompts/train.jsonl", "prompts/report.jsonl"):
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f).write_text("{}")
  ran = load_config(f"experiments/overoptimization.py:{ov.ppo}", ["optim.lr=0.0005", "seed=3", "iterations=5"])
  (tmp_path / "ppo-64" / "config.json").parent.mkdir()
  (tmp_path / "ppo-64" / "config.json").write_text(c.to_json(ran))
  _, proxy, spec, sets, p = bench_gold.load_budget(tmp_path, None, None, None)   # the largest proxy by default
  stage = bench_gold.ppo_sets(ov, tmp_path.resolve(), 64)
  assert proxy == 64 and spec == f"experiments/overoptimization.py:{ov.ppo}"
  assert sets == stage + ["iterations=5", "optim.lr=0.0005", "seed=3"]
  assert (p.iterations, p.optim.lr, p.seed, p.policy) == (5, 5e-4, 3, str(tmp_path.resolve() / "base"))
  _, _, _, sets, p = bench_gold.load_budget(tmp_path, 64, 2, 1)           # --iters and --seed win
  assert sets == stage + ["iterations=2", "seed=1", "optim.lr=0.0005"] and (p.iterations, p.seed) == (2, 1)
  with pytest.raises(ValueError, match="has proxies"):
    bench_gold.load_budget(tmp_path, 32, None)


def test_trl_optimizer_clips_each_model_and_masks_weight_decay_as_l2jax():
  torch = pytest.importorskip("torch")
  assert bench_gold.decays("model.layers.0.self_attn.q_proj.weight", 2)
  assert bench_gold.decays("model.embed_tokens.weight", 2)
  assert not bench_gold.decays("model.layers.0.input_layernorm.weight", 1)
  assert not bench_gold.decays("model.norm.weight", 2) and not bench_gold.decays("score.weight", 2)
  policy = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 4, bias=False), "norm": torch.nn.LayerNorm(4)})
  value = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 4, bias=False), "score": torch.nn.Linear(4, 1)})
  o = {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-5, "weight_decay": 0.1, "clip": 1.0}
  opt, sched = bench_gold._trl_optimizer(policy, value, {"optim": o, "value_optim": {**o, "lr": 1e-2}}, 0.1)
  by = {(g["model"], g["weight_decay"] > 0): g for g in opt.param_groups}
  assert {k: len(g["params"]) for k, g in by.items()} == \
      {("policy", True): 1, ("policy", False): 2, ("value", True): 1, ("value", False): 2}
  assert by["value", True]["lr"] == 1e-2 and by["value", True]["eps"] == pytest.approx(1e-6)
  assert by["value", True]["clip"] == pytest.approx(0.1) and by["policy", False]["weight_decay"] == 0.0
  for p in [*policy.parameters(), *value.parameters()]:
    p.grad = torch.full_like(p, 3.0)
  opt.step()
  norm = lambda m: math.sqrt(sum(float((p.grad ** 2).sum()) for p in m.parameters()))
  assert norm(policy) == pytest.approx(1.0, rel=1e-4) and norm(value) == pytest.approx(0.1, rel=1e-4)
  assert sched.get_last_lr() == [1e-3, 1e-3, 1e-2, 1e-2]
