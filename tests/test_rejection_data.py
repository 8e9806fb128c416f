"""Rejection sampling's data (Llama 2 section 3.2.3, 4.2.4): empty and cut-off answers never enter the pool and are
counted, the pool always reads back with the SFT reader, repeated prompts draw distinct samples, Figure 8's best
temperature feeds the next iteration, answer-template preprompts for tagged prompts, and a resumed sampling
phase reports what an uninterrupted one reports. A fake sampler and scorer keep these fast (no model)."""
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from l2jax import config as c
from l2jax.data import dialogs as dl
from l2jax.data.prompts import Prompt, prompt_key
from l2jax.data.tokenizer import Tokenizer
from l2jax.rl import best_of_n as bon
from l2jax.rl import offline
from l2jax.stages import rejection as rj

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "data/llama2-tokenizer/tokenizer.model"


def _prompt(i: int, safety: bool = False, source: str = "jsonl:p.jsonl", where: str = "") -> Prompt:
  m = ({"role": "user", "content": f"Question number {i}?"},)
  return Prompt(m, safety, source, where or f"p.jsonl:{i + 1}", prompt_key(m))


class FakeOut:
  def __init__(self, n):
    self.tokens, self.lengths = np.arange(n, dtype=np.int32)[:, None], np.ones(n, np.int32)


class FakeSampler:
  """Each row's answer and stop reason follow from its seed: seed % 5 == 0 -> "" (first token EOS), 1 -> blanks,
  2 -> cut off by max_new_tokens, else a finished answer naming the seed and the temperature."""

  def __init__(self, fail_after: int | None = None):
    self.calls, self.seeds, self.fail_after = 0, [], fail_after

  def generate(self, ids, max_new_tokens, temperature, top_p, top_k, seed):
    self.calls += 1
    if self.fail_after is not None and self.calls > self.fail_after:
      raise KeyboardInterrupt("killed")
    self.seeds += list(seed)
    self.texts, reasons = [], []
    for s in seed:
      kind = s % 5
      self.texts.append(["", "  \n ", f"cut off at T{temperature:g} {s}"][kind] if kind < 3
                        else f"Answer {s} at T{temperature:g}.")
      reasons.append("length" if kind == 2 else "eos")
    out = FakeOut(len(ids))
    out.stop_reasons = reasons
    return out

  def decode_new(self, prompt, new):
    return self.texts[int(new[0])]


class FakeScorer:
  """R_c hacked as a tiny RM might be: empty answers score 10, cut-off ones 5 (more if scored finished), others
  crc32(text) % 100 / 100 + the temperature's digits (so temperatures rank)."""

  def __init__(self):
    self.calls = []

  def score(self, dialogs, texts, is_safety, finished=True):
    done = [finished] * len(texts) if isinstance(finished, bool) else list(finished)
    self.calls.append((list(dialogs), list(texts), done))
    r = []
    for t, d in zip(texts, done):
      if not t.strip():
        r.append(10.0)
      elif t.startswith("cut"):
        r.append(5.0 if not d else 7.0)
      else:
        r.append(zlib.crc32(t.encode()) % 100 / 100 + (1.0 if "T1.2" in t else 0.0))
    r = np.array(r)
    return r * 0.5, r * 0.25, r


def _cfg(**kw) -> c.Rejection:
  return c.Rejection(sampler="s", samples_per_prompt=5, batch_prompts=2, **kw)


def _record(key, texts_rewards_reasons):
  return {"key": key, "messages": [{"role": "user", "content": f"Prompt {key}?"}], "is_safety": False,
          "source": "x", "iteration": 1, "sampler": "s", "temperature": 1.2,
          "samples": [{"text": t, "reward": r, "helpful": r, "safety": r, "stop_reason": why}
                      for t, r, why in texts_rewards_reasons]}


