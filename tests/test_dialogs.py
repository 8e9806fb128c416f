"""SFT dialogs: answer-only mask against Meta's format re-done with sentencepiece, readers, truncation, packing,
epochs, checkpointable iterator, bad records."""
import json
import re
import sys

import numpy as np
import pytest

from l2jax.data import dialogs as dl
from l2jax.data import dialog_packing as dp
from l2jax.data.sources import DataError
from l2jax.data.tokenizer import Tokenizer

SYSTEM = "You are a helpful, terse assistant."
THREE_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of Italy? "},
    {"role": "assistant", "content": "Rome, on the Tiber.\nIt has been the capital since 1871."},
    {"role": "user", "content": "Which one is larger?"},
    {"role": "assistant", "content": "Paris has about 2.1 million people; Rome about 2.8 million, so Rome."},
]


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
  return Tokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_path):
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))


def meta_exchanges(dialog):
  """Meta's chat_completion formatting (llama/generation.py), re-done here: (user, answer) strings."""
  if dialog[0]["role"] == "system":
    dialog = [{"role": dialog[1]["role"],
               "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]}] + dialog[2:]
  return [(p["content"].strip(), a["content"].strip()) for p, a in zip(dialog[::2], dialog[1::2])], dialog


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


def test_mask_is_exactly_the_answers_and_their_eos(tok, sp):
  ids, mask, dropped, trailing = dl.encode_dialog(tok, THREE_TURNS, 10_000)
  assert (dropped, trailing) == (0, False)
  exchanges, _ = meta_exchanges(THREE_TURNS)
  want_ids, want_mask, pos = [], [], 0
  for user, answer in exchanges:
    full = [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST] {answer} ") + [sp.eos_id()]
    answer_ids = ids[pos:pos + len(full)]
    m = mask[pos:pos + len(full)]
    n_prompt = m.index(1)
    assert answer_ids[0] == sp.bos_id() and answer_ids[-1] == sp.eos_id()
    assert sp.decode(full[:n_prompt]) == f"[INST] {user} [/INST]"   # the prompt part is exactly the user side
    assert sp.decode(full[n_prompt:-1]) == answer + " "              # the masked part is exactly the answer
    #                                              (with Meta's space before EOS) ...
    want_ids += full
    want_mask += [0] * n_prompt + [1] * (len(full) - n_prompt)       # ... and its EOS
    pos += len(full)
  assert ids == want_ids                                             # token by token
  assert mask == want_mask
  assert sum(mask) == sum(len(sp.encode(f"[INST] {u} [/INST] {a} ")) - len(sp.encode(f"[INST] {u} [/INST]")) + 1
                          for u, a in exchanges)
  # the system prompt sits inside the first [INST] and is never trained on
  first = sp.decode(ids[:mask.index(1)])
  assert first.startswith("[INST] <<SYS>>\n" + SYSTEM + "\n<</SYS>>\n\nWhat is the capital")


def test_packed_row_shifts_the_mask_to_targets(tok):
  enc = dl.encode_dialogs([THREE_TURNS, THREE_TURNS[1:3]], tok, seq_len=200)
  row = dp.build_row(enc, [0, 1], 200)
  ids0, m0 = enc.dialog(0)
  ids1, m1 = enc.dialog(1)
  n0, n1 = len(ids0) - 1, len(ids1) - 1
  np.testing.assert_array_equal(row["tokens"][:n0], ids0[:-1])
  np.testing.assert_array_equal(row["targets"][:n0], ids0[1:])
  np.testing.assert_array_equal(row["loss_mask"][:n0], m0[1:])
  np.testing.assert_array_equal(row["tokens"][n0:n0 + n1], ids1[:-1])
  np.testing.assert_array_equal(row["segment_ids"][:n0 + n1 + 1], [1] * n0 + [2] * n1 + [0])
  np.testing.assert_array_equal(row["positions"][n0:n0 + n1], np.arange(n1))
  assert row["loss_mask"][n0 + n1:].sum() == 0
  # a target is trained on iff it is an answer token: decoding the trained targets gives the answers + EOS
  assert (row["targets"][row["loss_mask"] == 1] == tok.eos_id).sum() == 4


def test_sft_tokens_extend_what_the_sampler_is_fed(tok):
  from l2jax.data.tokenizer import encode_chat
  ids, mask, _, _ = dl.encode_dialog(tok, THREE_TURNS, 10_000)
  history, prompt, ref = dl.prompt_for_sampling(tok, THREE_TURNS)
  assert history == THREE_TURNS[:-1] and ref == THREE_TURNS[-1]["content"]
  assert prompt == encode_chat(tok, THREE_TURNS[:-1])       # what chat / the sampling engine feeds the model
  assert ids[:len(prompt)] == prompt                         # SFT tokens: that prompt, then the answer
  assert mask[len(prompt) - 1] == 0 and all(mask[len(prompt):])
  assert tok.decode(ids[len(prompt):-1]) == ref + " " and ids[-1] == tok.eos_id
  # with a default system prompt, the same holds
  history, prompt, _ = dl.prompt_for_sampling(tok, THREE_TURNS[1:], system=SYSTEM)
  ids2, _, _, _ = dl.encode_dialog(tok, dl.with_system(THREE_TURNS[1:], SYSTEM), 10_000)
  assert ids2 == ids and ids2[:len(prompt)] == prompt


def test_truncation_policy_and_counts(tok):
  ids_all, _, _, _ = dl.encode_dialog(tok, THREE_TURNS, 10_000)
  last_two = [THREE_TURNS[0]] + THREE_TURNS[3:]
  ids_last_two, mask_last_two, _, _ = dl.encode_dialog(tok, last_two, 10_000)
  seq_len = len(ids_last_two) - 1          # fits the last two exchanges with the system prompt, not all three
  assert len(ids_all) - 1 > seq_len
  long_answer = [{"role": "user", "content": "Say a lot."}, {"role": "assistant", "content": "word " * 400}]
  records = [THREE_TURNS, long_answer, THREE_TURNS[1:6], [{"role": "user", "content": "Hello?"}]]
  enc = dl.encode_dialogs(records, tok, seq_len=seq_len)
  s = enc.stats
  assert (s["records"], s["dialogs"], s["truncated"], s["exchanges_dropped"], s["dropped_too_long"],
          s["trailing_user_dropped"], s["no_answer"]) == (4, 2, 1, 1, 1, 1, 1)
  ids, mask = enc.dialog(0)
  assert list(ids) == ids_last_two and list(mask) == mask_last_two   # oldest exchange gone, system kept
  assert tok.decode(list(ids[:20])).startswith("[INST] <<SYS>>\n" + SYSTEM)
  ids, mask = enc.dialog(1)                                          # trailing user message dropped
  assert list(ids) == dl.encode_dialog(tok, THREE_TURNS[1:5], 10_000)[0]
  assert all(enc.dialog(i)[1].sum() > 0 for i in range(len(enc)))   # never a dialog without answer tokens
  assert int(enc.slots.max()) <= seq_len


@pytest.fixture(scope="module")
def gsm8k_enc(tok, data_dir):
  src = dl.Gsm8k(data_dir / "gsm8k" / "test.jsonl")
  from l2jax.stages.common import Subset
  return dl.encode_dialogs(Subset(src, np.arange(60)), tok, seq_len=256)


def all_batches(it):
  return list(it)


def segments(batch):
  """(tokens, targets, loss_mask, positions) of every segment of every row."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, int(seg.max(initial=0)) + 1):
      sel = seg == s
      idx = np.flatnonzero(sel)
      assert np.all(np.diff(idx) == 1), "a segment is contiguous"
      out.append(tuple(batch[k][r][sel] for k in ("tokens", "targets", "loss_mask", "positions")))
  return out


def test_two_epochs_show_each_example_exactly_twice_whole_and_isolated(gsm8k_enc):
  enc = gsm8k_enc
  assert len(enc) > 30
  it, plan = dp.make_sft_iterator(enc, seq_len=256, global_batch=4, seed=3, epochs=2)
  batches = all_batches(it)
  assert len(batches) == plan.num_batches(4) and all(b["tokens"].shape == (4, 256) for b in batches)
  by_tokens = {tuple(enc.dialog(i)[0][:-1]): i for i in range(len(enc))}
  seen = []
  for b in batches:
    for toks, tgts, lm, pos in segments(b):
      i = by_tokens[tuple(toks)]                       # every segment is one whole dialog ...
      ids, mask = enc.dialog(i)
      np.testing.assert_array_equal(tgts, ids[1:])     # ... with its own next tokens (no target crosses dialogs)
      np.testing.assert_array_equal(lm, mask[1:])
      np.testing.assert_array_equal(pos, np.arange(len(toks)))
      seen.append(i)
    assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
  assert sorted(seen) == sorted(list(range(len(enc))) * 2)
  half = sum(plan.row_epoch == 0)
  epoch_of_row = [plan.row(r) for r in range(plan.num_rows)]
  e0 = np.concatenate(epoch_of_row[:half])
  e1 = np.concatenate(epoch_of_row[half:])
  assert sorted(e0) == sorted(e1) == list(range(len(enc))) and list(e0) != list(e1)  # reshuffled per epoch
  fill = enc.slots.sum() * 2 / (plan.num_rows * 256)
  assert fill > 0.7, fill


def test_iterator_resumes_from_json_state_and_shards_by_process(gsm8k_enc):
  kw = dict(seq_len=256, global_batch=4, seed=1, epochs=2)
  ref = all_batches(dp.make_sft_iterator(gsm8k_enc, **kw)[0])
  it = dp.make_sft_iterator(gsm8k_enc, **kw)[0]
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it2 = dp.make_sft_iterator(gsm8k_enc, **kw)[0]
  it2.set_state(state)
  rest = all_batches(it2)
  assert len(rest) == len(ref) - 5
  for a, b in zip(rest, ref[5:]):
    for k in dp.KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  p0 = all_batches(dp.make_sft_iterator(gsm8k_enc, process_index=0, process_count=2, **kw)[0])
  p1 = all_batches(dp.make_sft_iterator(gsm8k_enc, process_index=1, process_count=2, **kw)[0])
  for a, b, r in zip(p0, p1, ref):   # each process builds its half; together the same global batch
    assert a["tokens"].shape == (2, 256)
    for k in dp.KEYS:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), r[k])
  limited = all_batches(dp.make_sft_iterator(gsm8k_enc, num_batches=3, **kw)[0])
  assert len(limited) == 3


def test_epochs_for_steps(gsm8k_enc):
  kw = dict(seq_len=256, global_batch=4, seed=0)
  e, n = dp.epochs_for_steps(gsm8k_enc, epochs=2, **kw)
  assert e == 2 and n == dp.pack_plan(gsm8k_enc.slots, 256, seed=0, epochs=2).num_batches(4)
  assert dp.epochs_for_steps(gsm8k_enc, epochs=2, steps=5, **kw) == (2, 5)
  e, n = dp.epochs_for_steps(gsm8k_enc, epochs=1, steps=3 * n, **kw)
  assert n == 3 * dp.epochs_for_steps(gsm8k_enc, epochs=2, **kw)[1] and e >= 5


BAD = [
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "hello"}]}', "message 0: missing 'role'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "message 1 (assistant): empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"',
     "invalid JSON"),
    ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]}',
     "roles must alternate"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}',
     "message 1: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "roles must alternate"),
    ('{"text": "hello"}', "missing field 'messages'"),
]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("line,problem", BAD)
def test_bad_record_names_file_and_line(tmp_path, tok, line, problem):
  path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, line, GOOD])   # the bad record is on line 4
  src = dl.MessagesJsonl(path)
  with pytest.raises(DataError, match=r"d\.jsonl:4: .*" + re.escape(problem)):
    dl.encode_dialogs(src, tok, seq_len=64)


def test_bad_records_skipped_are_counted_and_reported(tmp_path, tok):
  path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [line for line, _ in BAD] + [GOOD])
  enc = dl.encode_dialogs(dl.MessagesJsonl(path), tok, seq_len=64, skip_bad=True)
  s = enc.stats
  assert len(enc) == 2 and s["skipped_bad"] == len(BAD)
  assert s["skipped"] == {"missing 'role'": 1, "empty content": 1, "invalid JSON": 1, "roles must alternate user/"
                          "assistant starting with user": 2, "unknown role 'bot'": 1, "missing field 'messages'": 1}
  assert s["skipped_examples"][0].endswith("d.jsonl:2: message 0: missing 'role' (keys: ['content'])")


def test_oasst_best_ranked_path_by_hand(data_dir):
  src = dl.OasstTrees(data_dir / "oasst" / "en_100_tree.jsonl")
  assert len(src) == 100
  dialogs = [src[i] for i in range(len(src))]                 # one dialog per tree, all valid
  assert all(d[-1]["role"] == "assistant" for d in dialogs)
  # tree on line 36, by hand: the prompt has replies ranked 0, 1, 2. Rank 0 ("I don't have personal
  # experience ...") has one follow-up question with no answer (dropped); the deeper branch under rank 1 is
  # not the best-ranked one, so the dialog is the prompt and the rank-0 answer.
  tree = json.loads((data_dir / "oasst" / "en_100_tree.jsonl").read_text().splitlines()[35])
  d = src[35]
  assert src.where(35).endswith("en_100_tree.jsonl:36")
  assert [m["role"] for m in d] == ["user", "assistant"]
  assert d[0]["content"] == "planning travel in hungary" == tree["prompt"]["text"]
  assert d[1]["content"] == tree["prompt"]["replies"][0]["text"]
  assert d[1]["content"].startswith("I don't have personal experience, but I can provid")
  # the first tree: the rank-0 answer of three
  assert [m["content"][:40] for m in dialogs[0]] == ["How can I find the best 401k plan for my",
                                                    "The first step is to research your optio"]


def test_oasst_rank_rules():
  node = lambda role, text, rank=None, replies=(), **kw: {"role": role, "text": text, "rank": rank,
                                                          "replies": list(replies), **kw}
  tree = {"message_tree_id": "t", "prompt": node("prompter", "Q1", replies=[
      node("assistant", "worse", rank=1, replies=[node("prompter", "Q2x", replies=[node("assistant", "A2x")])]),
      node("assistant", "deleted best", rank=0, deleted=True),
      node("assistant", "best", rank=0, replies=[
          node("prompter", "Q2 first unranked", replies=[
              node("assistant", "unranked"), node("assistant", "rejected", rank=0, review_result=False),
              node("assistant", "ranked", rank=3)]),
          node("prompter", "Q2 second")])])}
  d = dl.oasst_best_path(tree)
  assert [m["content"] for m in d] == ["Q1", "best", "Q2 first unranked", "ranked"]
  with pytest.raises(dl._Problem, match="unknown role 'moderator'"):
    dl.oasst_best_path({"prompt": node("moderator", "x")})


def test_gsm8k_reader(data_dir, tok):
  src = dl.Gsm8k(data_dir / "gsm8k" / "test.jsonl")
  assert len(src) == 1319
  first = json.loads((data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
  assert src[0] == [{"role": "user", "content": first["question"]}, {"role": "assistant", "content": first["answer"]}]
  ids, mask, _, _ = dl.encode_dialog(tok, src[0], 10_000)
  assert tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id]) == first["answer"].strip() + " "


def test_tfds_dialogs_without_tensorflow(tmp_path, tok):
  tfds = pytest.importorskip("tensorflow_datasets")

  class L2jaxTinyDialogs(tfds.core.GeneratorBasedBuilder):
    """3 dialogs, as a JSON text feature and as a Sequence({"role", "content"}), and a bad one."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "messages": tfds.features.Text(),
          "turns": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        m = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        yield i, {"messages": json.dumps(m), "turns": m}
      yield 3, {"messages": json.dumps([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]),
                "turns": [{"role": "user", "content": "q"}]}

  L2jaxTinyDialogs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = dl.open_dialogs("tfds", name="l2jax_tiny_dialogs", data_dir=str(tmp_path))
  seq = dl.open_dialogs("tfds", name="l2jax_tiny_dialogs", data_dir=str(tmp_path), field="turns")
  assert len(src) == 4   # TFDS stores records in its own (hashed) order
  bad = [i for i in range(4) if json.loads(src._ds[i]["messages"])[1]["role"] == "user"]
  good = [i for i in range(4) if i not in bad]
  assert [src[i] for i in good] == [seq[i] for i in good]
  assert sorted(src[i][0]["content"] for i in good) == ["question 0", "question 1", "question 2"]
  assert all(src[i][1] == {"role": "assistant", "content": src[i][0]["content"].replace("question", "answer")}
             for i in good)
  with pytest.raises(DataError, match=rf"l2jax_tiny_dialogs.*record {bad[0]}: roles must alternate"):
    dl.encode_dialogs(src, tok, seq_len=64)
  enc = dl.encode_dialogs(src, tok, seq_len=64, skip_bad=True)
  assert len(enc) == 3 and enc.stats["skipped_bad"] == 1
  enc = dl.encode_dialogs(seq, tok, seq_len=64)   # a one-message Sequence: no answer, counted, not an error
  assert len(enc) == 3 and enc.stats["no_answer"] == 1
  assert "tensorflow" not in sys.modules
