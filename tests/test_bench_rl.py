"""tools/bench.py ppo / reward at a toy size: the l2jax side always (timings, the prompts / pairs handed to the
peer); the TRL side only where trl is installed (the `bench` extra, not the test extras)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_ppo  # noqa: E402
import bench_reward  # noqa: E402

TOY = {"preset": "test", "shape": {"vocab_size": 512, "max_seq_len": 128}, "tokenizer": "data/stories260K/tok512.model",
       "iters": 2, "warmup": 1}
HAS_TRL = all(importlib.util.find_spec(m) is not None for m in ("trl", "torch", "transformers", "datasets"))


def _ppo_spec(work: Path) -> dict:
  return {**TOY, "work": str(work), "batch": 8, "new": 6, "prompt_len": 48,
          "prompts": ["hh-helpful:data/hh-rlhf/helpful-base-test.jsonl.gz"]}


def _reward_spec(work: Path) -> dict:
  return {**TOY, "work": str(work), "batch": 8, "seq": 48, "margin": "small",
          "pairs": ["oasst:data/oasst/en_100_tree.jsonl"]}


def _check_timings(r: dict, key: str, per: str):
  # l2jax's PPO leaves out the iterations that compiled a new prompt width (timed_iterations)
  assert len(r[per]) == len(r.get("timed_iterations", r[per])) and 1 <= len(r[per]) <= TOY["iters"]
  assert all(math.isfinite(t) and t > 0 for t in r[per])
  assert min(r[per]) <= r[key] <= max(r[per])


def test_steady_takes_the_iterations_after_warmup_and_needs_them_all():
  assert bench_ppo.steady([9.0, 1.0, 2.0, 3.0], 1, 2) == [1.0, 2.0]
  with pytest.raises(RuntimeError, match="expected 4 iterations"):
    bench_ppo.steady([9.0, 1.0], 1, 2)


@pytest.mark.slow
def test_ppo_l2jax_side(tmp_path):
  spec = _ppo_spec(tmp_path)
  r = bench_ppo.run_l2jax(spec)
  _check_timings(r, "s_per_iter", "iter_s")
  assert 0 < r["s_generate"] < r["s_per_iter"]
  assert 0 < r["new_tokens_per_iter"] <= spec["batch"] * spec["new"]
  assert r["gen_tokens_per_s"] == pytest.approx(r["new_tokens_per_iter"] / r["s_generate"], rel=0.5)
  ids = json.loads((tmp_path / "prompts.json").read_text())   # what TRL gets: one batch per iteration, in order
  assert len(ids) == spec["batch"] * (spec["warmup"] + spec["iters"] + 1)
  assert all(0 < len(p) <= spec["prompt_len"] and max(p) < 512 for p in ids)
  metrics = [json.loads(x) for x in (tmp_path / "l2jax_ppo_run" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in metrics) == spec["warmup"] + spec["iters"] + 1
  row = bench_ppo.table({"l2jax": [r]}).splitlines()[-1]
  assert row.startswith("| l2jax") and f"{r['s_per_iter']:.3f}" in row
  widths = r["prompt_widths"]   # per iteration; an iteration meeting a new width is never timed
  assert all(w in (16, 32, 48) for w in widths) and len(widths) == spec["warmup"] + spec["iters"] + 1
  assert all(widths[i - 1] in widths[:i - 1] for i in r["timed_iterations"])


def test_ppo_table_gives_medians_over_interleaved_runs_and_the_load_flag():
  run = lambda it, g, sc, tr: {"impl": "x", "s_per_iter": it, "s_generate": g, "s_score": sc, "s_train": tr,
                               "gen_tokens_per_s": 100.0}
  row = bench_ppo.table({"l2jax": [run(3.0, 1.0, 1.0, 1.0), run(5.0, 2.0, 1.5, 1.5), run(4.0, 1.2, 1.1, 1.7)]})
  assert row.splitlines()[-1] == "| x | 4.000 (3.000-5.000) | 1.200 (1.000-2.000) | 1.100 (1.000-1.500) | " \
                                 "1.500 (1.000-1.700) | 100 |"
  assert bench_ppo.quiet([0.3, 1.9], 2) and not bench_ppo.quiet([0.3, 2.0], 2)


@pytest.mark.slow
def test_reward_l2jax_side(tmp_path):
  from l2jax.losses import MARGINS
  spec = _reward_spec(tmp_path)
  r = bench_reward.run_l2jax(spec)
  _check_timings(r, "s_per_step", "step_s")
  assert r["pairs_per_s"] == pytest.approx(spec["batch"] / r["s_per_step"])
  pairs = json.loads((tmp_path / "pairs.json").read_text())
  assert len(pairs) == spec["batch"] * (spec["warmup"] + spec["iters"] + 1)
  for p in pairs:
    assert 0 < len(p["chosen_ids"]) <= spec["seq"] and 0 < len(p["rejected_ids"]) <= spec["seq"]
    assert p["chosen_ids"][0] == p["rejected_ids"][0] == 1          # BOS kept on truncated rows
    assert p["margin"] in MARGINS["small"]
  assert any(p["margin"] > 0 for p in pairs)                           # OASST pairs are rated
  assert r["rated_share"] == pytest.approx(sum(p["margin"] > 0 for p in pairs) / len(pairs))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRL, reason="TRL is in the bench extra (pip install -e '.[bench]'), not the test extras")
def test_trl_sides_on_the_same_weights(tmp_path):
  script_ppo, script_rm = str(ROOT / "tools" / "bench_ppo.py"), str(ROOT / "tools" / "bench_reward.py")
  spec = _ppo_spec(tmp_path)
  bench_ppo.child(script_ppo, "hf_models", spec)
  ours = bench_ppo.child(script_ppo, "l2jax", spec)
  theirs = bench_ppo.child(script_ppo, "trl", spec)
  assert (tmp_path / "l2jax_rm" / "head.json").is_file()
  assert theirs["new_tokens_per_iter"] == spec["batch"] * spec["new"]  # TRL: no stop token, every token generated
  for r in (ours, theirs):
    _check_timings(r, "s_per_iter", "iter_s")
  rspec = _reward_spec(tmp_path)
  rows = [bench_reward.child(script_rm, role, rspec) for role in ("l2jax", "trl")]
  for r in rows:
    _check_timings(r, "s_per_step", "step_s")
  assert bench_reward.table(rows).count("\n") == 3