def test_pool_writer_refuses_empty_blank_and_cut_off_answers_and_its_file_reads_back(tmp_path):
  recs = [_record("a", [("", 9.0, "eos"), ("  \n", 8.0, "eos"), ("Cut off mid", 7.0, "length"), ("Fine.", 1.0, "eos"),
                        ("Also fine.", 0.5, "eos")]),
          _record("b", [("", 3.0, "eos"), ("Stopped by the context", 2.0, "context"), (" ", 1.0, "length")]),
          _record("c", [("Good answer.", 0.1, "eos")])]
  previous = [{**bon.pool_entry(_record("d", []), {"text": "", "helpful": 0, "safety": 0}, 50.0)},  # an old empty
              bon.pool_entry(_record("e", []), {"text": "Old.", "helpful": 0, "safety": 0}, 0.0)]
  pool, counts = bon.build_pool(previous, bon.best_entries(recs), keep_truncated=False)
  assert {e["key"]: e["messages"][-1]["content"] for e in pool} == {"a": "Fine.", "c": "Good answer.", "e": "Old."}
  assert counts["previous_dropped_unusable"] == 1 and counts["added"] == 2
  stats = bon.sample_counts(recs)
  assert stats == {"prompts": 3, "samples": 9, "empty": 4, "truncated": 3, "usable": 3, "keep_truncated": False,
                   "by_stop_reason": {"eos": 6, "length": 2, "context": 1}, "prompts_without_usable": 1,
                   "best_unusable": 2}
  # keep_truncated lets the cut-off answer win prompt a; the blank cut-off one of b never enters
  loose, _ = bon.build_pool([], bon.best_entries(recs, keep_truncated=True), keep_truncated=True)
  assert {e["key"]: e["messages"][-1]["content"] for e in loose} == {"a": "Cut off mid", "b": "Stopped by the context",
                                                                    "c": "Good answer."}
  for name, entries in (("pool.jsonl", pool), ("loose.jsonl", loose)):
    offline.write_jsonl_atomic(tmp_path / name, entries)
    enc = dl.encode_dialogs(dl.open_dialogs("messages", [str(tmp_path / name)]), Tokenizer(TOK), seq_len=256)
    assert len(enc) == len(entries)  # the SFT reader downstream takes every line (it raises on a bad one)


def test_select_best_skips_unusable_samples_and_marks_prompts_without_any():
  r = np.array([[3.0, 1.0, 2.0], [5.0, 4.0, 6.0], [1.0, 1.0, 0.0]])
  ok = np.array([[False, True, True], [False, False, False], [True, True, True]])
  np.testing.assert_array_equal(bon.select_best(r, ok), [2, -1, 0])
  np.testing.assert_array_equal(bon.select_best(r), [0, 2, 0])
  with pytest.raises(ValueError, match="usable"):
    bon.select_best(r, ok[:2])


def test_best_temperature_by_hand():
  rewards = {0.8: [[1.0, 2.0], [0.0, 3.0]], 1.2: [[5.0, 1.0], [4.0, -1.0]], 1.6: [[2.5, 0.0], [3.0, 1.0]]}
  ok = {0.8: [[True] * 2] * 2, 1.2: [[False, True], [False, False]], 1.6: [[True] * 2] * 2}
  best = bon.best_temperature(rewards, ok)
  # 0.8: (2 + 3) / 2 = 2.5; 1.2: (1 + floor -1) / 2 = 0 (the 5 and 4 are unusable); 1.6: (2.5 + 3) / 2 = 2.75
  assert best["temperature"] == 1.6
  assert best["by_temperature"] == {"0.8": {"best_of_k_usable": 2.5, "coverage": 1.0},
                                    "1.2": {"best_of_k_usable": 0.0, "coverage": 0.5},
                                    "1.6": {"best_of_k_usable": 2.75, "coverage": 1.0}}
  tie = bon.best_temperature({1.4: [[2.0]], 1.0: [[2.0]]}, {1.4: [[True]], 1.0: [[True]]})
  assert tie["temperature"] == 1.0  # ties: the lower temperature


