"""The over-optimisation benchmark (Gao, Schulman & Hilton 2022) on stories260K: the task's pieces against
independent computations, the `test` experiment end to end, and PPO raising the held-out *gold* reward of a gold
function this test supplies (not only the proxy)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2jax.eval import gold_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  from l2jax.convert.llama2c import llama2c_to_l2jax
  d = tmp_path_factory.mktemp("base") / "base"
  llama2c_to_l2jax(ROOT / "data/stories260K/stories260K.bin", ROOT / "data/stories260K/tok512.model", d)
  (d / "chat_format").write_text("text\n")
  return d


@pytest.fixture(scope="module")
def sampler(base):
  from l2jax.sample import load_sampler
  return load_sampler(str(base))


def test_openings_are_distinct_whole_words_and_seeded(sampler):
  a = gold_task.openings(sampler, 20, 12, seed=3, batch=32)
  assert len(set(a)) == 20 and a == gold_task.openings(sampler, 20, 12, seed=3, batch=32)
  assert a != gold_task.openings(sampler, 20, 12, seed=4, batch=32)
  assert all(len(t.split()) >= 3 and t == " ".join(t.split()) for t in a)


def test_teacher_forced_logprobs_equal_the_samplers(sampler, base):
  texts = ["Once upon a time", "One day, a little girl"]
  conts = gold_task.continuations(sampler, texts, 3, 12, 1.0, seed=0)
  assert conts["tokens"].shape[0] == 6 and conts["prompt_ids"][3] == conts["prompt_ids"][5]
  assert len({tuple(conts["tokens"][r]) for r in range(3)}) > 1   # the samples of one prompt differ
  # the sampler's log-probs of the tokens it drew, at temperature 1, against one teacher-forced forward pass
  out = sampler.generate(conts["prompt_ids"], 12, temperature=1.0,
                         seed=[(0 * gold_task.SEED_STRIDE + i) & 0xFFFFFFFF for i in range(6)])
  np.testing.assert_array_equal(out.tokens, conts["tokens"])
  want = np.array([out.model_logprobs[r, :out.lengths[r]].sum() for r in range(6)])
  got = gold_task.LM.load(base).response_logprobs(conts, sampler.tokenizer.eos_id, sampler.tokenizer.pad_id)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_label_pairs_follow_bradley_terry_and_keep_gold():
  texts = [f"p{i}" for i in range(2000)]
  conts = {"texts": ["good " * (i % 3) for i in range(4000)], "finished": np.zeros(4000, bool)}
  gold = lambda ts: np.array([t.count("good") for t in ts], float)
  recs, st = gold_task.label_pairs(texts, conts, gold, 1.0, np.random.default_rng(0))
  # pair i = samples 2i (gold (2i) % 3) and 2i + 1; a gap of 1 is labelled right with p = sigmoid(1) = 0.731
  gaps = np.array([abs(r["gold_chosen"] - r["gold_rejected"]) for r in recs])
  right = np.array([r["gold_chosen"] > r["gold_rejected"] for r in recs])
  one = gaps == 1
  assert abs(right[one].mean() - 1 / (1 + math.exp(-1))) < 3 * math.sqrt(0.2 / one.sum())
  assert all(r["chosen_finished"] is False and r["prompt"] == texts[i] for i, r in enumerate(recs))
  for r in recs[:50]:
    p = 1 / (1 + math.exp(-(r["gold_chosen"] - r["gold_rejected"])))
    assert abs(r["p_chosen"] - p) < 1e-9
  assert st["pairs"] == 2000 and abs(st["label_gold_agreement"] - st["expected_agreement"]) < 0.05


def test_measure_of_the_base_against_itself_has_zero_kl(sampler, base):
  lm = gold_task.LM.load(base)
  m = gold_task.measure(sampler, lm, lm, {}, lambda ts: np.array([len(t) for t in ts], float),
                        ["Once upon a time", "Tom had a"], samples_per_prompt=4, max_new_tokens=8, seed=1)
  assert m["kl"] == 0.0 and m["gold"] > 0 and m["response_len"] <= 8


def _launch(args, env_extra=None, timeout=900):
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "l2jax.launch", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_test_experiment_end_to_end_and_rerun_redoes_nothing(tmp_path):
  d = tmp_path / "oo"
  p = _launch(["experiments/overoptimization.py:test", "--run-dir", str(d)])
  assert p.returncode == 0, p.stderr[-3000:]
  for f in ("curves.json", "table.md", "overoptimization.png", "report.md", "proxies.json", "bon.json",
            "pairs/labels.json", "ppo-16/gold.json", "rs-64/gold.json"):
    assert (d / f).is_file(), f
  curves = json.loads((d / "curves.json").read_text())
  assert {c["method"] for c in curves} == {"best-of-n", "ppo", "rejection"}
  assert len(curves) == 6 and all(np.isfinite(c["gold"]).all() and np.isfinite(c["kl"]).all() for c in curves)
  bon = next(c for c in curves if c["method"] == "best-of-n")
  assert bon["n"] == [1, 2, 4, 8] and bon["kl"][-1] == pytest.approx(math.log(8) - 7 / 8)
  assert "overoptimization.png" in (d / "report.md").read_text()
  labels = json.loads((d / "pairs/labels.json").read_text())
  assert labels["label_temperature"] == 0.1 and labels["train"]["pairs"] == 64
  before = (d / "curves.json").read_text()
  p = _launch(["experiments/overoptimization.py:test", "--run-dir", str(d)])
  assert p.returncode == 0 and " into " not in p.stderr, p.stderr[-2000:]   # no sub-run launched again
  assert (d / "curves.json").read_text() == before


def test_a_bad_gold_is_one_line_before_anything_runs(tmp_path):
  p = _launch(["experiments/overoptimization.py:test", "--run-dir", str(tmp_path / "x"), "--set",
               "gold=no_such_module_here:score"])
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "gold 'no_such_module_here:score'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "x").exists()   # nothing written


THE_GOLD = '''import re


def the_count(texts):
  """How often a continuation says "the": a gold this test supplies, unknown to l2jax."""
  return [float(len(re.findall(r"\\bthe\\b", t.lower()))) for t in texts]
'''


@pytest.mark.slow
def test_ppo_against_a_proxy_raises_the_held_out_gold(tmp_path):
  """A learning test: a gold function from outside l2jax labels 512 pairs (no label noise), a proxy is trained on
  them, and 12 PPO iterations against the proxy raise the *gold* score of held-out openings by at least 1.0 (the
  base model says "the" about 0.4 times in 24 tokens; the standard error of each measurement is below 0.1)."""
  (tmp_path / "outside_gold.py").write_text(THE_GOLD)
  d = tmp_path / "oo"
  ppo_sets = ["iterations=12", "batch_prompts=32", "minibatch=8", "optim.lr=3e-4", "eval_every=6", "max_new_tokens=24"]
  p = _launch(["experiments/overoptimization.py:test", "--run-dir", str(d), "--set", "gold=outside_gold:the_count",
               "--set", "label_temperature=0", "--set", "train_prompts=512", "--set", "pairs=[512]",
               "--set", "heldout_pairs=128", "--set", "report_prompts=32", "--set", "max_new_tokens=24",
               "--set", "measure_samples=4", "--set", 'methods=["ppo"]', "--set", 'proxy_sets=["epochs=3"]',
               "--set", f"ppo_sets={json.dumps(ppo_sets)}"], env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
  assert p.returncode == 0, p.stderr[-3000:]
  acc = json.loads((d / "proxies.json").read_text())["512 pairs"]
  assert acc["accuracy_vs_gold"] > 0.8, acc
  got = json.loads((d / "ppo-512" / "gold.json").read_text())
  first, last = got["000000"], got["000012"]
  assert last["gold"] - first["gold"] > 1.0, got
  assert last["gold"] - first["gold"] > 5 * (first["gold_se"] + last["gold_se"]), got
  assert last["proxy"]["512 pairs"] > first["proxy"]["512 pairs"] and last["kl"] > 1.0, got


@pytest.mark.slow
def test_compare_runs_every_method_against_one_proxy(tmp_path):
  """GRPO, RLOO and DPO on the gold task beside PPO, rejection sampling and best-of-n: one curve each, timed."""
  d = tmp_path / "cmp"
  p = _launch(["experiments/overoptimization.py:test-compare", "--run-dir", str(d)])
  assert p.returncode == 0, p.stderr[-3000:]
  curves = json.loads((d / "curves.json").read_text())
  assert [c["method"] for c in curves] == ["best-of-n", "ppo", "grpo", "rloo", "rejection", "dpo"]
  assert all(np.isfinite(c["gold"]).all() and c["wall_s"][-1] is not None for c in curves)
  assert not (d / "grpo-64" / "value").exists() and (d / "ppo-64" / "value").is_dir()
  pairs = [json.loads(x) for x in (d / "pairs" / "proxy-64.jsonl").read_text().splitlines()]
  assert len(pairs) == 64 and "s to peak" in (d / "table.md").read_text()
