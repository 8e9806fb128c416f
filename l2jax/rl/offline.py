"""Resumable, sharded offline generation: items -> JSONL records, one record per item, written as they finish.

Rejection sampling writes its K samples per prompt with it; Ghost Attention and any other "sample offline, then
fine-tune with the SFT loss" stage can reuse it (DESIGN.md section 6b).

  records = offline.run(items, key=lambda p: p.key, work=fn, out_dir=run_dir, name="samples", chunk=16)

Layout: `out_dir/shards/{name}.p{i:03d}.jsonl` (process i's own shard, appended one chunk at a time and
fsync'ed) and, once every item is done, `out_dir/{name}.jsonl` (all records in item order, written atomically
by process 0 through a temporary file and a rename). Each record carries `"key": key(item)`.

Resume: a killed run leaves its shard files; on restart the keys already present in ANY shard file are skipped,
so no item is done twice and none is lost (even when the number of processes changed). A half-written last
line (a kill mid-write) is cut off before appending. A complete `{name}.jsonl` means the phase is done.

Sharding over processes: item j (its position in `items`) goes to process j % process_count; every
process runs `work` on its share (on its own devices) and writes its own shard; then a barrier, and process 0
merges. Every process then reads the merged file. Needs a file system shared by the processes (the run
directory). `work` must be deterministic per item (seed by key) for a resumed run to equal an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["read_jsonl", "done_keys", "run", "write_jsonl_atomic", "shard_path"]


def read_jsonl(path: str | Path, *, repair: bool = False) -> list[dict]:
  """Records of a JSONL file; a last line without its newline (a write cut short) is ignored.

  repair=True also truncates the file to its last complete line, so appending continues on a clean line.
  A malformed complete line is an error naming file:line.
  """
  path = Path(path)
  if not path.exists():
    return []
  data = path.read_bytes()
  end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
  if repair and end < len(data):
    with open(path, "r+b") as f:
      f.truncate(end)
  out = []
  for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); remove the line or the file to redo it") from None
  return out


def shard_path(out_dir: str | Path, name: str, process_index: int) -> Path:
  return Path(out_dir) / "shards" / f"{name}.p{process_index:03d}.jsonl"


def done_keys(out_dir: str | Path, name: str) -> dict[str, dict]:
  """key -> record over every shard file of `name` (the first record of a key wins)."""
  out: dict[str, dict] = {}
  for p in sorted((Path(out_dir) / "shards").glob(f"{name}.p*.jsonl")):
    for r in read_jsonl(p):
      out.setdefault(r["key"], r)
  return out


def write_jsonl_atomic(path: str | Path, records: Sequence[dict]) -> None:
  """Write records to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _barrier(tag: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def run(items: Sequence[Any], *, key: Callable[[Any], str], work: Callable[[list], list[dict]], out_dir: str | Path,
        name: str, chunk: int, process_index: int = 0, process_count: int = 1,
        log: Callable[[str], None] | None = None) -> list[dict]:
  """All records of `name` in item order, running `work(items_chunk) -> records` (one per item, same order) on
  the items not yet done, `chunk` at a time, this process's share only. See the module docstring."""
  out_dir = Path(out_dir)
  merged = out_dir / f"{name}.jsonl"
  keys = [key(x) for x in items]
  if len(set(keys)) != len(keys):
    raise ValueError(f"{name}: item keys must be unique ({len(keys) - len(set(keys))} duplicates)")
  if merged.exists():
    recs = read_jsonl(merged)
    if [r["key"] for r in recs] == keys:
      return recs
  have = done_keys(out_dir, name)
  todo = [x for x, k in zip(items, keys) if k not in have]
  mine = [x for j, (x, k) in enumerate(zip(items, keys)) if j % process_count == process_index and k not in have]
  if log and have:
    log(f"{name}: {len(have)} of {len(items)} done before; {len(todo)} to do")
  path = shard_path(out_dir, name, process_index)
  path.parent.mkdir(parents=True, exist_ok=True)
  read_jsonl(path, repair=True)
  for i in range(0, len(mine), chunk):
    batch = mine[i:i + chunk]
    recs = work(batch)
    if len(recs) != len(batch):
      raise ValueError(f"{name}: work returned {len(recs)} records for {len(batch)} items")
    with open(path, "a") as f:
      for x, r in zip(batch, recs):
        f.write(json.dumps({**r, "key": key(x)}, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    if log:
      log(f"{name}: {min(i + chunk, len(mine))}/{len(mine)} items of this process ({len(items)} in all)")
  _barrier(f"l2jax-offline-{name}-done", process_count)
  if process_index == 0:
    have = done_keys(out_dir, name)
    missing = [k for k in keys if k not in have]
    if missing:
      raise RuntimeError(f"{name}: {len(missing)} items have no record after sampling (first: {missing[0]!r})")
    write_jsonl_atomic(merged, [have[k] for k in keys])
  _barrier(f"l2jax-offline-{name}-merged", process_count)
  return read_jsonl(merged)
