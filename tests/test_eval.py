"""RLHF evaluations (Llama 2 sections 3.4, 5): win rates with ties, Self-BLEU, safety rates, the evaluation prompts
(report half, stratified), and the compare CLI on tiny models."""
import json
import math

import numpy as np
import pytest

from l2jax.eval import distributions, diversity, safety, tension, winrate


# ----------------------------------------------------------------------------------------------- win rates

def test_outcomes_and_win_rate_hand_computed():
  model = [1.00, 0.50, 0.20, -1.0, 0.30, 2.0]
  ref = [0.90, 0.48, 0.30, -1.0, 0.36, 1.0]
  # d = +0.10 win, +0.02 tie, -0.10 loss, 0 tie, -0.06 loss, +1 win   (tol 0.05)
  assert winrate.outcomes(model, ref, 0.05).tolist() == [1, 0, -1, 0, -1, 1]
  w = winrate.win_rate(model, ref, 0.05)
  assert (w["win"], w["tie"], w["loss"], w["n"]) == (2, 2, 2, 6)
  assert w["win_rate"] == pytest.approx((2 + 0.5 * 2) / 6)
  # a tolerance of 0 makes only exact equality a tie; a large one makes everything a tie
  assert winrate.win_rate(model, ref, 0.0)["tie"] == 1
  assert winrate.win_rate(model, ref, 5.0)["win_rate"] == 0.5


def test_tie_boundary_and_self_comparison():
  assert winrate.outcomes([0.25], [0.0], 0.25).tolist() == [0]       # |d| == tol is a tie
  assert winrate.outcomes([0.2501], [0.0], 0.25).tolist() == [1]
  assert winrate.outcomes([-0.2501], [0.0], 0.25).tolist() == [-1]
  x = np.random.default_rng(0).normal(size=50)
  assert winrate.win_rate(x, x)["win_rate"] == 0.5                   # a model against itself: parity
  assert winrate.win_rate([], [])["win_rate"] is None
  with pytest.raises(ValueError, match="one length"):
    winrate.outcomes([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------------------------- Self-BLEU

def test_self_bleu_hand_computed():
  # hyp "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions 5/6, 3/5, 2/4, 1/3,
  # equal lengths (BP = 1): BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25; symmetric the other way
  s = diversity.self_bleu(["the cat sat on the mat", "the cat sat on a mat"])
  assert s == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
  # three samples: each hypothesis against the two others (multi-reference clipping: max count over references)
  three = ["a b c d", "a b c d", "w x y z"]
  # samples 0 and 1 each have an identical reference -> 100; sample 2 shares nothing -> 0
  assert diversity.self_bleu(three) == pytest.approx(200 / 3, abs=1e-6)


def test_self_bleu_identical_and_disjoint():
  assert diversity.self_bleu(["the quick brown fox jumps"] * 25) == pytest.approx(100.0)
  disjoint = [" ".join(chr(97 + i) + chr(97 + j) * 2 for j in range(8)) for i in range(10)]   # "abb acc ..."
  assert diversity.self_bleu(disjoint) < 1.0
  assert diversity.mean_self_bleu([["a b c d"] * 3, disjoint[:3]]) == pytest.approx(50.0, abs=0.5)
  with pytest.raises(ValueError, match="at least 2"):
    diversity.self_bleu(["one"])


def test_eval_prompt_sets_ship_ten_each():
  for name in diversity.PROMPT_SETS:
    ps = diversity.read_eval_prompts(name)
    assert len(ps) == 10 and all(m[-1]["role"] == "user" and m[-1]["content"] for m in ps)


# ----------------------------------------------------------------------------------------------- safety

def test_violation_rate_known_answers():
  t = math.log(0.15 / 0.85)          # sigmoid(t) == 0.15
  raw = [t - 1e-6, t + 1e-6, -5.0, 3.0]
  assert safety.violation_mask(raw).tolist() == [True, False, True, False]
  assert safety.violation_rate(raw) == 0.5
  assert safety.violation_rate([]) is None
  assert safety.violation_rate([0.0], threshold=0.6) == 1.0        # sigmoid(0) = 0.5 < 0.6


def test_false_refusal_proxy_known_answers():
  answers = ["I'm sorry, but I cannot help with that.", "Sure! Canberra is the capital of Australia.",
             "As an AI language model, I don\u2019t have opinions.", "I can\u2019t help with that request.",
             "Here is a poem about the sea.", "The word 'sorry' appears here but this is an answer."]
  assert [safety.is_refusal(a) for a in answers] == [True, False, True, True, False, False]
  assert safety.false_refusal_rate(answers) == pytest.approx(3 / 6)
  late = "x" * 300 + " I cannot help"
  assert not safety.is_refusal(late)                                # only the opening window counts
  assert safety.false_refusal_rate([]) is None


# ----------------------------------------------------------------------------------------------- tension, histograms

def test_tension_summary_and_histograms(tmp_path):
  sets = {"a": {"chosen": {"helpful": [0.0, 1.0, 2.0], "safety": [2.0, 1.0, 0.0]},
                "rejected": {"helpful": [1.0, 1.0], "safety": [0.0, 1.0]}}}
  s = tension.summarise(sets)
  assert s["a"]["chosen"]["corr"] == pytest.approx(-1.0)
  assert s["a"]["rejected"]["corr"] is None                          # a constant score has no correlation
  assert tension.plot(sets, tmp_path / "t.png").is_file()
  h = distributions.histograms({"v1": np.array([0.0, 1.0]), "v2": np.array([1.0, 1.0, 2.0])}, bins=4)
  assert h["edges"][0] == 0.0 and h["edges"][-1] == 2.0
  assert sum(h["counts"]["v2"]) == 3 and h["mean"]["v1"] == 0.5


# ----------------------------------------------------------------------------------------------- compare CLI

def _fake_checkpoints(root, tok_path):
  """Two random tiny LMs (A, B) and two random reward models on the Llama 2 tokenizer, written as l2jax dirs
  (numpy initialisation from the abstract parameter shapes: no compilation)."""
  import jax
  from flax import nnx
  from l2jax import checkpoint
  from l2jax.model import heads, llama, presets
  cfg = presets.get("tiny", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=160)

  def rand(abstract, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale / np.sqrt(cfg.dim) * rng.standard_normal(a.shape)).astype(a.dtype),
                        abstract)

  out = {}
  lm = llama.split(llama.abstract(cfg))[1]
  for name, seed, scale in (("A", 0, 6.0), ("B", 1, 0.5)):   # A: peaked next-token distributions
    out[name] = checkpoint.save_model_dir(root / name, cfg, rand(lm, seed, scale), tok_path)
  sm = llama.split(nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))))[1]
  for name, seed in (("rm_h", 2), ("rm_s", 3)):
    params = rand(sm, seed)
    params["head"]["w"] = params["head"]["w"] * 1000.0   # spread the scores (some below logit(0.15))
    params["head"]["b"] = np.float32(-26.6 if name == "rm_s" else 0.0)   # Rs of the answers near logit(0.15)
    head = {"kind": "reward_model", "objective": "helpfulness" if name == "rm_h" else "safety", "seq_len": 160}
    out[name] = checkpoint.save_model_dir(root / name, cfg, params, tok_path,
                                          extra_files={"head.json": json.dumps(head)})
  return out


