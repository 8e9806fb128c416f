"""Rejection sampling (Llama 2 section 3.2.3): best-of-K selection by R_c, the pool over iterations, answer-only
fine-tuning rows, Figure 7 statistics against brute force and hand values, resumable sharded offline sampling,
sharded == one device, cut-off samples scored without EOS, rescore(), the context distillation filter (section
4.2.4), and experiments/rejection.py:test through the launcher."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from l2jax import config as c
from l2jax.rl import best_of_n as bon
from l2jax.rl import offline
from l2jax.rl.rewards import combine
from l2jax.stages import rejection as rj

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "data/llama2-tokenizer/tokenizer.model"
TOK512 = ROOT / "data/stories260K/tok512.model"


def test_selection_picks_the_highest_combined_reward():
  helpful = np.array([[3.0, 0.1, 1.0], [0.0, 5.0, -1.0], [2.0, 2.0, 9.0]])
  safety = np.array([[0.5, 2.0, 0.2], [-3.0, 1.0, 0.0], [4.0, 1.0, -2.5]])  # logit(0.15) = -1.73
  is_safety = np.array([[False] * 3, [False] * 3, [True] * 3])
  r = np.asarray(combine(helpful.ravel(), safety.ravel(), is_safety.ravel())).reshape(3, 3)
  # prompt 0: helpfulness everywhere; prompt 1: sample 0 unsafe (Rs < 0.15) so its safety score -3 counts;
  # prompt 2: a safety prompt, the safety scores rank (4.0 best although helpful prefers sample 2)
  np.testing.assert_allclose(r, [[3.0, 0.1, 1.0], [-3.0, 5.0, -1.0], [4.0, 1.0, -2.5]])
  np.testing.assert_array_equal(bon.select_best(r), [0, 1, 0])
  np.testing.assert_array_equal(bon.select_best(np.array([[1.0, 2.0, 2.0]])), [1])  # first on ties
  with pytest.raises(ValueError, match="shape"):
    bon.select_best(np.zeros((2, 0)))


def test_pool_keeps_the_best_per_prompt_over_three_iterations_and_loses_none():
  rng = np.random.default_rng(0)
  keys = [f"p{i}" for i in range(12)]
  pool, best = [], {}
  for it in (1, 2, 3):
    seen = rng.choice(keys, size=7, replace=False)  # each iteration samples a different subset
    new = [{"key": k, "reward": float(rng.normal()), "iteration": it} for k in seen]
    pool, counts = bon.merge_pool(pool, new)
    for r in new:
      if r["key"] not in best or r["reward"] > best[r["key"]]["reward"]:
        best[r["key"]] = r
    assert counts["added"] + counts["improved"] + counts["kept_previous"] == len(new)
    assert {r["key"] for r in pool} == set(best)            # never loses a prompt
    assert len(pool) == len({r["key"] for r in pool})       # once each
    for r in pool:
      assert r == best[r["key"]]                             # the best over all iterations so far
  assert {r["iteration"] for r in pool} != {3}               # older answers survive where they were better


def _pool_file(tmp_path, tok):
  recs = [{"key": "a", "messages": [{"role": "user", "content": "How do I bake bread?"}], "is_safety": False,
           "iteration": 1, "sampler": "s", "temperature": 1.2},
          {"key": "b", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": "Name a colour."}],
           "is_safety": True, "iteration": 1, "sampler": "s", "temperature": 1.2}]
  pool = [bon.pool_entry(r, {"text": t, "helpful": 0.0, "safety": 0.0}, 1.0)
          for r, t in zip(recs, ["Mix flour and water.", "Blue."])]
  path = tmp_path / "pool.jsonl"
  offline.write_jsonl_atomic(path, pool)
  return path, pool


def test_finetuning_rows_carry_the_answer_only_mask(tmp_path):
  from l2jax.data import dialogs as dl
  from l2jax.data.dialog_packing import build_row
  from l2jax.data.tokenizer import Tokenizer, encode_chat
  tok = Tokenizer(TOK)
  path, pool = _pool_file(tmp_path, tok)
  cfg = c.Rejection(sampler="x", seq_len=128)
  sft_cfg = rj.sft_config(cfg, "init_dir", path)
  assert sft_cfg.data.kind == "messages" and sft_cfg.data.paths == (str(path),) and sft_cfg.init == "init_dir"
  enc = dl.encode_dialogs(dl.open_dialogs("messages", sft_cfg.data.paths), tok, seq_len=128)
  assert len(enc) == 2
  for i, e in enumerate(pool):
    ids, mask = enc.dialog(i)
    prompt = encode_chat(tok, e["messages"][:-1])
    answer = tok.encode(e["messages"][-1]["content"])
    assert list(ids[:len(prompt)]) == prompt or i == 1  # dialog b: earlier answer "Hello." is also an answer
    # the last answer and its EOS carry loss; the prompt of the last exchange (incl. [INST] ... [/INST]) does not
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    n_last = int(np.argmax(np.cumsum(mask[::-1] == 0) > 0))  # trailing run of ones
    assert n_last >= len(answer) and tok.decode(ids[len(ids) - n_last:]).strip() == e["messages"][-1]["content"]
    assert mask[:len(encode_chat(tok, e["messages"][:1] if i == 0 else e["messages"][:2]))].sum() == 0
  row = build_row(enc, [0, 1], 128)
  got = row["targets"][row["loss_mask"] > 0]
  assert tok.decode(got[got != tok.eos_id]).replace(" ", "") == "Mixflourandwater.Hello.Blue."


def test_figure7_statistics_match_brute_force_over_subsets():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(5, 6)).round(1)  # rounding makes ties
  curves = bon.best_of_n_curves(scores)
  for n in range(1, 7):
    subsets = list(itertools.combinations(range(6), n))
    mx = np.mean([[scores[p, list(s)].max() for s in subsets] for p in range(5)])
    med = np.mean([[np.median(scores[p, list(s)]) for s in subsets] for p in range(5)])
    np.testing.assert_allclose(curves["max"][n - 1], mx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(curves["median"][n - 1], med, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(curves["max"][0], scores.mean())                    # N = 1: the mean
  np.testing.assert_allclose(curves["max"][-1], scores.max(axis=1).mean())       # N = K: the max of all K
  np.testing.assert_allclose(curves["median"][-1], np.median(scores, axis=1).mean())


def test_figure7_statistics_equal_hand_computed_values():
  # one prompt, K = 4 sorted scores (0, 0, 1, 5); over the C(4, N) subsets:
  #   max of 1 = 6/4; max of 2 = (0*1 + 1*2 + 5*3)/6 = 17/6; max of 3 = (1*1 + 5*3)/4 = 4; max of 4 = 5
  #   median of 2 = (E[min of 2] + E[max of 2])/2 = (1/6 + 17/6)/2 = 3/2; median of 3 = E[2nd of 3] = 1*2/4 = 1/2
  #   median of 4 = (0 + 1)/2; a second prompt of equal scores adds 2 to every value (mean over prompts: +1)
  curves = bon.best_of_n_curves(np.array([[5.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
  np.testing.assert_allclose(curves["max"], [(1.5 + 2) / 2, (17 / 6 + 2) / 2, (4 + 2) / 2, (5 + 2) / 2])
  np.testing.assert_allclose(curves["median"], [(1.5 + 2) / 2, (1.5 + 2) / 2, (0.5 + 2) / 2, (0.5 + 2) / 2])
  np.testing.assert_allclose(bon.expected_order_stat(np.array([[5.0, 0.0, 1.0, 0.0]]), 2, 1), [1 / 6])


def test_offline_sampling_killed_midway_resumes_without_repeats_or_losses(tmp_path):
  items = [f"k{i}" for i in range(11)]
  calls = []

  class Killed(Exception):
    pass

  def work(batch, fail_after=None):
    calls.extend(batch)
    if fail_after is not None and len(calls) > fail_after:
      raise Killed()
    return [{"value": int(x[1:]) ** 2} for x in batch]

  with pytest.raises(Killed):  # dies in the third chunk of 3, after two chunks are on disk
    offline.run(items, key=str, work=lambda b: work(b, fail_after=6), out_dir=tmp_path, name="s", chunk=3)
  shard = offline.shard_path(tmp_path, "s", 0)
  assert len(offline.read_jsonl(shard)) == 6
  with open(shard, "a") as f:  # and a kill in the middle of writing a line
    f.write('{"value": 1, "ke')
  calls.clear()
  recs = offline.run(items, key=str, work=work, out_dir=tmp_path, name="s", chunk=3)
  assert calls == items[6:]                                          # nothing redone
  assert [r["key"] for r in recs] == items                          # nothing lost, in item order
  assert [r["value"] for r in recs] == [i * i for i in range(11)]
  assert len(offline.read_jsonl(shard)) == 11                        # the half line was cut off
  calls.clear()
  assert offline.run(items, key=str, work=work, out_dir=tmp_path, name="s", chunk=3) == recs and not calls


def test_offline_processes_write_disjoint_shards_and_process_0_merges(tmp_path, monkeypatch):
  monkeypatch.setattr(offline, "_barrier", lambda tag, n: None)
  items, seen = [f"k{i}" for i in range(7)], {0: [], 1: []}
  for pi in (1, 0):  # process 1 finishes first; process 0 then merges
    offline.run(items, key=str, work=lambda b, pi=pi: seen[pi].extend(b) or [{} for _ in b], out_dir=tmp_path,
                name="s", chunk=2, process_index=pi, process_count=2)
  assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(items)
  assert [r["key"] for r in offline.read_jsonl(tmp_path / "s.jsonl")] == items


# ----------------------------------------------------------------------------------------------- with models

@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A random policy and two random reward models (test-sized, the 512-piece stories260K tokenizer), and prompts."""
  from flax import nnx
  from l2jax import checkpoint
  from l2jax.model import heads, llama, presets
  d = tmp_path_factory.mktemp("rejection_models")
  cfg = presets.get("test", vocab_size=512, max_seq_len=512)
  checkpoint.save_model_dir(d / "policy", cfg, llama.split(llama.init(cfg, seed=3))[1], TOK512)
  for name, seed in (("helpful", 1), ("safety", 2)):
    params = nnx.to_pure_dict(nnx.split(heads.ScalarModel(cfg, rngs=nnx.Rngs(params=seed)))[1])
    checkpoint.save_model_dir(d / name, cfg, params, TOK512, extra_files={"head.json": json.dumps(
        {"kind": "reward_model", "objective": name, "seq_len": 128})})
  lines = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "safety": i % 3 == 0}
           for i in range(4)]
  (d / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return d


def _setup(models, devices, **kw):
  from l2jax import sharding as shd
  from l2jax.data import prompts as pr
  from l2jax.sample import load_sampler
  cfg = c.Rejection(sampler=str(models / "policy"), max_new_tokens=4, samples_per_prompt=2, temperature=1.0, **kw,
                    reward_models=c.RewardModels(helpful=str(models / "helpful"), safety=str(models / "safety")),
                    prompts=c.Prompts(sources=(f"jsonl:{models / 'prompts.jsonl'}",)))
  sampler = load_sampler(cfg.sampler, mesh=shd.make_mesh(1, -1, 1, devices=devices))
  prompts = pr.read_prompts(cfg.prompts.sources)
  ids, kept, _ = pr.encode_prompts(sampler.tokenizer, prompts, 100)
  return cfg, sampler, rj.Scorer(cfg.reward_models, 8), kept, {p.key: x for p, x in zip(kept, ids)}


@pytest.mark.slow  # about 30 s on 2 busy cores: two sampler compiles
def test_sharded_sampling_equals_one_device(models):
  assert len(jax.devices()) == 8
  out = {}
  for n in (1, 8):
    cfg, sampler, scorer, prompts, ids = _setup(models, jax.devices()[:n], keep_truncated=True)
    out[n] = rj.sample_records(sampler, scorer, cfg, ids, prompts, k=2, temperature=1.0, tag="samples", model="m")
  chosen = []
  for a, b in zip(out[1], out[8]):
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
    np.testing.assert_allclose([s["reward"] for s in a["samples"]], [s["reward"] for s in b["samples"]], rtol=1e-5)
    assert a["chosen"] == b["chosen"]
    ok = [bon.usable(s, cfg.keep_truncated) for s in a["samples"]]   # 4-token answers: cut off, kept here
    rewards = [s["reward"] if u else -np.inf for s, u in zip(a["samples"], ok)]
    assert a["chosen"] == (int(np.argmax(rewards)) if any(ok) else -1)   # the best usable sample, or none
    chosen.append(a["chosen"])
    assert len({s["text"] for s in a["samples"]}) > 1  # K different samples (distinct seeds)
  assert max(chosen) >= 0   # the selection was exercised


def test_context_distillation_filter_keeps_exactly_the_improved_answers(models):
  np.testing.assert_array_equal(bon.distill_keep([0.0, 1.0, -2.0, 0.5], [0.1, 1.0, -3.0, 2.0]),
                                [True, False, False, True])  # a tie is not an improvement
  cfg, sampler, scorer, prompts, _ = _setup(models, jax.devices()[:1])
  pre = rj.load_preprompts(ROOT / "data/safety-preprompts/table39.jsonl")
  assert len(pre.generic) == 4 and pre.generic[1].startswith("The following user question has been flagged as unsafe.")
  recs = rj.distill_records(sampler, scorer, cfg, sampler.tokenizer, pre, prompts, "m")
  for r, p in zip(recs, prompts):
    assert r["messages"] == list(p.messages) and r["preprompt"] in pre.generic  # the plain prompt is what is kept
    assert r["kept"] == (r["preprompted"]["safety"] > r["plain"]["safety"] and bon.usable(r["preprompted"]))
    np.testing.assert_allclose(r["gain"], r["preprompted"]["safety"] - r["plain"]["safety"], rtol=1e-6)
  assert rj.add_preprompt([{"role": "user", "content": "q"}], "P") == [{"role": "system", "content": "P"},
                                                                      {"role": "user", "content": "q"}]
  assert rj.add_preprompt([{"role": "user", "content": "q"}], "P", "prefix") == [{"role": "user", "content": "P\nq"}]


def test_cut_off_samples_are_scored_without_eos_and_rescore_reproduces_the_scores(models):
  from l2jax.data.preferences import encode_responses
  cfg, sampler, scorer, prompts, ids = _setup(models, jax.devices()[:1], keep_truncated=True)
  recs = rj.sample_records(sampler, scorer, cfg, ids, prompts, k=2, temperature=1.0, tag="samples", model="m")
  recs = [{**r, "key": p.key} for r, p in zip(recs, prompts)]  # as l2jax.rl.offline stores them
  samples = [(r, s) for r in recs for s in r["samples"]]
  assert any(s["stop_reason"] == "length" for _, s in samples)  # 4 new tokens: a random model is cut off
  rm = scorer.helpful
  for r, s in samples:
    row = encode_responses(rm.tokenizer, r["messages"], [s["text"]], rm.seq_len, finished=s["finished"])[0]
    assert (row[-1] == rm.tokenizer.eos_id) == s["finished"]
    tokens, mask = np.array([row]), np.ones((1, len(row)), np.int32)
    np.testing.assert_allclose(s["helpful"], np.asarray(rm.score_tokens(tokens, mask))[0], rtol=1e-5, atol=1e-6)
  cut = [(r, s) for r, s in samples if not s["finished"]]
  as_finished = rm.score([r["messages"] for r, _ in cut], [s["text"] for _, s in cut], finished=True)
  assert not np.allclose(as_finished, [s["helpful"] for _, s in cut])  # an appended EOS would change the score
  # rescore(): the pool's answers scored again give the sampled scores back (prompt, answer and finished flag
  # aligned), and with the two reward models swapped, the other model's scores
  pool = bon.best_entries(recs, keep_truncated=True)
  assert pool and all(not bon.usable(bon.entry_answer(e)) for e in pool if e["stop_reason"] != "eos")
  again = bon.rescore(pool, scorer)
  for e, a in zip(pool, again):
    np.testing.assert_allclose([a["helpful"], a["safety"], a["reward"]], [e["helpful"], e["safety"], e["reward"]],
                               rtol=1e-5, atol=1e-6)
    assert a["rescored"] and a["messages"] == e["messages"] and a["key"] == e["key"]
  swapped = rj.Scorer(c.RewardModels(helpful=str(models / "safety"), safety=str(models / "helpful")), 8)
  for e, a in zip(pool, bon.rescore(pool, swapped)):
    np.testing.assert_allclose([a["helpful"], a["safety"]], [e["safety"], e["helpful"]], rtol=1e-5, atol=1e-6)
  assert bon.rescore([], scorer) == []
  with pytest.raises(ValueError, match="finished flags"):
    rm.score(["Hi"], ["Hello"], finished=[True, False])


def test_config_validation():
  with pytest.raises(ValueError, match="mode"):
    c.Rejection(mode="best_of_n")
  with pytest.raises(ValueError, match="samples_per_prompt"):
    c.Rejection(samples_per_prompt=0)
  with pytest.raises(ValueError, match="temperatures"):
    c.Rejection(temperatures=(1.0, 0.0))
  with pytest.raises(c.ConfigError, match="preprompt_as"):
    c.override(c.Rejection(), "preprompt_as", "suffix")


@pytest.mark.slow
def test_rejection_test_experiment_runs_through_the_launcher_from_an_empty_run_dir(tmp_path):
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path / "runs"), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run_dir = tmp_path / "runs" / "rejection-test"
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rejection.py:test", "--run-dir",
                      str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  rep = json.loads((run_dir / "rejection.json").read_text())
  samples = offline.read_jsonl(run_dir / "samples.jsonl")
  pool = offline.read_jsonl(run_dir / "pool.jsonl")
  assert all(len(r["samples"]) == 4 for r in samples)
  assert len(pool) == len(samples) - rep["samples"]["prompts_without_usable"] > 0
  assert rep["samples"] == bon.sample_counts(samples, keep_truncated=True)  # the report counts the merged records
  rewards = np.array([[s["reward"] for s in r["samples"]] for r in samples])
  np.testing.assert_allclose(rep["figure7"]["max"][0], rewards.mean(), rtol=1e-9)          # N = 1: the mean
  np.testing.assert_allclose(rep["figure7"]["max"][-1], rewards.max(axis=1).mean(), rtol=1e-9)  # N = K: the best
  assert rep["best_temperature"]["temperature"] in (0.8, 1.6)
  for name in ("figure7.png", "figure8.png", "heldout_reward.png", "summary.md", "final/config.json"):
    assert (run_dir / name).is_file(), name
  assert "held-out reward before" in (run_dir / "summary.md").read_text()
  # one-token answers are cut off or empty: without keep_truncated nothing is usable, whatever is sampled, and the
  # version is its starting checkpoint unchanged (one line), not a failed pipeline
  empty_dir = tmp_path / "runs" / "rejection-test-nothing-usable"
  p = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rejection.py:test", "--run-dir",
                      str(empty_dir), "--set", "keep_truncated=false", "--set", "temperatures=",
                      "--set", "max_new_tokens=1"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0 and "final/ is the starting checkpoint" in p.stderr, p.stderr[-3000:]
  rep = json.loads((empty_dir / "rejection.json").read_text())
  assert rep["pool_empty"] and rep["samples"]["usable"] == 0 and (empty_dir / "final/config.json").is_file()
  assert json.loads((empty_dir / "final/final_step.json").read_text()) == {"step": 0}
