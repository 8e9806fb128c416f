"""Pretraining pipeline: packing by hand, every token once per epoch, resumable state, shards, seeded shuffling."""
import collections
import json

import numpy as np
import pytest

from l2jax.data import pretrain
from l2jax.data.pretrain import KEYS, iterate_epoch, make_pretrain_iterator, pack_rows, tokenize_document
from l2jax.data.sources import JsonlSource, TextSource
from l2jax.data.tokenizer import Tokenizer

pytest.importorskip("grain")


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
  return Tokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="module")
def docs_path(tmp_path_factory, data_dir):
  """120 distinct documents of varied length (1 to ~300 tokens) as JSONL."""
  paras = TextSource(data_dir / "pretrain-text" / "tinyshakespeare.txt")
  texts = [f"Doc {i}. " + " ".join(paras[j] for j in range(i % 7)) for i in range(120)]
  path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def src(docs_path):
  return JsonlSource(docs_path)


def test_tokenize_bos_eos(tok):
  ids = tokenize_document(tok, "Hello world")
  assert ids.dtype == np.int32
  assert ids.tolist() == [tok.bos_id] + tok.encode("Hello world") + [tok.eos_id]


def test_packing_by_hand():
  docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 10, 11, 12, 2], [1, 13, 2]]
  rows = pack_rows(docs, seq_len=4, pad_id=0)
  want = [  # tokens, targets, segment_ids, positions, loss_mask
      ([1, 5, 6, 2], [5, 6, 2, 0], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 1, 0]),  # exact fit
      ([1, 7, 2, 1], [7, 2, 0, 8], [1, 1, 1, 2], [0, 1, 2, 0], [1, 1, 0, 1]),  # doc 3 starts; target crosses the row
      ([8, 9, 10, 11], [9, 10, 11, 12], [1, 1, 1, 1], [0, 1, 2, 3], [1, 1, 1, 1]),  # continuation: new segment
      ([12, 2, 1, 13], [2, 0, 13, 2], [1, 1, 2, 2], [0, 1, 0, 1], [1, 0, 1, 1]),
      ([2, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]),  # last row padded
  ]
  assert len(rows) == len(want)
  for row, w in zip(rows, want):
    for k, v in zip(KEYS, w):
      assert row[k].tolist() == v, (k, row[k], v)
    assert row["tokens"].dtype == np.int32 and row["loss_mask"].dtype == np.float32
  assert pack_rows([[1, 2]], seq_len=2)[0]["loss_mask"].tolist() == [1, 0]
  assert pack_rows([], seq_len=3) == []


def stream_of(batches, seq_len, workers=False):
  """Concatenate the non-padding slots of all rows, checking segment ids and positions: tokens, targets, loss_mask."""
  toks, tgts, mask = [], [], []
  for b in batches:
    assert all(b[k].shape[1] == seq_len for k in KEYS)
    for r in range(b["tokens"].shape[0]):
      keep = b["segment_ids"][r] > 0
      if not keep.any():  # a padding row: only in the last batch of a finite run
        assert (workers or b is batches[-1]) and not b["loss_mask"][r].any()  # (each worker pads its own end)
        continue
      # padding only at the end of a row, and segments numbered 1, 2, ... with positions restarting at 0
      assert keep.tolist() == sorted(keep.tolist(), reverse=True)
      seg, pos = b["segment_ids"][r][keep], b["positions"][r][keep]
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
      assert np.array_equal(pos, _ranks(seg))
      assert not np.any(b["loss_mask"][r][~keep])
      toks.append(b["tokens"][r][keep]), tgts.append(b["targets"][r][keep]), mask.append(b["loss_mask"][r][keep])
  return np.concatenate(toks), np.concatenate(tgts), np.concatenate(mask)


def _ranks(seg):
  """Position of each slot inside its segment: [0, 1, 2, 0, 1, ...]."""
  out = np.zeros(len(seg), np.int64)
  for i in range(1, len(seg)):
    out[i] = out[i - 1] + 1 if seg[i] == seg[i - 1] else 0
  return out