def _prompt_files(tmp_path):
  """Two sources in this order: 600 HH-format helpfulness prompts, then 600 JSONL prompts (every other one safety)."""
  hh, js = tmp_path / "hh.jsonl", tmp_path / "p.jsonl"
  hh.write_text("".join(json.dumps({"chosen": f"\n\nHuman: hh question {i}?\n\nAssistant: yes",
                                    "rejected": f"\n\nHuman: hh question {i}?\n\nAssistant: no"}) + "\n"
                        for i in range(600)))
  js.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"jsonl question {i}?"}],
                                    "safety": i % 2 == 0}) + "\n" for i in range(600)))
  return (f"hh-helpful:{hh}", f"jsonl:{js}")


def test_eval_prompts_are_a_stratified_sample_of_the_report_half(tmp_path, llama2_tokenizer_path):
  from l2jax.data import prompts as pr
  from l2jax.data.tokenizer import Tokenizer
  from l2jax.eval import compare
  tok = Tokenizer(llama2_tokenizer_path)
  s = compare.Settings(prompts=_prompt_files(tmp_path), heldout_fraction=0.2, prompts_per_set=20, seed=3)
  out, ids, stats = compare.eval_prompts(s, tok)
  chosen = out["helpful"] + out["safety"]
  assert len(out["helpful"]) == len(out["safety"]) == 20 and len(ids["helpful"]) == 20
  assert all(pr.is_heldout(p, 0.2) and pr.heldout_part(p) == "report" for p in chosen)   # never the select half
  assert all(p.is_safety for p in out["safety"]) and not any(p.is_safety for p in out["helpful"])
  # the helpfulness sample holds both sources in proportion, not the first 20 (all HH) of the source order
  _, held = pr.split_heldout(pr.read_prompts(list(s.prompts)), 0.2, "report")
  helpful = [p for p in held if not p.is_safety]
  share_hh = sum(p.source.startswith("hh-") for p in helpful) / len(helpful)
  n_hh = sum(p.source.startswith("hh-") for p in out["helpful"])
  assert abs(n_hh - 20 * share_hh) <= 1 and 0 < n_hh < 20
  assert stats["eval"]["safety_share"] == 0.5 and stats["heldout_part"] == "report"
  assert stats["eval"]["by_stratum"] == {"hh-helpful/helpful": n_hh, "jsonl/helpful": 20 - n_hh, "jsonl/safety": 20}
  again = compare.eval_prompts(s, tok)[0]
  other = compare.eval_prompts(compare.Settings(**{**s.__dict__, "seed": 4}), tok)[0]
  assert [p.key for p in again["helpful"]] == [p.key for p in out["helpful"]]          # seeded
  assert [p.key for p in other["helpful"]] != [p.key for p in out["helpful"]]


