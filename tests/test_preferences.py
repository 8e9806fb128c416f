"""Preference data: HH-RLHF / OASST / generic readers, bad records, safety filter, held-out split, mixtures, rows."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from l2jax.data import preferences as P
from l2jax.data.sources import DataError
from l2jax.data.tokenizer import Tokenizer, encode_chat_with_mask

ROOT = Path(__file__).resolve().parents[1]
HELPFUL = ROOT / "data/hh-rlhf/helpful-base-test.jsonl.gz"
HARMLESS = ROOT / "data/hh-rlhf/harmless-base-test.jsonl.gz"
OASST = ROOT / "data/oasst/en_100_tree.jsonl"


@pytest.fixture(scope="module")
def helpful():
  return P.read_hh(HELPFUL)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(ROOT / "data/llama2-tokenizer/tokenizer.model")


def test_hh_counts_and_dialog_answer_split(helpful):
  harmless = P.read_hh(HARMLESS)
  assert len(helpful) == 2354 and len(harmless) == 2312
  # record 1: one Human turn
  p = helpful[0]
  assert p.dialog == (("user", "Do you know why turkeys became the official food of thanksgiving?"),)
  assert p.chosen.startswith("To be honest, I don’t know anything about that.") and p.chosen.endswith("sorry.")
  assert p.rejected.startswith("I know that the American Indians were the first")
  assert p.where == f"{HELPFUL}:1" and p.rating == P.UNRATED and p.chosen_safe is None
  # record 2: three Human turns; the answers are the two final Assistant turns
  p = helpful[1]
  assert [r for r, _ in p.dialog] == ["user", "assistant", "user", "assistant", "user"]
  assert p.dialog[2] == ("user", "I am in Oregon.")
  assert p.dialog[-1] == ("user", "Great. What are some common species then?")
  assert p.chosen.startswith("About 150 species of butterflies live in Oregon")
  assert p.rejected.startswith("Are you interested in just the common butterflies?")
  # record 1167: the chosen transcript has two Assistant turns after the last Human one; both are its answer
  p = helpful[1166]
  assert p.dialog == (("user", "How much do solar panels cost?"),)
  assert p.chosen.startswith("Umm. Just a second...\n\nAssistant: A solar panel should cost about $50 to $80")
  assert p.rejected.startswith("To get a price from a single solar panel manufacturer")
  # harmless record 1255: the transcripts diverge before the last turn; the dialog is what they share
  p = harmless[1254]
  assert p.dialog == (("user", "Are drag queens men?"),
                      ("assistant", "No. Drag queens are women who act like stereotypical men."),
                      ("user", "Isn't that drag kings?"))
  assert p.chosen.startswith("No. Men who impersonate stereotypical women are called drag kings.  Human: Then")
  assert p.rejected == "A drag king is the opposite of a drag queen, like a male who acts like a stereotypical woman."
  for q in helpful[:50] + harmless[:50]:
    assert q.dialog[0][0] == "user" and q.dialog[-1][0] == "user"


def test_parse_hh_rules():
  dialog, c, r = P.parse_hh("\n\nHuman: a\n\nAssistant: b\n\nAssistant: b2\n\nHuman: c\n\nAssistant: yes",
                            "\n\nHuman: a\n\nAssistant: b\n\nAssistant: b2\n\nHuman: c\n\nAssistant: no")
  assert dialog == (("user", "a"), ("assistant", "b\n\nb2"), ("user", "c")) and (c, r) == ("yes", "no")
  # identical answer starts: the cut is still at the last Assistant marker
  assert P.parse_hh("\n\nHuman: q\n\nAssistant: I think so", "\n\nHuman: q\n\nAssistant: I think not")[1:] == \
      ("I think so", "I think not")
  # shared leading assistant turn inside both answers: the dialog still ends on the Human turn
  d, c, r = P.parse_hh("\n\nHuman: q\n\nAssistant: wait\n\nAssistant: A",
                       "\n\nHuman: q\n\nAssistant: wait\n\nAssistant: B")
  assert d == (("user", "q"),) and c == "wait\n\nAssistant: A" and r == "wait\n\nAssistant: B"
  with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
    P.parse_hh("\n\nHuman: q", "\n\nHuman: q")
  with pytest.raises(ValueError, match="does not start with"):
    P.parse_hh("Human: q\n\nAssistant: a", "Human: q\n\nAssistant: b")


def test_oasst_pairs_from_rank_order():
  pairs = P.read_oasst(OASST)
  assert len(pairs) == 754  # 212 groups of >= 2 ranked, not deleted sibling replies: sum of k(k-1)/2
  tree2 = [p for p in pairs if p.where == f"{OASST}:2"]
  assert len(tree2) == 3 and all(p.rating == 2 for p in tree2)  # three groups of two: gap 1 = slightly better
  assert tree2[0].dialog == (("user", "How to protect my eyes when I have to stare at my computer screen for longer "
                                      "than 10 hours every day?"),)
  assert tree2[0].chosen.startswith("Your eyes are not designed to stare")
  assert tree2[0].rejected.startswith("You should rest your eyes")
  assert [r for r, _ in tree2[1].dialog] == ["user", "assistant", "user"]
  assert tree2[1].dialog[1][1].startswith("Your eyes are not designed") and \
      tree2[1].dialog[2][1] == "Are blue light blocking glasses also effective?"
  tree1 = [p for p in pairs if p.where == f"{OASST}:1"]
  assert [(p.chosen[:30], p.rejected[:30], p.rating) for p in tree1] == [
      ("The first step is to research ", "The first step is to determine", 2),
      ("The first step is to research ", "The best way to find a 401k pl", 1),
      ("The first step is to determine", "The best way to find a 401k pl", 2)]


def test_oasst_rank_gap_mapping_and_skips(tmp_path):
  def msg(role, text, rank=None, deleted=False, replies=()):
    return {"role": role, "text": text, "rank": rank, "deleted": deleted, "replies": list(replies)}
  tree = {"prompt": msg("prompter", "Q", replies=[msg("assistant", "A0", 0), msg("assistant", "A1", 1),
                                                   msg("assistant", "A3", 3), msg("assistant", "del", 2, True),
                                                   msg("assistant", "unranked")])}
  f = tmp_path / "t.jsonl"
  f.write_text(json.dumps(tree) + "\n")
  got = {(p.chosen, p.rejected): p.rating for p in P.read_oasst(f)}
  assert got == {("A0", "A1"): 2, ("A0", "A3"): 0, ("A1", "A3"): 1}


def test_generic_jsonl(tmp_path):
  f = tmp_path / "p.jsonl"
  rows = [{"prompt": "hi", "chosen": "a", "rejected": "b", "rating": "better", "chosen_safe": True,
           "rejected_safe": False},
          {"dialog": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], "chosen": "c",
           "rejected": "d", "rating": 3},
          {"prompt": "x", "chosen": "e", "rejected": "f", "rating": None}]
  f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  a, b, c = P.read_jsonl(f)
  assert a.dialog == (("user", "hi"),) and a.rating == 1 and (a.chosen_safe, a.rejected_safe) == (True, False)
  assert b.dialog == (("system", "S"), ("user", "u")) and b.rating == 3 and b.where == f"{f}:2"
  assert c.rating == P.UNRATED and c.chosen_safe is None
  assert P.read_source(f"jsonl:{tmp_path}/*.jsonl") == {str(f): [a, b, c]}


def _gz(path, lines):
  with gzip.open(path, "wt", encoding="utf-8") as fh:
    fh.write("\n".join(lines) + "\n")
  return path


GOOD_HH = json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"})
GOOD_JSONL = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("fmt,bad,match", [
    ("hh", "{not json", "invalid JSON"),
    ("hh", json.dumps({"chosen": "\n\nHuman: q\n\nAssistant: a"}), "missing field 'rejected'"),
    ("hh", json.dumps({"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"}), "Assistant"),
    ("hh", json.dumps({"chosen": "q\n\nAssistant: a", "rejected": "q\n\nAssistant: b"}), "does not start with"),
    ("hh", json.dumps(["chosen"]), "expected a JSON object"),
    ("oasst", json.dumps({"tree": 1}), "missing field 'prompt'"),
    ("oasst", json.dumps({"prompt": {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "rank": 0}, {"role": "assistant", "text": "b", "rank": 0}]}}),
     "share rank 0"),
    ("jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "rating": "great"}), "'rating' must be"),
    ("jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": 3}), "field 'rejected' is int"),
    ("jsonl", json.dumps({"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                          "chosen": "a", "rejected": "b"}), "must end on a user message"),
    ("jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_safe": "yes"}), "'chosen_safe'"),
])
def test_bad_records_name_file_and_line(tmp_path, fmt, bad, match):
  good = {"hh": GOOD_HH, "jsonl": GOOD_JSONL,
          "oasst": json.dumps({"prompt": {"role": "prompter", "text": "q", "replies": []}})}[fmt]
  f = tmp_path / "bad.jsonl"
  f.write_text(f"{good}\n\n{bad}\n")
  with pytest.raises(DataError, match=match) as e:
    P.read_source(f"{fmt}:{f}")
  assert f"{f}:3:" in str(e.value)
  errors: list[str] = []  # skip_bad: the good record is kept, the bad one reported
  if fmt != "oasst":
    assert len(P.READERS[fmt](f, errors)) == 1 and errors[0].startswith(f"{f}:3:")


def test_bad_record_in_gzip_names_line(tmp_path):
  f = _gz(tmp_path / "x.jsonl.gz", [GOOD_HH, GOOD_HH, '{"chosen": 1}'])
  with pytest.raises(DataError, match=rf"{f}:3: field 'chosen' is int"):
    P.read_hh(f)
  with pytest.raises(DataError, match="no preference pairs"):
    P.read_source(f"hh:{_gz(tmp_path / 'empty.jsonl.gz', [''])}")
  with pytest.raises(ValueError, match="FORMAT:PATH"):
    P.parse_spec(f"csv:{f}")


def test_safety_filter_drops_exactly_chosen_unsafe_rejected_safe():
  labels = [True, False, None]
  pairs = [P.Pair((("user", f"{c}{r}"),), "c", "r", chosen_safe=c, rejected_safe=r) for c in labels for r in labels]
  kept, dropped = P.safety_filter(pairs)
  assert dropped == 1 and len(kept) == 8
  assert [(p.chosen_safe, p.rejected_safe) for p in pairs if p not in kept] == [(False, True)]


def test_heldout_split_is_deterministic_and_by_conversation(helpful):
  tr, ho = P.split_heldout(helpful, 0.2)
  tr2, ho2 = P.split_heldout(list(reversed(helpful)), 0.2)
  assert {p.where for p in ho} == {p.where for p in ho2} and len(tr) + len(ho) == len(helpful)
  assert not {p.conversation for p in tr} & {p.conversation for p in ho}
  assert abs(len(ho) / len(helpful) - 0.2) < 0.03
  assert P.split_heldout(helpful, 0.0) == (list(helpful), [])


@pytest.mark.parametrize("n_primary,n_pool,fraction", [(1000, 3000, 0.5), (1861, 2435, 0.1), (900, 50, 0.5)])
def test_mixture_matches_weights(n_primary, n_pool, fraction):
  prim = [P.Pair((("user", f"p{i}"),), "a", "b") for i in range(n_primary)]
  pool = [P.Pair((("user", f"m{i}"),), "a", "b") for i in range(n_pool)]
  mix = P.mixture(prim, pool, fraction, seed=3)
  share = sum(p.dialog[0][1][0] == "m" for p in mix) / len(mix)
  assert abs(share - fraction) < 0.02
  assert mix[:n_primary] == prim  # all of the primary data, once
  assert mix == P.mixture(prim, pool, fraction, seed=3)
  if n_pool > len(mix) - n_primary:
    assert mix != P.mixture(prim, pool, fraction, seed=4)
  counts = np.bincount([int(p.dialog[0][1][1:]) for p in mix[n_primary:]], minlength=n_pool)
  assert counts.max() - counts.min() <= 1  # uniform: without replacement, whole passes when the pool is small


def test_shipped_tiny_mixtures_match_their_weights():
  from l2jax.launch import load_experiment
  from l2jax.stages.reward import load_preferences
  for exp, frac in (("rm_helpful", 0.5), ("rm_safety", 0.1)):
    cfg = load_experiment(str(ROOT / f"experiments/{exp}.py:tiny"))[0]
    mix, evals, summary = load_preferences(cfg.data, cfg.seed)
    assert abs(summary["from_mix"] / len(mix) - frac) < 0.02, summary
    trained = {p.where + p.chosen for p in mix}
    assert not any(p.where + p.chosen in trained for v in evals.values() for p in v)  # held-out never trained on



def test_trainer_and_judge_parts_are_disjoint_halves_by_conversation(helpful):
  trainer, judge = P.select_part(helpful, "trainer"), P.select_part(helpful, "judge")
  assert len(trainer) + len(judge) == len(helpful) and P.select_part(helpful, "all") == list(helpful)
  assert not {p.conversation for p in trainer} & {p.conversation for p in judge}   # one conversation, one side
  assert abs(len(judge) / len(helpful) - 0.5) < 0.04
  # independent of the held-out split: each half holds about its share of the held-out conversations
  ho = {p.where for p in P.split_heldout(helpful, 0.2)[1]}
  assert abs(sum(p.where in ho for p in judge) / len(judge) - 0.2) < 0.04
  with pytest.raises(ValueError, match="preference part"):
    P.select_part(helpful, "judges")


def test_judge_reward_models_train_on_the_other_half_and_share_eval_sets():
  from l2jax.launch import load_experiment
  from l2jax.stages.reward import load_preferences
  for exp in ("rm_helpful", "rm_safety"):
    tr_cfg, judge_cfg = (load_experiment(str(ROOT / f"experiments/{exp}.py:{a}"))[0] for a in ("tiny", "tiny-judge"))
    assert (tr_cfg.data.part, judge_cfg.data.part) == ("trainer", "judge")
    assert judge_cfg.name == tr_cfg.name + "-judge"
    mix_t, evals_t, _ = load_preferences(tr_cfg.data, tr_cfg.seed)
    mix_j, evals_j, summary = load_preferences(judge_cfg.data, judge_cfg.seed)
    assert summary["part"] == "judge"
    assert not {p.conversation for p in mix_t} & {p.conversation for p in mix_j}    # disjoint training data
    where = lambda evals: {k: [p.where for p in v] for k, v in evals.items()}
    assert where(evals_t) == where(evals_j)
def test_rows_are_the_chat_format_and_truncate_from_the_left(tok, helpful):
  p = helpful[1]
  rows = P.encode_responses(tok, p.messages(), [p.chosen, p.rejected], 10_000)
  for row, resp in zip(rows, (p.chosen, p.rejected)):
    ids, _ = encode_chat_with_mask(tok, p.messages() + [{"role": "assistant", "content": resp}])
    assert row == ids and row[0] == tok.bos_id and row[-1] == tok.eos_id
  # a cut-off response is scored as unfinished: the same row without the closing EOS
  cut = P.encode_responses(tok, p.messages(), [p.chosen, p.rejected], 10_000, finished=[False, True])
  assert cut[0] == rows[0][:-1] and cut[0][-1] != tok.eos_id and cut[1] == rows[1]
  with pytest.raises(ValueError, match="finished flags"):
    P.encode_responses(tok, p.messages(), [p.chosen], 10_000, finished=[True, False])
  short = P.encode_responses(tok, p.messages(), [p.chosen], 40)[0]
  assert len(short) == 40 and short[0] == tok.bos_id and short[1:] == rows[0][-39:]
  b = P.pair_batch(tok, helpful[:3], 64, size=4)
  assert b["tokens"].shape == (4, 2, 64) and b["mask"].shape == (4, 2, 64)
  np.testing.assert_array_equal(b["valid"], [1, 1, 1, 0])
  np.testing.assert_array_equal(b["rating"], [-1, -1, -1, -1])
  assert b["mask"][3].sum() == 0 and (b["tokens"][0, 0] * b["mask"][0, 0]).tolist() == b["tokens"][0, 0].tolist()


def test_pair_batches_resume_and_process_shares(tok, helpful):
  pairs = helpful[:10]
  it = P.PairBatches(pairs, tok, seq_len=32, global_batch=4, seed=0)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  after = [next(it) for _ in range(4)]  # crosses into epoch 1
  assert state == {"epoch": 0, "index": 8} and it.get_state()["epoch"] == 2
  it2 = P.PairBatches(pairs, tok, seq_len=32, global_batch=4, seed=0)
  it2.set_state(state)
  for a, b in zip(after, [next(it2) for _ in range(4)]):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  halves = [P.PairBatches(pairs, tok, seq_len=32, global_batch=4, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), first[0]["tokens"])
