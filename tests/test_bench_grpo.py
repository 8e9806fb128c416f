"""tools/bench.py grpo: the GRPO budget mapped to TRL's GRPOConfig with hand-checked values, the refusals, the
stage's GRPO overrides and recorded config, the sequence reward, the timing split and table (no TRL needed; the
GRPOConfig check runs where TRL is installed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_gold  # noqa: E402
import bench_grpo  # noqa: E402


def _budget(*sets):
  from l2jax.experiment_refs import load_config
  return bench_grpo.grpo_settings(load_config("experiments/overoptimization.py:tiny-grpo", list(sets)))


def test_grpo_config_kwargs_of_the_tiny_grpo_budget():
  """tiny-grpo: 16 prompts x 4 samples = 64 rows per iteration, mini-batches of 4 prompts (16 rows): 4 optimiser
  steps per iteration, 60 iterations; k3 KL in the loss with beta 0.02; the sequence-mean loss."""
  b = _budget()
  assert (b["batch_prompts"], b["group_size"], b["minibatch"], b["micro_batch"], b["ppo_epochs"]) == (16, 4, 4, 0, 1)
  assert bench_grpo.steps_per_iteration(b) == 4
  kw = bench_grpo.grpo_config_kwargs(b, "/x")
  want = {"output_dir": "/x", "num_generations": 4, "per_device_train_batch_size": 16,
          "gradient_accumulation_steps": 1, "steps_per_generation": 4, "num_iterations": 1, "max_steps": 240,
          "shuffle_dataset": False, "max_completion_length": 48, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
          "use_vllm": False, "beta": 0.02, "use_bias_correction_kl": False, "epsilon": 0.2,
          "entropy_coef": 0.0, "loss_type": "grpo", "scale_rewards": "group",
          "mask_truncated_completions": False, "learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.95,
          "adam_epsilon": 1e-5, "weight_decay": 0.0, "max_grad_norm": 1.0, "lr_scheduler_type": "constant",
          "warmup_steps": 0, "bf16": False, "fp16": False, "gradient_checkpointing": False, "use_cpu": True,
          "seed": 0, "logging_steps": 4}
  assert {k: kw[k] for k in want} == want
  # rows per generation = per-device rows x steps per generation = l2jax's batch_prompts x group_size
  assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == 64


def test_grpo_config_kwargs_with_micro_batches_epochs_and_token_loss():
  b = _budget("micro_batch=2", "ppo_epochs=2", "loss_normalization=token", "iterations=3", "missing_eos_penalty=1.5")
  kw = bench_grpo.grpo_config_kwargs(b, "/x")
  # micro-batches of 2 prompts (8 rows), 2 per optimiser step; 8 micro-batches per generation, reused for 2 epochs
  assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"], kw["steps_per_generation"],
          kw["num_iterations"]) == (8, 2, 8, 2)
  assert bench_grpo.steps_per_iteration(b) == 8 and kw["max_steps"] == 24 and kw["logging_steps"] == 8
  assert kw["loss_type"] == "bnpo" and b["missing_eos_penalty"] == 1.5


def test_grpo_settings_refuse_what_trls_grpo_trainer_lacks():
  from l2jax.experiment_refs import load_config
  with pytest.raises(ValueError, match="estimator='rloo'"):
    bench_grpo.grpo_settings(load_config("experiments/overoptimization.py:tiny-rloo"))
  with pytest.raises(ValueError, match="kl_in='reward'"):
    _budget("kl_in=reward")
  with pytest.raises(ValueError, match="schedule 'cosine'"):
    _budget("optim.schedule=cosine")


def test_grpo_config_kwargs_build_trls_config():
  trl = pytest.importorskip("trl")
  a = trl.GRPOConfig(**bench_grpo.grpo_config_kwargs(_budget(), "/tmp/bench_grpo_test_out"))
  assert (a.generation_batch_size, a.steps_per_generation, a.num_generations) == (64, 4, 4)
  assert a.loss_type == "grpo" and a.scale_rewards == "group" and not a.use_vllm and not a.bf16
  assert a.beta == 0.02 and not a.use_bias_correction_kl   # DeepSeekMath's k3, as l2jax's


def test_grpo_sets_are_the_stages(tmp_path, monkeypatch):
  """bench grpo launches GRPO with exactly the overrides the over-optimisation stage launches it with."""
  from l2jax.experiment_refs import load_config
  from l2jax.stages import overoptimization as stage
  ov = load_config("experiments/overoptimization.py:test", ["grpo_sets=[\"eval_every=2\"]"])
  seen = []
  monkeypatch.setattr(stage, "_launch", lambda spec, sets, d: seen.append((spec, sets, d)) or False)
  assert stage.rl(ov, tmp_path, tmp_path / "base", {"64 pairs": tmp_path / "proxy-64" / "final"}, None, "grpo") is None
  assert seen == [(f"{stage.EXPERIMENT}:{ov.grpo}", bench_gold.ppo_sets(ov, tmp_path, 64, "grpo"), tmp_path / "grpo-64")]
  assert bench_gold.ppo_sets(ov, tmp_path, 64, "grpo")[-1] == "eval_every=2"


def test_load_budget_takes_the_stages_recorded_grpo_config(tmp_path):
  from l2jax import config as c
  from l2jax.experiment_refs import load_config
  ov = load_config("experiments/overoptimization.py:test")
  (tmp_path / "config.json").write_text(c.to_json(ov))
  for f in ("base/config.json", "proxy-64/final/head.json", "prompts/train.jsonl", "prompts/report.jsonl"):
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f).write_text("{}")
  ran = load_config(f"experiments/overoptimization.py:{ov.grpo}", ["kl_beta=0.05"])
  (tmp_path / "grpo-64").mkdir()
  (tmp_path / "grpo-64" / "config.json").write_text(c.to_json(ran))
  (tmp_path / "ppo-64").mkdir()    # PPO's recorded config is not GRPO's
  (tmp_path / "ppo-64" / "config.json").write_text(json.dumps({"kl_beta": 0.5}))
  _, proxy, spec, sets, p = bench_gold.load_budget(tmp_path, None, 3, None, "grpo")
  assert proxy == 64 and spec == f"experiments/overoptimization.py:{ov.grpo}"
  assert sets == bench_gold.ppo_sets(ov, tmp_path.resolve(), 64, "grpo") + ["iterations=3", "kl_beta=0.05"]
  assert (p.estimator, p.iterations, p.kl_beta) == ("grpo", 3, 0.05)


def test_sequence_rewards_subtract_the_missing_eos_penalty():
  assert bench_grpo.sequence_rewards([1.0, 2.0, 3.0], [[5, 2], [5, 6], [2]], 2, 0.5) == [1.0, 1.5, 3.0]
  assert bench_grpo.sequence_rewards([1.0, 2.0], [[5, 6], []], 2, 0.0) == [1.0, 2.0]
  with pytest.raises(ValueError):
    bench_grpo.sequence_rewards([1.0], [[2], [2]], 2, 0.0)


def test_phase_split_timing_and_table_with_hand_numbers():
  ph = bench_grpo.phase_split([10.0, 3.0, 4.0], [6.0, 1.0, 1.5], [7.0, 1.5, 2.5])
  assert ph == {"generate": [6.0, 1.0, 1.5], "score": [1.0, 0.5, 1.0], "train": [3.0, 1.5, 1.5]}
  assert bench_grpo.steady_median([10.0, 3.0, 4.0]) == 3.5 and bench_grpo.steady_median([7.0]) == 7.0
  with pytest.raises(ValueError, match="3 iterations"):
    bench_grpo.phase_split([1.0, 2.0, 3.0], [1.0], [1.0])
  run = lambda it, g: {"iter_s": it, "phase_s": {"generate": g, "score": 0.1, "train": 0.2}}
  t = bench_grpo.timing({"l2jax": [run([9.0, 0.5, 0.7], 0.2), run([8.0, 0.4, 0.6], 0.1)],
                         "trl": [run([5.0, 2.0, 3.0], 1.0)]})
  assert t["l2jax"]["s_per_iter"] == {"median": 0.55, "min": 0.5, "max": 0.6, "n": 2}
  assert t["l2jax"]["first_iter_s"]["median"] == 8.5 and t["trl"]["train_s"]["median"] == 10.0
  text = bench_grpo.timing_table(t, {"l2jax": "l2jax", "trl": "TRL x"})
  assert "| l2jax | 0.550 (0.500-0.600) | 0.150 (0.100-0.200) | 0.100 (0.100-0.100) |" in text
  assert "| TRL x | 2.500 | 1.000 | 0.100 | 0.200 | 5.00 | 10.0 |" in text


def test_contended_reads_the_loads_around_the_timed_runs():
  assert not bench_grpo.contended({"start": "9.0 1 1", "prepared": "1.5 1 1", "l2jax#1": "1.9 1 1",
                                   "trl#1": "2.0 1 1", "measured": "7.0 1 1"}, 2)
  assert bench_grpo.contended({"prepared": "1.5 1 1", "trl#2": "2.1 1 1"}, 2)


def test_trl_python_check_and_the_child_interpreter(tmp_path):
  assert bench_grpo.trl_version(str(tmp_path / "no-python")) is None
  before = sys.executable
  with bench_grpo._python("/some/python"):
    assert sys.executable == "/some/python"
  assert sys.executable == before