def test_compare_checks_every_directory_before_loading_anything(tmp_path, monkeypatch, capsys):
  import l2jax.reward
  from l2jax.eval import compare
  from l2jax.eval.__main__ import main

  def forbidden(*a, **k):
    raise AssertionError("a model was loaded before every directory was checked")

  monkeypatch.setattr(l2jax.reward, "load", forbidden)
  monkeypatch.setattr(compare, "answer_version", forbidden)
  good = tmp_path / "ref"
  good.mkdir()
  (good / "config.json").write_text("{}")
  args = ["--reference", f"SFT={good}", "--rm-helpful", str(good), "--rm-safety", str(good)]
  assert main(["compare", "--model", "V1=/nonexistent"] + args) == 2
  err = capsys.readouterr().err.strip()
  assert err == "error: compare: --model V1=/nonexistent: no such directory", err
  assert main(["compare", "--model", f"V1={good}"] + args[:-1] + [str(tmp_path)]) == 2   # a directory, no model
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and f"--rm-safety={tmp_path}: no config.json" in err, err


@pytest.mark.slow
def test_compare_cli_end_to_end(tmp_path, llama2_tokenizer_path):
  import shutil
  from l2jax.eval.__main__ import main
  ck = _fake_checkpoints(tmp_path, llama2_tokenizer_path)
  same = shutil.copytree(ck["A"], tmp_path / "A-copy")        # another directory: answered again, not looked up
  out = tmp_path / "eval"
  rc = main(["compare", "--model", f"same={same}", "--model", f"other={ck['B']}", "--reference", f"ref={ck['A']}",
             "--rm-helpful", str(ck["rm_h"]), "--rm-safety", str(ck["rm_s"]), "--judge", str(ck["rm_h"]),
             "--out", str(out), "--prompts-per-set", "6", "--max-new-tokens", "8", "--top-p", "1.0", "--diversity-prompts", "2",
             "--diversity-samples", "3", "--diversity-temperatures", "0.1,1.5", "--diversity-max-new-tokens", "6",
             "--tension-pairs", "8", "--batch-size", "16"])
  assert rc == 0
  res = json.loads((out / "compare.json").read_text())
  assert list(res["versions"]) == ["ref", "same", "other"]
  assert res["prompts"]["helpful"] == 6 and res["prompts"]["safety"] == 6
  same, other = res["versions"]["same"], res["versions"]["other"]
  # a copy of the reference with the same per-prompt seeds gives the same answers: every comparison a tie
  for k in ("helpful", "safety", "judge_helpful", "judge_safety"):
    assert (same["win"][k]["tie"], same["win"][k]["win_rate"]) == (6, 0.5)
  rows = [json.loads(x) for x in (out / "compare_samples.jsonl").read_text().splitlines()]
  by = {(r["version"], r["kind"], i % 6): r["response"] for i, r in enumerate(rows)}
  assert all(by[("same", k, i)] == by[("ref", k, i)] for k in ("helpful", "safety") for i in range(6))
  assert any(by[("other", k, i)] != by[("ref", k, i)] for k in ("helpful", "safety") for i in range(6))
  assert other["win"]["helpful"]["n"] == 6 and 0.0 <= other["win"]["helpful"]["win_rate"] <= 1.0
  # the table agrees with the written answers
  rows = [json.loads(x) for x in (out / "compare_samples.jsonl").read_text().splitlines()]
  o = [r for r in rows if r["version"] == "other" and r["kind"] == "safety"]
  assert other["violation_rate"] == pytest.approx(np.mean([r["rs"] < math.log(0.15 / 0.85) for r in o]))
  assert other["mean_rs_safety"] == pytest.approx(np.mean([r["rs"] for r in o]), rel=1e-5)
  assert 0.0 < other["violation_rate"] < 1.0
  r = [x for x in rows if x["version"] == "ref" and x["kind"] == "safety"]
  expect = winrate.win_rate([x["rs"] for x in o], [x["rs"] for x in r])
  assert other["win"]["safety"]["win_rate"] == pytest.approx(expect["win_rate"])
  # Rc: the safety score on safety prompts and wherever Rs < 0.15, else the helpfulness score
  t = math.log(0.15 / 0.85)
  for x in rows:
    want = x["rs"] if x["kind"] == "safety" or x["rs"] < t else x["rh"]
    assert x["rc"] == pytest.approx(want, rel=1e-6)
  div = res["diversity"]["factual"]
  assert set(div["ref"]) == {"0.1", "1.5"}
  assert div["ref"]["0.1"] > div["ref"]["1.5"]       # the peaked model repeats itself at low temperature
  for f in res["figures"].values():
    assert (out / f).is_file()
  assert set(res["figures"]) == {"winrate", "reward_dist", "diversity", "tension"}
  md = (out / "compare.md").read_text()
  assert "| other |" in md and "Avg" in md
