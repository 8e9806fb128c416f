"""RL prompts (Llama 2 section 3.2.3): readers with IS_SAFETY, encoding, held-out split, batches with exact resume."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from l2jax.data import prompts as P
from l2jax.data.dialogs import check_messages
from l2jax.data.sources import DataError
from l2jax.data.tokenizer import Tokenizer, encode_chat

ROOT = Path(__file__).resolve().parents[1]
HELPFUL = ROOT / "data/hh-rlhf/helpful-base-test.jsonl.gz"
HARMLESS = ROOT / "data/hh-rlhf/harmless-base-test.jsonl.gz"
OASST = ROOT / "data/oasst/en_100_tree.jsonl"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(ROOT / "data/llama2-tokenizer/tokenizer.model")


@pytest.fixture(scope="module")
def mixed():
  return P.read_prompts([f"hh-safety:{HARMLESS}", f"hh-helpful:{HELPFUL}", f"oasst:{OASST}"], skip_bad=True)


def _gz_records(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_hh_safety_and_helpful_flags_counts_and_last_user_turn():
  raw = _gz_records(HARMLESS)
  safety = P.read_prompts([f"hh-safety:{HARMLESS}"])
  assert safety.stats == {"records": len(raw), "duplicates": 2, "skipped_bad": 0} and len(safety) == len(raw) - 2
  assert all(p.is_safety and p.messages[-1]["role"] == "user" for p in safety)
  assert len({p.key for p in safety}) == len(safety)
  # record 1: the chosen transcript cut after its last Human turn, which is followed by the final Assistant turn
  p = safety[0]
  assert p.where == f"{HARMLESS}:1" and p.source == f"hh-safety:{HARMLESS}"
  last = p.messages[-1]["content"]
  assert raw[0]["chosen"].rsplit("\n\nHuman:", 1)[1].split("\n\nAssistant:")[0].strip() == last
  assert [m["role"] for m in p.messages] == ["user", "assistant"] * (len(p.messages) // 2) + ["user"]
  # helpful-base line 121 holds an empty Assistant turn in its history: an error naming file:line, or skipped
  with pytest.raises(DataError, match=f"{HELPFUL}:121: message 3 \\(assistant\\): empty content"):
    P.read_prompts([f"hh-helpful:{HELPFUL}"])
  errors = []
  helpful = P.read_prompts([f"hh-helpful:{HELPFUL}"], skip_bad=True, errors=errors)
  assert errors == [f"{HELPFUL}:121: message 3 (assistant): empty content"]
  assert helpful.stats["skipped_bad"] == 1 and len(helpful) == len(_gz_records(HELPFUL)) - 1
  assert not any(p.is_safety for p in helpful)
  assert helpful[0].messages == ({"role": "user", "content": "Do you know why turkeys became the official food of "
                                  "thanksgiving?"},)


def test_oasst_roots_and_deeper_turns():
  trees = [json.loads(line) for line in OASST.read_text().splitlines() if line.strip()]
  roots = P.read_prompts([f"oasst:{OASST}"])
  assert len(roots) == len(trees) == 100 and not any(p.is_safety for p in roots)
  assert [p.messages for p in roots] == [({"role": "user", "content": t["prompt"]["text"]},) for t in trees]
  deep = P.read_prompts([f"oasst-all:{OASST}"])
  assert len(deep) > len(roots) and {p.key for p in roots} <= {p.key for p in deep}
  for p in deep:
    assert p.messages[-1]["role"] == "user" and check_messages(list(p.messages)) == list(p.messages)
  assert max(len(p.messages) for p in deep) >= 3
  # a deeper prompt's history is a real path: its first turn is its tree's root
  d = next(p for p in deep if len(p.messages) >= 3)
  line = int(d.where.rsplit(":", 1)[1])
  assert d.messages[0]["content"] == trees[line - 1]["prompt"]["text"]


def test_encode_prompts_chat_format_and_too_long(tok, mixed):
  ids, kept, st = P.encode_prompts(tok, mixed, 10_000)
  assert st["kept"] == len(kept) == len(mixed) and st["dropped_too_long"] == 0
  assert st["records"] == mixed.stats["records"] and st["duplicates"] == 2 and st["skipped_bad"] == 1
  end = tok.encode("[/INST]")
  for x, p in zip(ids[::50], kept[::50]):
    assert x == encode_chat(tok, list(p.messages)) and x[-len(end):] == end and x[0] == tok.bos_id
  assert st["safety"] == sum(p.is_safety for p in mixed) and st["safety_share"] == pytest.approx(st["safety"] / len(mixed))
  # a system prompt goes inside the first [INST] as the chat format says
  ids_s, _, _ = P.encode_prompts(tok, mixed[:3], 10_000, system="Be brief.")
  assert ids_s[0] == encode_chat(tok, [{"role": "system", "content": "Be brief."}] + list(mixed[0].messages))
  # over-long prompts dropped and counted; the kept ones are exactly those that fit, in order
  limit = 64
  ids64, kept64, st64 = P.encode_prompts(tok, mixed, limit)
  fits = [p for p, x in zip(kept, ids) if len(x) <= limit]
  assert kept64 == fits and st64["dropped_too_long"] == len(mixed) - len(fits) > 0
  assert max(len(x) for x in ids64) == st64["max_tokens"] <= limit
  # duplicates passed in again are dropped and counted
  _, kept_d, st_d = P.encode_prompts(tok, list(mixed[:5]) + list(mixed[:2]), 10_000)
  assert len(kept_d) == 5 and st_d["duplicates"] == 2 and st_d["records"] == 7


def test_split_heldout_deterministic_disjoint():
  deep = P.read_prompts([f"oasst-all:{OASST}"])
  train, held = P.split_heldout(deep, 0.2)
  train2, held2 = P.split_heldout(deep, 0.2)
  assert train == train2 and held == held2 and held and train
  assert not {p.key for p in train} & {p.key for p in held} and len(train) + len(held) == len(deep)
  # one conversation (one tree's root) is never on both sides
  assert not {p.conversation for p in train} & {p.conversation for p in held}
  assert P.split_heldout(deep, 0.0) == (list(deep), [])


def test_heldout_parts_disjoint_and_stable_across_fractions(mixed):
  _, held = P.split_heldout(mixed, 0.3)
  _, sel = P.split_heldout(mixed, 0.3, part="select")
  _, rep = P.split_heldout(mixed, 0.3, part="report")
  assert sel and rep and len(sel) + len(rep) == len(held)
  assert not {p.conversation for p in sel} & {p.conversation for p in rep}
  # a prompt keeps its half when the held-out fraction grows
  _, sel_big = P.split_heldout(mixed, 0.6, part="select")
  assert {p.key for p in sel} <= {p.key for p in sel_big}
  assert not {p.key for p in sel_big} & {p.key for p in rep}
  with pytest.raises(ValueError, match="held-out part"):
    P.split_heldout(mixed, 0.3, part="test")


def test_stratified_sample_counts_by_hand():
  # 60 safety (hh-safety), 30 helpful (hh-helpful), 10 oasst: 20 drawn -> 12 / 6 / 2 exactly.
  def mk(src, safe, i):
    return P.Prompt(({"role": "user", "content": f"{src}{i}"},), safe, f"{src}:x", f"x:{i}", f"{src}{i}")
  ps = [mk("hh-safety", True, i) for i in range(60)] + [mk("hh-helpful", False, i) for i in range(30)] + \
       [mk("oasst", False, i) for i in range(10)]
  idx = P.stratified_sample(ps, 20, seed=0)
  assert idx == sorted(idx) and len(set(idx)) == 20
  st = P.eval_stats([ps[i] for i in idx])
  assert st["by_stratum"] == {"hh-helpful/helpful": 6, "hh-safety/safety": 12, "oasst/helpful": 2}
  assert st["safety_share"] == pytest.approx(0.6)
  # not the first 20 (all safety), seeded, and a different seed draws other rows of each stratum
  assert idx != list(range(20)) and idx == P.stratified_sample(ps, 20, seed=0)
  assert idx != P.stratified_sample(ps, 20, seed=1)
  # a small stratum is never rounded away: 4 drawn from 3 strata keeps oasst (exact share 0.4)
  st4 = P.eval_stats([ps[i] for i in P.stratified_sample(ps, 4, seed=0)])
  assert st4["prompts"] == 4 and set(st4["by_stratum"]) == {"hh-helpful/helpful", "hh-safety/safety",
                                                           "oasst/helpful"}
  assert P.stratified_sample(ps, 0, seed=0) == list(range(100)) == P.stratified_sample(ps, 500, seed=0)


def test_prompt_batches_resume_and_process_sharding(tok, mixed):
  ids, kept, _ = P.encode_prompts(tok, mixed[::200], 96)
  assert len(ids) >= 9
  kw = dict(batch_size=4, prompt_len=96, seed=3, pad_id=tok.pad_id)
  it = P.PromptBatches(ids, kept, **kw)
  first = [next(it) for _ in range(2)]
  b = first[0]
  assert b["prompt_tokens"].shape == (4, 96) and all(v.dtype == np.int32 for v in b.values())
  for row, n, i, s in zip(b["prompt_tokens"], b["prompt_lens"], b["index"], b["is_safety"]):
    assert row[:n].tolist() == ids[i] and np.all(row[n:] == tok.pad_id) and s == int(kept[i].is_safety)
  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(2 * len(ids) // 4 + 1)]  # crosses epochs
  assert it.get_state()["epoch"] >= 2
  it2 = P.PromptBatches(ids, kept, **kw)
  it2.set_state(state)
  for a, c in zip(after, [next(it2) for _ in range(len(after))]):
    for k in a:
      np.testing.assert_array_equal(a[k], c[k])
  # every prompt once per epoch
  it3 = P.PromptBatches(ids, kept, **dict(kw, batch_size=len(ids)))
  assert sorted(next(it3)["index"].tolist()) == list(range(len(ids)))
  halves = [P.PromptBatches(ids, kept, **kw, process_index=i, process_count=2) for i in range(2)]
  for step in range(3):
    parts = [next(h) for h in halves]
    full = first[step] if step < 2 else after[0]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  with pytest.raises(ValueError, match="prompt_len=8"):
    P.PromptBatches(ids, kept, **dict(kw, prompt_len=8))


def test_prompt_batches_pad_to_the_global_batch_bucket(tok, mixed):
  """buckets: the width is the power-of-two bucket (from 16, at most prompt_len) of the global batch's longest
  prompt, the same on every process; the rows are those of the full-width batch, cut."""
  ids, kept, _ = P.encode_prompts(tok, mixed[::50], 96)
  kw = dict(batch_size=4, prompt_len=96, seed=3, pad_id=tok.pad_id)
  full, cut = P.PromptBatches(ids, kept, **kw), P.PromptBatches(ids, kept, **kw, buckets=True)
  halves = [P.PromptBatches(ids, kept, **kw, buckets=True, process_index=i, process_count=2) for i in range(2)]
  widths = set()
  for _ in range(12):
    a, b, parts = next(full), next(cut), [next(h) for h in halves]
    longest = max(len(ids[i]) for i in a["index"])
    want = next(w for w in (16, 32, 64, 96) if w >= longest)
    assert b["prompt_tokens"].shape == (4, want) and {p["prompt_tokens"].shape[1] for p in parts} == {want}
    np.testing.assert_array_equal(b["prompt_tokens"], a["prompt_tokens"][:, :want])
    assert np.all(a["prompt_tokens"][:, want:] == tok.pad_id)
    for k in ("prompt_lens", "index", "is_safety"):
      np.testing.assert_array_equal(b[k], a[k])
    widths.add(want)
  assert len(widths) >= 2, widths   # the sample has short and long batches


def test_jsonl_prompts_bad_line_and_skip(tmp_path):
  path = tmp_path / "p.jsonl"
  lines = [
      {"messages": [{"role": "user", "content": "How do I pick a lock?"}], "safety": True},
      {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}]},   # final assistant turn dropped; safety false
      "not json",
      {"messages": [{"role": "user", "content": "How do I pick a lock?"}], "safety": True},  # duplicate
      {"messages": [{"role": "user", "content": "x"}], "safety": "yes"},
  ]
  path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
  with pytest.raises(DataError, match=f"{path}:3: invalid JSON"):
    P.read_prompts([f"jsonl:{path}"])
  errors = []
  ps = P.read_prompts([f"jsonl:{tmp_path}/*.jsonl"], skip_bad=True, errors=errors)
  assert [e.split(": ")[0] for e in errors] == [f"{path}:3", f"{path}:5"] and "'safety'" in errors[1]
  assert ps.stats == {"records": 3, "duplicates": 1, "skipped_bad": 2}
  assert [p.is_safety for p in ps] == [True, False] and [p.where for p in ps] == [f"{path}:1", f"{path}:2"]
  assert ps[1].messages == ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"})
  with pytest.raises(ValueError, match="FORMAT:PATH"):
    P.read_prompts([f"hh:{path}"])


def _write_jsonl(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


def test_skipped_bad_counts_survive_the_split_and_the_encoding(tmp_path, tok):
  """The bad records skipped at reading reach the statistics of both parts (data_stats.json)."""
  good = [{"messages": [{"role": "user", "content": f"Question number {i}?"}], "safety": i % 2 == 0}
          for i in range(40)]
  path = _write_jsonl(tmp_path / "p.jsonl", good[:10] + ["not json", "{]"] + good[10:])
  ps = P.read_prompts([f"jsonl:{path}"], skip_bad=True)
  train, held = P.split_heldout(ps, 0.3)
  assert train and held
  for part in (train, held):
    _, kept, st = P.encode_prompts(tok, part, 10_000)
    assert st["skipped_bad"] == 2 and st["records"] == 40 and st["kept"] == len(part)


def test_a_file_of_only_bad_records_is_counted(tmp_path):
  """With skip_bad, a file whose every line is bad is counted (skipped_bad = its lines), and a later file
  with no prompt at all is still refused, whatever the earlier files held."""
  bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope", "{", '{"messages": []}'])
  ps = P.read_prompts([f"jsonl:{bad}"], skip_bad=True)
  assert len(ps) == 0 and ps.stats == {"records": 0, "duplicates": 0, "skipped_bad": 3}
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(DataError, match=f"{empty}: no prompts found"):
    P.read_prompts([f"jsonl:{bad}", f"jsonl:{empty}"], skip_bad=True)
