"""Ghost Attention data (Llama 2 section 3.3): answers sampled empty or cut off never enter the training data and are
counted, the examples file always reads back with the SFT reader, and a list file with invalid UTF-8 is named."""
import json
from pathlib import Path

import numpy as np
import pytest

from l2jax import config as c
from l2jax.data import dialogs as dl
from l2jax.data import gatt as gd
from l2jax.data.tokenizer import Tokenizer
from l2jax.rl import offline
from l2jax.stages import gatt as gs

REPO = Path(__file__).resolve().parents[1]
TOK = REPO / "data/llama2-tokenizer/tokenizer.model"
INST = gd.Instruction((gd.Constraint("end_sign", "!"),), short=False).to_json()


def _rec(sampled, reasons, repair=True):
  inst = gd.Instruction.from_json(INST)
  answers = [inst.repair(a) if repair else a for a in sampled]
  return {"instruction": INST, "users": [f"Question {i}?" for i in range(len(sampled))], "answers": answers,
          "sampled": list(sampled), "stop_reasons": list(reasons), "checks": [inst.checks(a) for a in answers],
          "repaired": [a != s for a, s in zip(answers, sampled)], "stop": "done"}


def test_gatt_writer_refuses_empty_blank_and_cut_off_answers_and_its_file_reads_back(tmp_path):
  records = [_rec(["Hello!", "Fine!"], ["eos", "eos"]),
             _rec(["Hello!", ""], ["eos", "eos"]),                 # first token EOS: repaired to "!" otherwise
             _rec(["  \n", "Fine!"], ["eos", "eos"]),              # blank
             _rec(["Hello!", "It was a long way to"], ["eos", "length"]),  # cut off, repaired to end with "!"
             _rec(["Hi!"], ["context"])]
  kept, dropped = gd.rejection_filter(records)
  assert [r["sampled"] for r in kept] == [["Hello!", "Fine!"]] and len(dropped) == 4
  loose, _ = gd.rejection_filter(records, keep_truncated=True)
  assert [r["sampled"][-1] for r in loose] == ["Fine!", "It was a long way to", "Hi!"]
  for name, recs in (("examples.jsonl", kept), ("loose.jsonl", loose)):
    exs, unreadable = gd.build_examples(recs, "system", all_prefixes=True)
    assert unreadable == 0 and len(exs) == sum(len(r["answers"]) for r in recs)
    offline.write_jsonl_atomic(tmp_path / name, [{"messages": m} for m in exs])
    enc = dl.encode_dialogs(dl.open_dialogs("messages", [str(tmp_path / name)]), Tokenizer(TOK), seq_len=256)
    assert len(enc) == len(exs)  # the SFT reader downstream takes every line (it raises on a bad one)
  stats = gs.sample_stats(records, kept, dropped, c.GAtt(init="x"))
  assert (stats["answers_empty"], stats["answers_truncated"], stats["answers"]) == (2, 2, 9)
  assert stats["dialogs_kept"] == 1 and stats["dialogs_rejected"] == 4 and not stats["keep_truncated"]


class FakeSampler:
  """Turn k of dialog j: "" (EOS first) for dialog 1 at turn 1, a cut-off answer for dialog 2, else "Yes!"."""

  class cfg:
    max_seq_len = 512

  def __init__(self):
    self.tokenizer = Tokenizer(TOK)

  def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
    out = type("Out", (), {})()
    out.tokens, out.lengths = np.arange(len(prompts), dtype=np.int32)[:, None], np.ones(len(prompts), np.int32)
    # seed 0: row seed = dialog * 101 + turn (l2jax.data.gatt.converse)
    self.texts = ["" if (s // 101, s % 101) == (1, 1) else "Yes!" for s in seed]
    out.stop_reasons = ["length" if s // 101 == 2 else "eos" for s in seed]
    return out

  def decode_new(self, prompt, new):
    return self.texts[int(new[0])]


def test_converse_records_stop_reasons_and_stops_a_dialog_at_an_empty_or_cut_off_answer():
  inst = gd.Instruction.from_json(INST)
  users = [["a", "b", "c"]] * 3
  out = gd.converse(FakeSampler(), [inst] * 3, users, mode="appended", repair=True, stop_on_fail=True, seed=0)
  assert [o["stop"] for o in out] == ["done", "empty", "truncated"]
  assert out[0]["stop_reasons"] == ["eos"] * 3 and len(out[1]["answers"]) == 2 and len(out[2]["answers"]) == 1
  assert out[1]["answers"][1] == "!" and out[1]["sampled"][1] == ""  # the repair hid the empty answer
  loose = gd.converse(FakeSampler(), [inst] * 3, users, mode="appended", repair=True, stop_on_fail=True, seed=0,
                      keep_truncated=True)
  assert [o["stop"] for o in loose] == ["done", "empty", "done"]


def test_list_file_with_invalid_utf8_names_file_and_line(tmp_path):
  for f in (REPO / "data/gatt").iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  (tmp_path / "words.txt").write_bytes(b"# start words\nIndeed\nWell\xff\xfe\n")
  with pytest.raises(ValueError, match=r"words\.txt:3: not valid UTF-8") as e:
    gd.load_lists(tmp_path)
  assert "\n" not in str(e.value)
  (tmp_path / "words.txt").write_bytes((REPO / "data/gatt/words.txt").read_bytes())
  (tmp_path / "languages.tsv").write_bytes(b"French\tle la les\nGerman\tder die \xc3\x28\n")
  with pytest.raises(ValueError, match=r"languages\.tsv:2: not valid UTF-8"):
    gd.load_lists(tmp_path)
  assert json.dumps(gd.load_lists(REPO / "data/gatt").values["end_sign"])  # the shipped lists still load
