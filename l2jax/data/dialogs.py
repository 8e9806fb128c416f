"""SFT data (Llama 2 section 3.1): dialogs -> chat-format tokens + answer-only loss mask -> packed rows -> batches.

"We zero-out the loss on tokens from the user prompt, so as a result, we backpropagate only on answer tokens."
A dialog is `[{"role": "system"|"user"|"assistant", "content": str}, ...]` (an optional system message first,
then user / assistant alternating). It is encoded with THE chat format of `tokenizer.py` (`encode_chat_with_mask`):
each exchange is BOS "[INST] {user} [/INST] {answer} " EOS, the system prompt inside the first [INST]. The answer
mask is 1 exactly on every assistant answer's tokens and the EOS closing it; the user side of every exchange
(BOS, [INST], the prompt, [/INST]) is 0. Optional message keys: "train": false on an assistant message (loss mask
0 on that answer), "finished": false on the last one (an answer cut off by a token limit: encoded without its
closing EOS, so fine-tuning never teaches the model to stop where the limit cut it).

Readers (random access: `len(src)`, `src[i] -> messages`; a bad record raises DataError "file:line: problem"):
  MessagesJsonl(paths)   {"messages": [{"role", "content"}, ...]} per line
  OasstTrees(paths)      OpenAssistant message trees (one per line): one dialog per tree along the best-ranked
                         replies (lowest `rank`; unranked after ranked; ties and follow-up prompts: file order;
                         deleted or review-rejected messages skipped); a trailing prompter message is dropped
  Gsm8k(paths)           {"question", "answer"} per line -> one exchange
  TfdsDialogs(name)      a local TFDS dataset (tfds.data_source, no TensorFlow); feature `field` holds the
                         messages (a JSON string, or a Sequence({"role", "content"})), or question / answer features

encode_dialogs(...) -> Encoded: every dialog tokenized once (ids, answer mask), with the truncation policy:
  a dialog ending on a user message loses that message (nothing to learn from it); a dialog without any answer
  is dropped; a dialog longer than the context (n tokens need n - 1 input slots <= seq_len) loses its OLDEST
  exchanges, whole, until it fits; the system prompt is kept (re-attached to the first kept user message, as
  the chat format places it); if the last exchange alone (with the system prompt) does not fit, the dialog is
  dropped. So every kept dialog ends on a complete answer and has answer tokens. All of it is counted in `stats`.

Packing into rows and batches: `l2jax/data/dialog_packing.py`.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Sequence

import numpy as np

from l2jax.data.sources import DataError, _line_spans, _SpanSource, expand_paths
from l2jax.data.tokenizer import ROLES, chat_exchanges, encode_chat, encode_chat_with_mask

KINDS = ("messages", "oasst", "gsm8k", "tfds")


class RecordError(DataError):
  """One bad record: `where` ("file:line" or "dataset record i") and `problem`."""

  def __init__(self, where: str, problem: str):
    super().__init__(f"{where}: {problem}")
    self.where, self.problem = where, problem


class _Problem(Exception):
  pass


def check_messages(messages: Any) -> list[dict]:
  """The dialog as [{"role", "content"}] or _Problem naming what is wrong (roles, order, empty content)."""
  if not isinstance(messages, list) or not messages:
    raise _Problem(f"expected a non-empty list of messages, found {type(messages).__name__} {str(messages)[:40]!r}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise _Problem(f"message {i}: expected an object, found {type(m).__name__}")
    for key in ("role", "content"):
      if key not in m:
        raise _Problem(f"message {i}: missing {key!r} (keys: {sorted(m)[:6]})")
    if m["role"] not in ROLES:
      raise _Problem(f"message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], str):
      raise _Problem(f"message {i}: content is {type(m['content']).__name__}, expected a string")
    if not m["content"].strip():
      raise _Problem(f"message {i} ({m['role']}): empty content")
    out.append({"role": m["role"], "content": m["content"]})
    if "train" in m:  # optional: "train": false on an assistant message puts loss mask 0 on that answer
      if m["role"] != "assistant" or not isinstance(m["train"], bool):
        raise _Problem(f"message {i} ({m['role']}): 'train' must be true or false, on assistant messages only")
      out[-1]["train"] = m["train"]
    if "finished" in m:  # optional: "finished": false on the last answer: it was cut off, so no closing EOS
      if m["role"] != "assistant" or not isinstance(m["finished"], bool) or i != len(messages) - 1:
        raise _Problem(f"message {i} ({m['role']}): 'finished' must be true or false, on the last (assistant) "
                       f"message only")
      out[-1]["finished"] = m["finished"]
  if any(m["role"] == "assistant" for m in out) and all(m.get("train", True) is False
                                                         for m in out if m["role"] == "assistant"):
    raise _Problem("every answer has \"train\": false; nothing to learn from")
  try:
    chat_exchanges(out)  # THE chat format's order rule: [system] user assistant user ...
  except ValueError as e:
    raise _Problem(str(e)) from None
  return out


# ----------------------------------------------------------------------------------------------- readers

class _JsonlDialogs(_SpanSource):
  """A JSONL file set, one record per non-blank line; `to_messages(obj)` makes the dialog (validated on read)."""

  name = "dialog source"

  def __init__(self, paths):
    files = expand_paths(paths)
    spans, lines = [], []
    for fi, path in enumerate(files):
      data = path.read_bytes()
      for lineno, (s, e) in enumerate(_line_spans(data), 1):
        if data[s:e].strip():
          spans.append((fi, s, e))
          lines.append(lineno)
    super().__init__(files, np.asarray(spans, np.int64).reshape(-1, 3))
    self._lines = np.asarray(lines, np.int64)

  def where(self, i: int) -> str:
    return f"{self.files[int(self._spans_n3[i, 0])]}:{int(self._lines[i])}"

  def __getitem__(self, i: int) -> list[dict]:
    raw = self._read(i)
    try:
      obj = json.loads(raw)
    except UnicodeDecodeError as e:
      raise RecordError(self.where(i), f"not valid UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
      raise RecordError(self.where(i), f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # Python's json recurses per level: e.g. an OpenAssistant tree thousands of turns deep
      raise RecordError(self.where(i), f"JSON nested too deeply to read (more than about "
                                       f"{sys.getrecursionlimit()} levels)") from None
    try:
      if not isinstance(obj, dict):
        raise _Problem(f"expected a JSON object, found {type(obj).__name__}")
      return self.to_messages(obj)
    except _Problem as e:
      raise RecordError(self.where(i), str(e)) from None

  def to_messages(self, obj: dict) -> list[dict]:  # each reader maps its record format to messages
    raise NotImplementedError(f"{type(self).__name__} must define to_messages")


class MessagesJsonl(_JsonlDialogs):
  """{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} per line."""

  name = "messages JSONL"

  def __init__(self, paths, field: str = "messages"):
    self.field = field
    super().__init__(paths)

  def to_messages(self, obj: dict) -> list[dict]:
    if self.field not in obj:
      raise _Problem(f"missing field {self.field!r} (keys: {sorted(obj)[:8]})")
    return check_messages(obj[self.field])


class Gsm8k(_JsonlDialogs):
  """GSM8K {"question", "answer"} per line -> [user: question, assistant: answer] (answer text as released)."""

  name = "GSM8K JSONL"

  def to_messages(self, obj: dict) -> list[dict]:
    return check_messages(_qa_messages(obj))


def _qa_messages(obj: dict) -> list[dict]:
  for key in ("question", "answer"):
    if key not in obj:
      raise _Problem(f"missing field {key!r} (keys: {sorted(obj)[:8]})")
  return [{"role": "user", "content": obj["question"]}, {"role": "assistant", "content": obj["answer"]}]


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_usable(node: Any) -> bool:
  return isinstance(node, dict) and not node.get("deleted", False) and node.get("review_result", True) is not False


def oasst_best_path(tree: dict) -> list[dict]:
  """The dialog along the best-ranked replies of an OpenAssistant message tree (see the module docstring).

  A loop, not a recursion: a tree any number of turns deep is walked without RecursionError.
  """
  node = tree.get("prompt") if isinstance(tree, dict) else None
  if not isinstance(node, dict):
    raise _Problem("expected an OpenAssistant message tree with a 'prompt' node")
  path, depth = [], 0
  while node is not None:
    for key in ("role", "text"):
      if key not in node:
        raise _Problem(f"message {depth}: missing {key!r} (keys: {sorted(node)[:8]})")
    if node["role"] not in OASST_ROLES:
      raise _Problem(f"message {depth}: unknown role {node['role']!r}; expected one of {sorted(OASST_ROLES)}")
    path.append({"role": OASST_ROLES[node["role"]], "content": node["text"]})
    replies = node.get("replies") or []
    if not isinstance(replies, list):
      raise _Problem(f"message {depth}: 'replies' is {type(replies).__name__}, expected a list")
    ok = [(i, r) for i, r in enumerate(replies) if _oasst_usable(r)]
    node, depth = None, depth + 1
    if ok:
      rank = lambda ir: (0, ir[1]["rank"], ir[0]) if isinstance(ir[1].get("rank"), (int, float)) else (1, 0, ir[0])
      node = min(ok, key=rank)[1]
  if path[-1]["role"] == "user" and len(path) > 1:
    path = path[:-1]  # a follow-up question nobody answered
  return check_messages(path)


class OasstTrees(_JsonlDialogs):
  """OpenAssistant message trees ({"message_tree_id", "prompt": node}, node {"role", "text", "replies", "rank"})."""

  name = "OpenAssistant trees"

  def to_messages(self, obj: dict) -> list[dict]:
    return oasst_best_path(obj)


class TfdsDialogs:
  """A prepared local TFDS dataset of dialogs, read with tfds.data_source (array_record; no TensorFlow)."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, field: str = "messages"):
    from l2jax.data.sources import TfdsSource
    try:
      src = TfdsSource(name, split=split, data_dir=data_dir, field=field)
    except DataError as e:
      if "no feature" not in str(e):
        raise
      try:  # question / answer pairs
        src = TfdsSource(name, split=split, data_dir=data_dir, field="question")
      except DataError:
        raise DataError(f"{e}; expected feature {field!r} (messages) or 'question' and 'answer'") from None
    self._ds, self._where, self.field = src._ds, src._where, field

  def __len__(self) -> int:
    return len(self._ds)

  def where(self, i: int) -> str:
    return f"{self._where} record {i}"

  def __getitem__(self, i: int) -> list[dict]:
    rec = {k: _text(v) for k, v in self._ds[int(i)].items()}
    try:
      value = rec.get(self.field)
      if value is None:
        return check_messages(_qa_messages(rec))
      if isinstance(value, str):
        try:
          value = json.loads(value)
        except json.JSONDecodeError as e:
          raise _Problem(f"feature {self.field!r}: invalid JSON ({e.msg} at column {e.colno})") from None
        value = value.get("messages") if isinstance(value, dict) else value
      elif isinstance(value, dict) and "role" in value and "content" in value:  # Sequence({"role", "content"})
        value = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"])]
      return check_messages(value)
    except _Problem as e:
      raise RecordError(self.where(i), str(e)) from None

  def __repr__(self) -> str:
    return f"TfdsDialogs({self._where}, {len(self)} records)"


