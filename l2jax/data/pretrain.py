"""Pretraining data: documents -> BOS + ids + EOS -> packed rows with segment ids -> batches, with grain.

Pipeline (one process of `process_count`; deterministic; every stage checkpointable through grain's iterator state):
  source[process_index::process_count]        disjoint document shards per process (multi-host)
  -> shuffle(seed), reshuffled every epoch     grain index shuffle with seed + epoch
  -> repeat(num_epochs)                        None: forever
  -> tokenize                                  BOS + ids + EOS (Llama 2), int32 [n]
  -> pack into rows of T = seq_len tokens      greedy, in order, documents split across rows (rule below)
  -> batch                                     [batch_size, T] (this process's rows); a short last batch is padded

Packing rule (no token lost or duplicated): the token stream (documents one after another, in shuffled order) is cut
into rows of exactly T input tokens; only the very last row of a finite run is padded. A document that does not fit
in what is left of a row fills the row and continues at the start of the next row as a new segment whose positions
restart at 0 (so positions stay < T). Each token is an input exactly once per epoch. The target of an input is the
next token of the same document: inside a row that is the next slot; at the end of a row, when the document
continues, it is the first token of the next row. So a row is T + 1 tokens, `tokens = row[:-1], targets = row[1:]`,
consecutive rows overlapping by one token where a document crosses the boundary, and every within-document
next-token prediction is made exactly once; where the next token starts another document the target is pad_id.

Each element (numpy, [T] per row, [B, T] per batch):
  tokens       int32    input ids (pad_id on padding)
  targets      int32    next token of the same document (pad_id where there is none)
  segment_ids  int32    1, 2, 3, ... per document piece within the row; 0 on padding
  positions    int32    0, 1, ... from the start of each piece; 0 on padding
  loss_mask    float32  1 where the target is the real next token of the same document; 0 at a document's last
                        token (its EOS: the next token belongs to another document) and on padding
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from l2jax.data.sources import DataError, open_source

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def tokenize_document(tokenizer, text: str) -> np.ndarray:
  """BOS + SentencePiece ids + EOS of one document (Llama 2 pretraining convention); int32 [n + 2]."""
  return np.asarray(tokenizer.encode(text, bos=True, eos=True), np.int32)


class _Tokenize:
  """Picklable map from a document to its ids (grain may send it to worker processes)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> np.ndarray:
    return tokenize_document(self.tokenizer, text)