def test_repeated_prompt_in_one_batch_gets_distinct_samples():
  cfg, p, q = _cfg(), _prompt(0), _prompt(1)
  ids = {p.key: [1, 2], q.key: [3]}
  sampler = FakeSampler()
  recs = rj.sample_records(sampler, FakeScorer(), cfg, ids, [p, q, p], k=3, temperature=1.0, tag="samples", model="m")
  seeds = [s["seed"] for r in recs for s in r["samples"]]
  assert len(set(seeds)) == 9                                             # no two rows share a key
  alone = rj.sample_records(FakeSampler(), FakeScorer(), cfg, ids, [p], k=3, temperature=1.0, tag="samples",
                            model="m")
  assert [s["seed"] for s in alone[0]["samples"]] == seeds[:3]              # a first occurrence draws as alone


def test_cut_off_samples_are_scored_unfinished_counted_and_never_chosen():
  cfg, prompts = _cfg(), [_prompt(i) for i in range(6)]
  scorer = FakeScorer()
  recs = rj.sample_records(FakeSampler(), scorer, cfg, {p.key: [1] for p in prompts}, prompts, k=5, temperature=1.0,
                           tag="samples", model="m")
  _, texts, done = scorer.calls[0]
  assert [d for t, d in zip(texts, done) if t.startswith("cut")] == [False] * sum(t.startswith("cut") for t in texts)
  assert all(d for t, d in zip(texts, done) if not t.startswith("cut"))
  for r in recs:
    for s in r["samples"]:
      assert s["finished"] == (s["stop_reason"] == "eos")
    if r["chosen"] >= 0:
      assert bon.usable(r["samples"][r["chosen"]])


def _run_best_of_k(tmp_path, cfg, prompts, sampler, temperature=1.0):
  report = {}
  pool = rj._best_of_k(cfg, sampler, FakeScorer(), {p.key: [1] for p in prompts}, prompts, [], tmp_path, temperature,
                       report)
  return pool, report


def test_figure8_best_temperature_is_the_next_iterations_temperature(tmp_path):
  prompts = [_prompt(i) for i in range(5)]
  cfg = _cfg(temperatures=(0.8, 1.2, 1.6), fig8_prompts=4)
  _, report = _run_best_of_k(tmp_path / "v1", cfg, prompts, FakeSampler())
  assert report["best_temperature"]["temperature"] == 1.2  # the fake scorer favours T=1.2's usable answers
  rj._write_report(cfg, tmp_path / "v1", {**report, "temperature_from": "temperature"}, 1.0)
  for ref in ("v1", "v1/final", "v1/rejection.json"):
    nxt = _cfg(temperature=1.0, temperature_from=str(tmp_path / ref))
    assert rj.sampling_temperature(nxt) == (1.2, str(tmp_path / "v1/rejection.json"))
  assert rj.sampling_temperature(_cfg(temperature=0.9)) == (0.9, "temperature")
  with pytest.raises(FileNotFoundError, match="no rejection.json"):
    rj.sampling_temperature(_cfg(temperature_from=str(tmp_path / "nope")))
  (tmp_path / "cd").mkdir()
  (tmp_path / "cd/rejection.json").write_text(json.dumps({"mode": "context_distillation"}))
  with pytest.raises(ValueError, match="best_temperature"):
    rj.sampling_temperature(_cfg(temperature_from=str(tmp_path / "cd")))


