"""Random-access document sources for pretraining: plain text files, a JSONL field, a local TFDS dataset.

Every source is a sequence of documents: `len(src)` and `src[i] -> str`, so it feeds `grain.MapDataset.source(src)`.
Text and JSONL sources index their files once when built (byte spans per document, validated then) and read a
document back with `os.pread` on demand, so they hold no text in memory, are safe to read from several threads and
pickle into worker processes. TFDS datasets are read through `tfds.data_source` (array_record, no TensorFlow).

  TextSource(paths, split="paragraph"|"line"|"file")    documents = blank-line separated paragraphs | lines | files
  JsonlSource(paths, field="text", skip_bad=False)      documents = obj[field] of each line's JSON object
  TfdsSource(name, split="train", data_dir=None, field="text")
  open_source(spec)                                      any of the above from a dict / SourceSpec / config object
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TEXT_SPLITS = ("paragraph", "line", "file")
KINDS = ("text", "jsonl", "tfds")


class DataError(ValueError):
  """A data file or record is not what the pipeline expects; the message names file:line (or the source)."""


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
  """Expand a path, a glob pattern or a list of them into sorted existing files; a missing one -> FileNotFoundError."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out: list[Path] = []
  for p in paths:
    s = os.fspath(p)
    if glob.has_magic(s):
      hits = sorted(glob.glob(s))
      if not hits:
        raise FileNotFoundError(f"{s}: no file matches this pattern")
      out += [Path(h) for h in hits]
    elif not Path(s).is_file():
      raise FileNotFoundError(f"{s}: file not found" + (" (it is a directory)" if Path(s).is_dir() else ""))
    else:
      out.append(Path(s))
  if not out:
    raise DataError("no input files given")
  return out


class _SpanSource:
  """Documents stored as byte spans (file index, start, end) of local files, read back with os.pread."""

  name = "source"

  def __init__(self, files: list[Path], spans_n3: np.ndarray):
    self.files = files
    self._spans_n3 = spans_n3  # [n_docs, 3] int64: file index, byte start, byte end
    self._fds: dict[int, int] = {}  # file index -> descriptor, opened on first read
    self._lock = threading.Lock()
    if len(spans_n3) == 0:
      raise DataError(f"{self.name} {', '.join(map(str, files))}: no documents found (empty dataset)")

  def __len__(self) -> int:
    return len(self._spans_n3)

  def _read(self, index: int) -> bytes:
    if not -len(self) <= index < len(self):
      raise IndexError(f"document {index} out of range for {len(self)} documents")
    f, start, end = (int(x) for x in self._spans_n3[index])
    fd = self._fds.get(f)
    if fd is None:
      with self._lock:  # grain reads from several threads; pread itself needs no lock (it takes no file offset)
        fd = self._fds.get(f)
        if fd is None:
          fd = self._fds[f] = os.open(self.files[f], os.O_RDONLY)
    return os.pread(fd, end - start, start)

  def __getstate__(self):  # pickled into worker processes: descriptors and the lock are made anew there
    return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fds, self._lock = {}, threading.Lock()

  def __del__(self, _close=os.close):  # bound early: os may be torn down at interpreter exit
    for fd in getattr(self, "_fds", {}).values():
      try:
        _close(fd)
      except OSError:
        pass

  def __repr__(self) -> str:
    return f"{type(self).__name__}({len(self)} documents from {len(self.files)} file(s))"


def _line_spans(data: bytes) -> list[tuple[int, int]]:
  """Byte spans [start, end) of each line of `data`, without the line's "\\n" (or "\\r\\n")."""
  spans, start = [], 0
  while start < len(data):
    nl = data.find(b"\n", start)
    end = len(data) if nl < 0 else nl
    spans.append((start, end - 1 if end > start and data[end - 1:end] == b"\r" else end))
    start = end + 1
  return spans


def _check_utf8(path: Path, data: bytes) -> None:
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


class TextSource(_SpanSource):
  """Plain UTF-8 text files; documents are paragraphs (blank-line separated), non-blank lines, or whole files.

  A paragraph is a maximal run of non-blank lines, returned with its inner newlines and without the trailing one.
  Blank lines (whitespace only) never make documents; a whitespace-only file gives none in "file" mode.
  """

  name = "text source"

  def __init__(self, paths, split: str = "paragraph"):
    if split not in TEXT_SPLITS:
      raise ValueError(f"TextSource split must be one of {TEXT_SPLITS}, found {split!r}")
    self.split = split
    files = expand_paths(paths)
    spans = []
    for fi, path in enumerate(files):
      data = path.read_bytes()
      _check_utf8(path, data)
      if split == "file":
        if data.strip():
          spans.append((fi, 0, len(data)))
        continue
      para = None  # (start, end) of the paragraph being collected
      for s, e in _line_spans(data):
        blank = not data[s:e].strip()
        if split == "line":
          if not blank:
            spans.append((fi, s, e))
        elif blank:
          if para:
            spans.append((fi, *para))
          para = None
        else:
          para = (para[0] if para else s, e)
      if para:
        spans.append((fi, *para))
    super().__init__(files, np.asarray(spans, np.int64).reshape(-1, 3))

  def __getitem__(self, index: int) -> str:
    return self._read(index).decode("utf-8")