def empty_rows(n: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """n padding rows: every array [n, seq_len], segment 0, loss_mask 0."""
  row = {k: np.zeros((n, seq_len), np.int32) for k in KEYS}
  row["tokens"][:], row["targets"][:] = pad_id, pad_id
  row["loss_mask"] = np.zeros((n, seq_len), np.float32)
  return row


class _PadBatch:
  """Pad a short batch (the end of a finite run) with padding rows to [batch_size, T]."""

  def __init__(self, batch_size: int, pad_id: int):
    self.batch_size, self.pad_id = batch_size, pad_id

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    b, t = batch["tokens"].shape
    if b == self.batch_size:
      return batch
    pad = empty_rows(self.batch_size - b, t, self.pad_id)
    return {k: np.concatenate([batch[k], pad[k]]) for k in KEYS}


@functools.cache
def _grain_types():
  """The packing IterDataset and its iterator (defined lazily so this module imports without grain)."""
  import grain

  class PackIterDataset(grain.IterDataset):
    """Packs a stream of token arrays [n] into rows {tokens, targets, segment_ids, positions, loss_mask} [T]."""

    def __init__(self, parent, seq_len: int, pad_id: int = 0):
      super().__init__(parent)
      if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, found {seq_len}")
      self.seq_len, self.pad_id = int(seq_len), int(pad_id)

    def __iter__(self):
      return PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id)

    def __str__(self) -> str:
      return f"PackIterDataset(seq_len={self.seq_len})"

  class PackIterator(grain.DatasetIterator):
    """State between rows: the parent's state before the document being packed, and the offset into it."""

    def __init__(self, parent, seq_len: int, pad_id: int):
      super().__init__(parent)
      self._t, self._pad = seq_len, pad_id
      self._doc_state = copy.deepcopy(parent.get_state())  # parent state just before `_doc` was read
      self._doc: np.ndarray | None = None  # [n] the document being packed (None: read the next one)
      self._offset = 0  # index in `_doc` of the next token to place

    def __next__(self) -> dict[str, np.ndarray]:
      t = self._t
      row = {k: v[0] for k, v in empty_rows(1, t, self._pad).items()}
      i, seg = 0, 0
      while i < t:
        if self._doc is None:
          try:
            self._doc = np.asarray(next(self._parent), np.int32).reshape(-1)
          except StopIteration:
            break
        doc, off = self._doc, self._offset
        n = min(t - i, len(doc) - off)
        if n > 0:
          seg += 1
          row["tokens"][i:i + n] = doc[off:off + n]
          row["segment_ids"][i:i + n] = seg
          row["positions"][i:i + n] = np.arange(n)
          nxt = doc[off + 1:off + n + 1]  # [n] if the document goes on after this piece, else [n - 1]
          row["targets"][i:i + len(nxt)] = nxt
          row["loss_mask"][i:i + len(nxt)] = 1.0
          i += n
        self._offset = off + n
        if self._offset >= len(doc):
          self._doc, self._offset = None, 0
          self._doc_state = copy.deepcopy(self._parent.get_state())
      if i == 0:
        raise StopIteration
      return row

    def get_state(self) -> dict[str, Any]:
      return {"parent": copy.deepcopy(self._doc_state), "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
      self._parent.set_state(state["parent"])
      self._doc_state = copy.deepcopy(state["parent"])
      self._doc, self._offset = None, int(state["offset"])

    def __str__(self) -> str:
      return f"PackIterator(seq_len={self._t})"

  return PackIterDataset


def pack_rows(docs: Iterable[Sequence[int]], seq_len: int, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
  """Pack token lists in order into rows (the rule in the module docstring); each row's arrays are [seq_len]."""
  import grain
  ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset()
  return list(_grain_types()(ds, seq_len, pad_id))


def _as_tokenizer(tokenizer):
  if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
    from l2jax.data.tokenizer import Tokenizer
    return Tokenizer(tokenizer)
  return tokenizer


def _as_source(source):
  """A spec (dict, SourceSpec, config object with `kind`) -> its source; a sequence of documents as is."""
  return open_source(source) if isinstance(source, dict) or hasattr(source, "kind") else source


def make_pretrain_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                          shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                          process_count: int = 1, worker_count: int = 0, read_threads: int = 4):
  """The grain IterDataset of packed batches for this process; each element's arrays are [batch_size, T].

  source: a document source (sources.py) or a spec for `open_source`. tokenizer: a Tokenizer or its model path.
  batch_size: rows per batch of THIS process (the global batch // process_count); each process reads its own
  disjoint shard of documents (document i goes to process i % process_count).
  num_epochs: None repeats forever; otherwise the run ends after that many passes (packing runs on across epoch
  boundaries; the last row and batch are padded). Epoch e is shuffled with seed + e.
  worker_count > 0 packs in that many grain worker processes (each takes every worker_count-th document of the
  stream, so the batch order depends on worker_count; still deterministic and checkpointable).
  """
  import grain
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, found {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), found {process_index}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None or >= 1, found {num_epochs}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), found {seed}")
  source, tokenizer = _as_source(source), _as_tokenizer(tokenizer)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} gets no documents from {source!r}")
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(16, 8 * read_threads)))
  it = _grain_types()(it, seq_len, tokenizer.pad_id).batch(batch_size, drop_remainder=False)
  it = it.map(_PadBatch(batch_size, tokenizer.pad_id))
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags (DESIGN.md section 7)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def make_pretrain_iterator(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                           shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                           process_count: int = 1, worker_count: int = 0, read_threads: int = 4):
  """An iterator of this process's packed batches {tokens, targets, segment_ids, positions, loss_mask} [batch_size, T].

  It is a grain DatasetIterator: `get_state()` returns a JSON-serialisable dict, and `set_state(state)` on a freshly
  built iterator (same arguments) continues with exactly the same batches. See `make_pretrain_dataset`.
  """
  return iter(make_pretrain_dataset(
      source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, process_index=process_index, process_count=process_count,
      worker_count=worker_count, read_threads=read_threads))


def iterate_epoch(source, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The batches [batch_size, T] of exactly one epoch of this process's shard (a run with num_epochs=1)."""
  yield from make_pretrain_iterator(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                    shuffle=shuffle, num_epochs=1, process_index=process_index,
                                    process_count=process_count)


def epoch_stats(source, tokenizer, *, seq_len: int, batch_size: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, int | float]:
  """Documents, tokens, rows and batches in one epoch of this process's shard, without packing.

  Rows are ceil(tokens / seq_len) because only the last row of a run is padded; with several processes, the shards
  give different counts, so a multi-host run with finite epochs should stop at the smallest `batches`.
  """
  source, tokenizer = _as_source(source), _as_tokenizer(tokenizer)
  idx = range(process_index, len(source), process_count)
  tokens = sum(len(tokenize_document(tokenizer, source[i])) for i in idx)
  rows = -(-tokens // seq_len)
  return {"documents": len(idx), "tokens": tokens, "rows": rows, "batches": -(-rows // batch_size),
          "fill": tokens / (rows * seq_len) if rows else 0.0}