def _text(v: Any) -> Any:
  """bytes -> str, recursively through arrays / lists / dicts (TFDS gives Text features as bytes)."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return _text(v.item()) if v.ndim == 0 else [_text(x) for x in v.tolist()]
  if isinstance(v, list):
    return [_text(x) for x in v]
  if isinstance(v, dict):
    return {k: _text(x) for k, x in v.items()}
  return v


def open_dialogs(kind: str, paths: Sequence[str] = (), *, name: str = "", split: str = "train",
                 data_dir: str = "", field: str = "messages"):
  """The reader for `kind` (one of KINDS)."""
  if kind not in KINDS:
    raise ValueError(f"data.kind: expected one of {KINDS}, found {kind!r}")
  if kind == "tfds":
    if not name:
      raise ValueError("data.kind=tfds needs data.name")
    return TfdsDialogs(name, split=split, data_dir=data_dir or None, field=field)
  if not paths:
    raise ValueError(f"data.kind={kind} needs data.paths")
  return {"messages": lambda: MessagesJsonl(paths, field=field), "oasst": lambda: OasstTrees(paths),
          "gsm8k": lambda: Gsm8k(paths)}[kind]()


# ----------------------------------------------------------------------------------------------- encoding

def with_system(messages: list[dict], system: str) -> list[dict]:
  """Prepend a default system prompt to a dialog that has none ("" = leave as is)."""
  if system and messages and messages[0]["role"] != "system":
    return [{"role": "system", "content": system}] + list(messages)
  return list(messages)


def encode_dialog(tok, messages: list[dict], max_tokens: int) -> tuple[list[int], list[int], int, bool] | None:
  """(ids, answer mask, exchanges dropped, trailing user dropped) under the truncation policy; None if dropped.

  At most `max_tokens` ids. The policy (module docstring): drop a trailing user message; drop the oldest
  exchanges while too long, keeping the system prompt; None when no answer is left or the last exchange alone
  does not fit.
  """
  system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
  turns = list(messages[1:] if system is not None else messages)
  trailing = bool(turns) and turns[-1]["role"] == "user"
  if trailing:
    turns = turns[:-1]
  if not turns:
    return None
  head = [{"role": "system", "content": system}] if system is not None else []
  k = len(turns) // 2
  for j in range(k):  # j = exchanges dropped from the left
    ids, mask = encode_chat_with_mask(tok, head + turns[2 * j:])
    answers = [m for m in turns[2 * j:] if m["role"] == "assistant"]
    if any(m.get("train", True) is False for m in answers):  # k-th run of mask ones = k-th answer (+ EOS)
      run, prev = -1, 0
      for t, bit in enumerate(list(mask)):
        run, prev = run + int(bool(bit) and not prev), bit
        if bit and answers[run].get("train", True) is False:
          mask[t] = 0
    if turns[-1].get("finished", True) is False and ids and ids[-1] == tok.eos_id:
      ids, mask = ids[:-1], mask[:-1]   # an answer cut off by a token limit is learnt without the EOS
    if len(ids) <= max_tokens:
      return ids, mask, j, trailing
  return None


def problem_kind(problem: str) -> str:
  """A problem without its record details, for counting: "message 2: missing 'role' (keys: ...)" -> "missing 'role'"."""
  p = re.sub(r"^message \d+( \(\w+\))?: ", "", problem)
  return re.split(r" \(|;|:", p)[0].strip()


@dataclasses.dataclass
class Encoded:
  """Kept dialogs, tokenized: dialog i is tokens[offsets[i]:offsets[i+1]] with its answer mask; index[i] its record."""
  tokens: np.ndarray   # int32 [N]
  mask: np.ndarray     # uint8 [N]
  offsets: np.ndarray  # int64 [n + 1]
  index: np.ndarray    # int64 [n] record index in the source
  stats: dict

  def __len__(self) -> int:
    return len(self.index)

  def dialog(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = self.offsets[i], self.offsets[i + 1]
    return self.tokens[a:b], self.mask[a:b]

  @property
  def slots(self) -> np.ndarray:
    """Input slots each dialog fills in a row: its length - 1. int64 [n]."""
    return np.diff(self.offsets) - 1


def encode_dialogs(source, tok, *, seq_len: int, system: str = "", skip_bad: bool = False,
                   max_examples: int = 10) -> Encoded:
  """Validate and tokenize every record of `source`, applying the truncation policy; count what happened.

  A bad record raises its RecordError ("file:line: problem") unless `skip_bad`, which counts it by problem.
  """
  toks, masks, offsets, index = [], [], [0], []
  st = {"records": len(source), "dialogs": 0, "skipped_bad": 0, "skipped": {}, "skipped_examples": [],
        "no_answer": 0, "trailing_user_dropped": 0, "truncated": 0, "exchanges_dropped": 0,
        "dropped_too_long": 0, "tokens": 0, "answer_tokens": 0}
  for i in range(len(source)):
    try:
      msgs = source[i]
    except RecordError as e:
      if not skip_bad:
        raise
      key = problem_kind(e.problem)
      st["skipped_bad"] += 1
      st["skipped"][key] = st["skipped"].get(key, 0) + 1
      if len(st["skipped_examples"]) < max_examples:
        st["skipped_examples"].append(str(e))
      continue
    msgs = with_system(msgs, system)
    if not any(m["role"] == "assistant" for m in msgs):
      st["no_answer"] += 1
      continue
    enc = encode_dialog(tok, msgs, seq_len + 1)
    if enc is None:
      st["dropped_too_long"] += 1
      continue
    ids, mask, dropped, trailing = enc
    st["trailing_user_dropped"] += int(trailing)
    st["truncated"] += int(dropped > 0)
    st["exchanges_dropped"] += dropped
    toks.append(np.asarray(ids, np.int32))
    masks.append(np.asarray(mask, np.uint8))
    offsets.append(offsets[-1] + len(ids))
    index.append(i)
  st["dialogs"] = len(index)
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros((0,), dt)
  enc = Encoded(cat(toks, np.int32), cat(masks, np.uint8), np.asarray(offsets, np.int64),
                np.asarray(index, np.int64), st)
  st["tokens"], st["answer_tokens"] = int(len(enc.tokens)), int(enc.mask.sum())
  return enc


def prompt_for_sampling(tok, messages: list[dict], system: str = "") -> tuple[list[dict], list[int], str]:
  """(history up to the last user message, its encode_chat ids -- what the sampler is fed --, reference answer)."""
  msgs = with_system(messages, system)
  last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
  history = msgs[:last]
  return history, encode_chat(tok, history), msgs[last]["content"].strip()