def split_docs(stream, bos):
  cuts = np.flatnonzero(stream == bos).tolist() + [len(stream)]
  assert cuts[0] == 0
  return [tuple(stream[a:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]


def check_stream(toks, tgts, mask, tok):
  """Every masked-in target is the next token of the stream, inside the same document; EOS is never an input target."""
  nxt = np.r_[toks[1:], -1]
  is_last = toks == tok.eos_id
  assert np.array_equal(mask == 1, ~is_last)
  assert np.array_equal(tgts[mask == 1], nxt[mask == 1])


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_every_token_once_per_epoch(src, tok, num_epochs):
  seq_len, bs = 32, 4
  docs = collections.Counter(tuple(tokenize_document(tok, src[i]).tolist()) for i in range(len(src)))
  batches = list(make_pretrain_iterator(src, tok, seq_len=seq_len, batch_size=bs, seed=7, num_epochs=num_epochs))
  assert all(b[k].shape == (bs, seq_len) for b in batches for k in KEYS)
  toks, tgts, mask = stream_of(batches, seq_len)
  check_stream(toks, tgts, mask, tok)
  got = collections.Counter(split_docs(toks, tok.bos_id))
  assert got == collections.Counter({d: n * num_epochs for d, n in docs.items()})
  total = sum(len(d) * n for d, n in docs.items()) * num_epochs
  assert len(toks) == total and len(batches) == -(-(-(-total // seq_len)) // bs)  # padding only at the very end
  if num_epochs == 1:
    stats = pretrain.epoch_stats(src, tok, seq_len=seq_len, batch_size=bs)
    assert stats["tokens"] == total and stats["batches"] == len(batches) and stats["documents"] == len(src)


def test_unshuffled_order_is_source_order(src, tok):
  batches = list(iterate_epoch(src, tok, seq_len=64, batch_size=2, shuffle=False))
  toks, _, _ = stream_of(batches, 64)
  want = np.concatenate([tokenize_document(tok, src[i]) for i in range(len(src))])
  assert np.array_equal(toks, want)


def first_docs(it, n_batches, tok):
  toks, _, _ = stream_of([next(it) for _ in range(n_batches)], 32)
  return split_docs(toks, tok.bos_id)[:-1]


def test_shuffle_seeded(src, tok):
  make = lambda seed: make_pretrain_iterator(src, tok, seq_len=32, batch_size=4, seed=seed)
  a, b, c = first_docs(make(1), 30, tok), first_docs(make(1), 30, tok), first_docs(make(2), 30, tok)
  assert a == b and a != c
  # epoch 2 is reshuffled: compare the first documents of each epoch of an unsharded forever-run
  docs = split_docs(stream_of(list(make_pretrain_iterator(src, tok, seq_len=32, batch_size=4, seed=1,
                                                            num_epochs=2)), 32)[0], tok.bos_id)
  assert docs[:len(src)] != docs[len(src):] and sorted(docs[:len(src)]) == sorted(docs[len(src):])


def assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("num_epochs, n", [(None, 7), (None, 23), (2, 40), (1, 1)])
def test_state_round_trip(src, tok, num_epochs, n):
  make = lambda: make_pretrain_iterator(src, tok, seq_len=32, batch_size=4, seed=3, num_epochs=num_epochs)
  it = make()
  for _ in range(n):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
  rest = [next(it) for _ in range(15)]
  fresh = make()
  next(fresh)  # a used iterator is overwritten by set_state too
  fresh.set_state(state)
  assert_same(rest, [next(fresh) for _ in range(15)])


def test_state_mid_document(tok):
  """A state saved while a long document is split across rows restores into the middle of it."""
  src = [" ".join(["word"] * 100), "short one", " ".join(["other"] * 60)]
  make = lambda: make_pretrain_iterator(src, tok, seq_len=16, batch_size=1, shuffle=False, num_epochs=1)
  it = make()
  next(it), next(it)
  state = it.get_state()
  assert state["offset"] == 32  # two rows of 16 into the first document (batch and map pass the packer's state)
  rest = list(it)
  fresh = make()
  fresh.set_state(json.loads(json.dumps(state)))
  assert_same(rest, list(fresh))


def test_process_shards_disjoint_and_complete(src, tok):
  all_docs = collections.Counter(tuple(tokenize_document(tok, src[i]).tolist()) for i in range(len(src)))
  union = collections.Counter()
  for p in range(3):
    batches = list(iterate_epoch(src, tok, seq_len=32, batch_size=2, seed=5, process_index=p, process_count=3))
    assert all(b["tokens"].shape == (2, 32) for b in batches)  # batch_size is per process
    toks, tgts, mask = stream_of(batches, 32)
    check_stream(toks, tgts, mask, tok)
    mine = collections.Counter(split_docs(toks, tok.bos_id))
    assert not (set(mine) & set(union))  # documents are distinct, so no overlap means disjoint shards
    union += mine
  assert union == all_docs
  with pytest.raises(ValueError, match="process_index"):
    make_pretrain_iterator(src, tok, seq_len=32, batch_size=4, process_index=3, process_count=3)


def test_specs_and_paths(docs_path, llama2_tokenizer_path):
  it = make_pretrain_iterator({"kind": "jsonl", "paths": [str(docs_path)]}, llama2_tokenizer_path,
                              seq_len=8, batch_size=2, seed=0)
  b = next(it)
  assert b["tokens"].shape == (2, 8) and b["loss_mask"].dtype == np.float32


@pytest.mark.slow
def test_worker_processes(src, tok):
  """worker_count > 0: grain worker processes; still a full epoch and a resumable JSON state (slow: ~10 s start)."""
  make = lambda: make_pretrain_iterator(src, tok, seq_len=32, batch_size=4, seed=3, num_epochs=1, worker_count=2)
  it = make()
  head = [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  toks, _, _ = stream_of(head + rest, 32, workers=True)  # workers interleave their batches, so compare token counts
  want = np.concatenate([tokenize_document(tok, src[i]) for i in range(len(src))])
  assert collections.Counter(toks.tolist()) == collections.Counter(want.tolist())
  fresh = make()
  fresh.set_state(state)
  assert_same(rest, list(fresh))
