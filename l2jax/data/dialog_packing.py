"""SFT packing (Llama 2 section 3.1): encoded dialogs -> whole dialogs packed into rows -> global batches.

Packing (`pack_plan`): each epoch, dialogs in a seeded shuffled order (numpy PCG64 with (seed, epoch)) are put
first-fit into the last PACK_WINDOW open rows, a new row opened when none has room; rows leave in opening order.
A dialog is never split: its n tokens fill n - 1 slots (`tokens = ids[:-1]`, `targets = ids[1:]`) as one
segment; rows never mix epochs; all epochs' rows are concatenated and cut into global batches (the last one
padded with empty rows). Global batch b is rows [b*G, (b+1)*G); process p of P builds rows b*G + p*G/P ...
(its contiguous block), so the global batch does not depend on the number of processes.

Each batch (numpy, [B, T], B = this process's rows):
  tokens       int32    input ids (pad_id on padding)
  targets      int32    next token of the same dialog (pad_id on padding)
  segment_ids  int32    1, 2, ... per dialog within the row; 0 on padding
  positions    int32    0, 1, ... from each dialog's start
  loss_mask    float32  the answer mask shifted to targets: 1 where the target is an answer token or its EOS
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from l2jax.data.dialogs import Encoded

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
PACK_WINDOW = 16  # first-fit looks at the last PACK_WINDOW open rows


@dataclasses.dataclass
class PackPlan:
  """Rows of dialog numbers: row r holds members[row_offsets[r]:row_offsets[r+1]]; row_epoch[r] its epoch."""
  members: np.ndarray      # int64 [sum of row sizes]
  row_offsets: np.ndarray  # int64 [R + 1]
  row_epoch: np.ndarray    # int32 [R]

  @property
  def num_rows(self) -> int:
    return len(self.row_epoch)

  def row(self, r: int) -> np.ndarray:
    return self.members[self.row_offsets[r]:self.row_offsets[r + 1]]

  def num_batches(self, global_batch: int) -> int:
    return -(-self.num_rows // global_batch)

  def batches_per_epoch(self, global_batch: int) -> list[float]:
    return [float(np.sum(self.row_epoch == e)) / global_batch for e in range(int(self.row_epoch.max(initial=-1)) + 1)]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of dialogs in `epoch`: a permutation seeded by (seed, epoch), or 0..n-1."""
  return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def pack_plan(slots: np.ndarray, seq_len: int, *, seed: int = 0, epochs: int = 1, shuffle: bool = True,
              window: int = PACK_WINDOW) -> PackPlan:
  """First-fit packing of whole dialogs (each `slots[i]` <= seq_len input slots) per epoch (module docstring)."""
  slots = np.asarray(slots, np.int64)
  if len(slots) and slots.max() > seq_len:
    raise ValueError(f"a dialog needs {slots.max()} slots > seq_len={seq_len}; encode with the same seq_len")
  members, offsets, epochs_r = [], [0], []
  for e in range(epochs):
    open_rows: list[list] = []  # [free slots, [dialog numbers]]

    def close(row):
      members.extend(row[1])
      offsets.append(offsets[-1] + len(row[1]))
      epochs_r.append(e)

    for d in epoch_order(len(slots), seed, e, shuffle):
      need = int(slots[d])
      for row in open_rows:
        if row[0] >= need:
          row[0] -= need
          row[1].append(int(d))
          break
      else:
        open_rows.append([seq_len - need, [int(d)]])
        if len(open_rows) > window:
          close(open_rows.pop(0))
    for row in open_rows:
      close(row)
  return PackPlan(np.asarray(members, np.int64), np.asarray(offsets, np.int64), np.asarray(epochs_r, np.int32))


def empty_rows(n: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  rows = {k: np.zeros((n, seq_len), np.int32) for k in KEYS}
  rows["tokens"][:], rows["targets"][:] = pad_id, pad_id
  rows["loss_mask"] = np.zeros((n, seq_len), np.float32)
  return rows


def build_row(enc: Encoded, dialogs: Sequence[int], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """One packed row [T] from whole dialogs: tokens ids[:-1], targets ids[1:], loss_mask mask[1:] per segment."""
  row = {k: v[0] for k, v in empty_rows(1, seq_len, pad_id).items()}
  i = 0
  for seg, d in enumerate(dialogs, 1):
    ids, mask = enc.dialog(int(d))
    n = len(ids) - 1
    row["tokens"][i:i + n] = ids[:-1]
    row["targets"][i:i + n] = ids[1:]
    row["loss_mask"][i:i + n] = mask[1:]
    row["segment_ids"][i:i + n] = seg
    row["positions"][i:i + n] = np.arange(n)
    i += n
  return row


class PackedBatches:
  """Random access to this process's share of each global batch: `len` = batches, `[b]` -> {key: [B, T]}."""

  def __init__(self, enc: Encoded, plan: PackPlan, *, seq_len: int, global_batch: int, num_batches: int | None = None,
               process_index: int = 0, process_count: int = 1, pad_id: int = 0):
    if global_batch % process_count:
      raise ValueError(f"global_batch={global_batch} is not divisible by {process_count} processes")
    self.enc, self.plan, self.seq_len, self.pad_id = enc, plan, seq_len, pad_id
    self.global_batch, self.local = global_batch, global_batch // process_count
    self.first = process_index * self.local
    self.n = plan.num_batches(global_batch) if num_batches is None else num_batches

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, b: int) -> dict[str, np.ndarray]:
    out = empty_rows(self.local, self.seq_len, self.pad_id)
    for j in range(self.local):
      r = b * self.global_batch + self.first + j
      if r < self.plan.num_rows:
        for k, v in build_row(self.enc, self.plan.row(r), self.seq_len, self.pad_id).items():
          out[k][j] = v
    return out


def make_sft_iterator(enc: Encoded, *, seq_len: int, global_batch: int, seed: int = 0, epochs: int = 1,
                      shuffle: bool = True, num_batches: int | None = None, process_index: int = 0,
                      process_count: int = 1, pad_id: int = 0, read_threads: int = 2):
  """(grain iterator of this process's batches, PackPlan). The iterator's get_state() is a JSON-able dict and
  set_state() on a fresh iterator (same arguments) continues with the same batches.

  num_batches: stop after this many global batches (None: all batches of `epochs` epochs). The caller picks
  `epochs` large enough (see `epochs_for_steps`).
  """
  import grain
  plan = pack_plan(enc.slots, seq_len, seed=seed, epochs=epochs, shuffle=shuffle)
  src = PackedBatches(enc, plan, seq_len=seq_len, global_batch=global_batch, num_batches=num_batches,
                      process_index=process_index, process_count=process_count, pad_id=pad_id)
  ds = grain.MapDataset.source(src).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads))
  return iter(ds), plan


def epochs_for_steps(enc: Encoded, *, seq_len: int, global_batch: int, seed: int, epochs: int,
                     steps: int = 0) -> tuple[int, int]:
  """(epochs to plan, steps): steps = 0 -> all batches of `epochs` epochs; else enough epochs for `steps`."""
  plan = pack_plan(enc.slots, seq_len, seed=seed, epochs=epochs)
  n = plan.num_batches(global_batch)
  if steps <= 0:
    return epochs, n
  e = epochs
  while n < steps:  # more steps than `epochs` give: go on into further epochs
    e += 1
    n = pack_plan(enc.slots, seq_len, seed=seed, epochs=e).num_batches(global_batch)
  return e, steps