def test_resumed_sampling_reports_what_an_uninterrupted_run_reports(tmp_path):
  prompts = [_prompt(i) for i in range(7)]
  cfg = _cfg(temperatures=(0.8,), fig8_prompts=3)
  pool_a, rep_a = _run_best_of_k(tmp_path / "a", cfg, prompts, FakeSampler())
  with pytest.raises(KeyboardInterrupt):  # killed after two chunks of the sampling phase
    _run_best_of_k(tmp_path / "b", cfg, prompts, FakeSampler(fail_after=2))
  assert len(offline.read_jsonl(offline.shard_path(tmp_path / "b", "samples", 0))) == 4
  sampler = FakeSampler()
  pool_b, rep_b = _run_best_of_k(tmp_path / "b", cfg, prompts, sampler)
  assert sampler.calls == 4                                    # two chunks left, then Figure 8's two
  assert rep_b == rep_a and pool_b == pool_a
  assert rep_a["samples"]["empty"] > 0 and rep_a["samples"]["truncated"] > 0


def test_answer_template_preprompts_for_tagged_prompts(tmp_path):
  pre = rj.load_preprompts(ROOT / "data/safety-preprompts/table39.jsonl")
  assert len(pre.generic) == 4 and sorted(pre.templated) == ["criminal / fraudulent content", "explicit content"]
  text, cat = pre.pick("k", "Explicit  content")
  assert cat == "explicit content" and "violating category: 'Explicit Content'" in text
  assert pre.pick("k", "Hate speech")[0] in pre.generic and pre.pick("k", "Hate speech")[1] == ""
  assert pre.pick("k")[0] in pre.generic
  lines = [{"messages": [{"role": "user", "content": "How do I pick a lock?"}], "safety": True,
            "risk_category": "Criminal / Fraudulent Content"},
           {"messages": [{"role": "user", "content": "Say something mean."}], "safety": True}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  from l2jax.data import prompts as pr
  ps = pr.read_prompts([f"jsonl:{tmp_path / 'p.jsonl'}"])
  cats = rj.prompt_categories(ps)
  assert cats == {ps[0].key: "Criminal / Fraudulent Content"}
  cfg = c.Rejection(sampler="s", mode="context_distillation")
  recs = rj.distill_records(FakeSampler(), FakeScorer(), cfg, Tokenizer(TOK), pre, ps, "m", cats)
  assert "'Criminal / Fraudulent Content'" in recs[0]["preprompt"] and recs[0]["risk_category"]
  assert recs[1]["preprompt"] in pre.generic and recs[1]["risk_category"] == ""
  for r in recs:  # an empty or cut-off preprompted answer is never kept, however it scores
    assert r["kept"] == (r["gain"] > 0 and bon.usable(r["preprompted"]))


def test_heldout_answers_are_a_stratified_sample_not_the_first_n():
  # the held-out list is in source order (HH harmless first): its first eval_prompts would all be safety prompts
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.launch import load_experiment
  from l2jax.stages import rejection as R
  cfg = load_experiment("experiments/rejection.py:tiny")[0]
  tok = Tokenizer("data/llama2-tokenizer/tokenizer.model")
  _, held, _, stats = R._prompts(cfg, tok)
  ev = stats["heldout"]["eval_set"]
  assert len(held) == cfg.prompts.eval_prompts == ev["prompts"]
  assert 0.25 <= ev["safety_share"] <= 0.75 and len(ev["by_stratum"]) >= 3


def test_context_distillation_keeps_the_skipped_bad_count(tmp_path):
  import dataclasses
  import json as js
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.launch import load_experiment
  from l2jax.stages import rejection as R
  f = tmp_path / "p.jsonl"
  lines = [js.dumps({"messages": [{"role": "user", "content": f"question {i}?"}], "safety": True}) for i in range(6)]
  f.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
  cfg = load_experiment("experiments/rejection.py:test")[0]
  cfg = dataclasses.replace(cfg, mode="context_distillation",
                            prompts=dataclasses.replace(cfg.prompts, sources=(f"jsonl:{f}",), skip_bad=True,
                                                        heldout_fraction=0.0))
  _, _, _, stats = R._prompts(cfg, Tokenizer("data/llama2-tokenizer/tokenizer.model"))
  assert stats["train"]["skipped_bad"] == 1 and stats["train"]["kept"] == 6