class JsonlSource(_SpanSource):
  """JSON Lines files; each non-blank line is a JSON object whose string `field` is one document.

  A line that is not valid JSON, not an object, or lacks a string `field` raises DataError naming file:line and the
  problem; with `skip_bad=True` such lines are skipped and counted instead: `.skipped` maps each problem to a count
  and `.skipped_examples` keeps the first few "file:line: problem" messages.
  """

  name = "JSONL source"

  def __init__(self, paths, field: str = "text", skip_bad: bool = False):
    self.field, self.skip_bad = field, skip_bad
    self.skipped: dict[str, int] = {}
    self.skipped_examples: list[str] = []
    files = expand_paths(paths)
    spans = []
    for fi, path in enumerate(files):
      data = path.read_bytes()
      for lineno, (s, e) in enumerate(_line_spans(data), 1):
        if not data[s:e].strip():
          continue
        problem = self._problem(data[s:e])
        if problem is None:
          spans.append((fi, s, e))
        elif skip_bad:
          self.skipped[problem] = self.skipped.get(problem, 0) + 1
          if len(self.skipped_examples) < 10:
            self.skipped_examples.append(f"{path}:{lineno}: {problem}")
        else:
          raise DataError(f"{path}:{lineno}: {problem}")
    super().__init__(files, np.asarray(spans, np.int64).reshape(-1, 3))

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def _problem(self, line: bytes) -> str | None:
    try:
      obj = json.loads(line)
    except UnicodeDecodeError as e:
      return f"not valid UTF-8 ({e.reason})"
    except json.JSONDecodeError as e:
      return f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
      return f"expected a JSON object, found {type(obj).__name__}"
    if self.field not in obj:
      return f"missing field {self.field!r} (keys: {sorted(obj)[:8]})"
    if not isinstance(obj[self.field], str):
      return f"field {self.field!r} is {type(obj[self.field]).__name__}, expected a string"
    return None

  def __getitem__(self, index: int) -> str:
    return json.loads(self._read(index))[self.field]


class TfdsSource:
  """A prepared local TFDS dataset read with `tfds.data_source` (array_record or parquet; no TensorFlow needed).

  `name` is a registered builder name or the name of a dataset prepared under `data_dir` (e.g. "my_text" or
  "my_text/config:1.0.0"); `field` names a Text / bytes / str feature. Nothing is downloaded.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
               field: str = "text"):
    import tensorflow_datasets as tfds
    self.name, self.split, self.data_dir, self.field = name, split, data_dir, field
    where = f"TFDS dataset {name!r} split {split!r}" + (f" in {data_dir}" if data_dir else "")
    if data_dir is not None and not Path(data_dir).is_dir():
      raise FileNotFoundError(f"{data_dir}: TFDS data_dir not found (for {where})")
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(f"{where}: dataset not found (prepare it with file_format='array_record')") from None
    except (ValueError, NotImplementedError, AssertionError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      if "can not be of 0 length" in msg:  # array_record's words for a split (slice) without records
        msg = "no documents found (empty dataset)"
      raise DataError(f"{where}: {msg}") from None
    self._where = where
    if len(self._ds) == 0:
      raise DataError(f"{where}: no documents found (empty dataset)")
    features = getattr(getattr(self._ds, "dataset_info", None), "features", None)
    if features is not None and hasattr(features, "keys") and field not in features.keys():
      raise DataError(f"{where}: no feature {field!r}; features are {sorted(features.keys())}")

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> str:
    value = self._ds[index][self.field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, bytes):
      return value.decode("utf-8")
    if isinstance(value, str):
      return value
    raise DataError(f"{self._where}: record {index} field {self.field!r} is {type(value).__name__}, expected text")

  def __repr__(self) -> str:
    return f"TfdsSource({self._where}, {len(self)} documents)"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Names a document source in a config.

  kind: "text" | "jsonl" | "tfds".  paths: file paths or glob patterns (text, jsonl).
  split: text -> "paragraph" | "line" | "file" (default "paragraph"); tfds -> the split (default "train").
  field: JSON key or TFDS feature holding the text.  name, data_dir: the TFDS dataset.
  skip_bad: JSONL only, skip and count bad lines instead of failing.
  """
  kind: str = "text"
  paths: tuple[str, ...] = ()
  split: str | None = None
  field: str = "text"
  name: str | None = None
  data_dir: str | None = None
  skip_bad: bool = False


def _as_spec(spec: Any) -> SourceSpec:
  fields = [f.name for f in dataclasses.fields(SourceSpec)]
  if isinstance(spec, SourceSpec):
    return spec
  if isinstance(spec, dict):
    unknown = sorted(set(spec) - set(fields))
    if unknown:
      raise ValueError(f"unknown source spec key(s) {unknown}; valid keys are {fields}")
    d = dict(spec)
  else:  # a config dataclass or namespace with (some of) the same attributes
    d = {f: getattr(spec, f) for f in fields if hasattr(spec, f)}
  if isinstance(d.get("paths"), (str, os.PathLike)):
    d["paths"] = (d["paths"],)
  d["paths"] = tuple(os.fspath(p) for p in d.get("paths") or ())
  return SourceSpec(**d)


def open_source(spec: Any):
  """Build the source a spec names (a dict, a SourceSpec, or an object with the same attributes).

  Missing files raise FileNotFoundError naming the path; a source without documents raises DataError.
  """
  s = _as_spec(spec)
  if s.kind not in KINDS:
    raise ValueError(f"source kind must be one of {KINDS}, found {s.kind!r}")
  if s.kind in ("text", "jsonl") and not s.paths:
    raise ValueError(f"a {s.kind} source needs paths")
  if s.kind == "text":
    return TextSource(s.paths, split=s.split or "paragraph")
  if s.kind == "jsonl":
    return JsonlSource(s.paths, field=s.field, skip_bad=s.skip_bad)
  if not s.name:
    raise ValueError("a tfds source needs a name")
  return TfdsSource(s.name, split=s.split or "train", data_dir=s.data_dir, field=s.field)
