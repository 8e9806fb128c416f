"""Preference pairs for reward models (Llama 2 section 3.2.2): readers, rating levels, the safety filter,
mixtures, held-out splits, and the token rows a reward model scores.

A pair is a dialog context (ending on a user turn), a chosen and a rejected response, an optional rating of
four levels (`RATINGS`, Table 8's columns) and optional per-response safety labels. Sources in configs are
"FORMAT:PATH" (PATH may be a glob):

  hh     Anthropic HH-RLHF JSONL(.gz): {"chosen": transcript, "rejected": transcript}, transcripts of
         "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. The dialog is the longest common prefix of the
         two transcripts cut back to its last "\\n\\nAssistant:" that follows a Human turn; each answer is the
         rest of its transcript (in a few records the transcripts diverge before the final turn, so an answer
         may span several turns: it is kept as text). Consecutive turns of one role in the dialog are joined
         with a blank line. HH pairs are unrated and have no safety labels.
  oasst  OpenAssistant message trees, one tree per line ({"prompt": message}, messages with "role"
         prompter|assistant, "text", "rank", "deleted", "replies"). Every two ranked, not deleted sibling
         assistant replies give a pair: the better rank (lower number) is chosen, the dialog is the path from
         the root. The rank gap maps to a rating (`OASST_GAP_RATING`): 1 -> slightly better, 2 -> better,
         3 or more -> significantly better. Ranks carry no tie information, so no OASST pair is
         "negligibly better / unsure".
  jsonl  generic: {"dialog": [{"role", "content"}, ...] ending on a user turn, or "prompt": str,
         "chosen": str, "rejected": str, optional "rating": a `RATINGS` name or 0..3 (0 = significantly
         better) or null, optional "chosen_safe" / "rejected_safe": bool, optional "chosen_finished" /
         "rejected_finished": bool (default true; false = cut off by a token limit, so scored with no EOS, as
         the RL stages score such a sample)}.

A bad record raises DataError naming file:line (with skip_bad, it is skipped and reported instead).

Token rows (the reward model's input, the one chat format of l2jax.data.tokenizer): encode_chat(dialog)
followed by the response's answer pieces from exchange_pieces, which end with EOS; i.e. exactly Meta's
encoding of the dialog with the response as the next assistant turn. The score is read at that final EOS.
A row longer than max_len keeps its BOS and its last max_len - 1 tokens (the dialog is cut from the left).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from l2jax.data.sources import DataError, expand_paths
from l2jax.data.tokenizer import Tokenizer, chat_exchanges, encode_chat, exchange_pieces

# Rating levels in Table 8's order; the margin tables in l2jax.losses.MARGINS use the same order.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better_or_unsure")
RATING_TITLES = ("Significantly Better", "Better", "Slightly Better", "Negligibly Better / Unsure")
UNRATED = -1
OASST_GAP_RATING = {1: 2, 2: 1}   # rank gap -> rating level; a gap of 3 or more -> 0 (significantly better)
FORMATS = ("hh", "oasst", "jsonl")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One comparison. dialog: ((role, content), ...) ending on "user"; rating: 0..3 or UNRATED."""
  dialog: tuple[tuple[str, str], ...]
  chosen: str
  rejected: str
  rating: int = UNRATED
  chosen_safe: bool | None = None
  rejected_safe: bool | None = None
  where: str = ""   # "file:line" of the record
  chosen_finished: bool = True     # False: the response was cut off by a token limit (scored without EOS)
  rejected_finished: bool = True

  def messages(self) -> list[dict]:
    return [{"role": r, "content": c} for r, c in self.dialog]

  @property
  def conversation(self) -> str:
    """The key that keeps one conversation on one side of a held-out split: its first user turn."""
    return next((c for r, c in self.dialog if r == "user"), "")


# ----------------------------------------------------------------------------------------------- readers

def _lines(path: Path) -> Iterable[tuple[int, str]]:
  """(line number, text) of the non-blank lines of a JSONL file, gzip-compressed if it ends in .gz."""
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if line.strip():
          yield lineno, line
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 ({e.reason})") from None
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}: cannot read ({e})") from None


def _json_object(line: str) -> dict:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
  except RecursionError:  # Python's json recurses per level: e.g. an OpenAssistant tree thousands of turns deep
    raise ValueError(f"JSON nested too deeply to read (more than about {sys.getrecursionlimit()} levels)") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
  return obj


def _string(obj: dict, key: str) -> str:
  if key not in obj:
    raise ValueError(f"missing field {key!r} (keys: {sorted(obj)[:8]})")
  if not isinstance(obj[key], str):
    raise ValueError(f"field {key!r} is {type(obj[key]).__name__}, expected a string")
  return obj[key]


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _hh_turns(text: str) -> list[tuple[str, str]]:
  """Turns of an HH transcript prefix ("\\n\\nHuman: ...\\n\\nAssistant: ..."), same-role runs joined."""
  if not text.startswith(HUMAN):
    raise ValueError(f"transcript does not start with {HUMAN!r}: {text[:40]!r}")
  turns: list[tuple[str, str]] = []
  i = 0
  while i < len(text):
    role, marker = ("user", HUMAN) if text.startswith(HUMAN, i) else ("assistant", ASSISTANT)
    start = i + len(marker)
    nxt = [j for j in (text.find(HUMAN, start), text.find(ASSISTANT, start)) if j >= 0]
    end = min(nxt) if nxt else len(text)
    content = text[start:end].strip()
    if turns and turns[-1][0] == role:
      turns[-1] = (role, turns[-1][1] + "\n\n" + content)
    else:
      turns.append((role, content))
    i = end
  return turns


def parse_hh(chosen: str, rejected: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
  """(dialog, chosen answer, rejected answer) from two HH transcripts (the rule in the module docstring)."""
  for text in (chosen, rejected):
    if not text.startswith(HUMAN):
      raise ValueError(f"transcript does not start with {HUMAN!r}: {text[:40]!r}")
  n = 0
  limit = min(len(chosen), len(rejected))
  while n < limit and chosen[n] == rejected[n]:
    n += 1
  # the last Assistant marker inside the shared prefix that opens an assistant run (follows a Human turn)
  cut, prev, i = -1, None, 0
  while True:
    h, a = chosen.find(HUMAN, i, n), chosen.find(ASSISTANT, i, n)
    if h < 0 and a < 0:
      break
    if a < 0 or 0 <= h < a:
      prev, i = "user", h + len(HUMAN)
    else:
      if prev == "user":
        cut = a
      prev, i = "assistant", a + len(ASSISTANT)
  if cut < 0:
    raise ValueError(f"no {ASSISTANT!r} turn after a Human turn before the two transcripts differ")
  dialog = _hh_turns(chosen[:cut])
  if not dialog or dialog[-1][0] != "user":
    raise ValueError("the shared dialog does not end on a Human turn")
  start = cut + len(ASSISTANT)
  return tuple(dialog), chosen[start:].strip(), rejected[start:].strip()


def read_hh(path: str | Path, errors: list[str] | None = None) -> list[Pair]:
  """Pairs of an Anthropic HH-RLHF JSONL(.gz) file; errors: collect "file:line: problem" and skip instead of raising."""
  path = Path(path)
  out = []
  for lineno, line in _lines(path):
    where = f"{path}:{lineno}"
    try:
      obj = _json_object(line)
      dialog, c, r = parse_hh(_string(obj, "chosen"), _string(obj, "rejected"))
      out.append(Pair(dialog, c, r, where=where))
    except ValueError as e:
      _bad(where, e, errors)
  return out


def _bad(where: str, e: Exception, errors: list[str] | None) -> None:
  if errors is None:
    raise DataError(f"{where}: {e}") from None
  errors.append(f"{where}: {e}")


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_tree_pairs(root: dict, where: str) -> list[Pair]:
  """Pairs of ranked sibling replies in one OpenAssistant message tree (`root`: its prompt message).

  Depth-first, each message's pairs before its replies', in file order; a loop with an explicit stack, not a
  recursion, so a tree any number of turns deep is walked without RecursionError. ValueError names what is wrong.
  """
  out: list[Pair] = []
  stack: list[tuple[Any, tuple[tuple[str, str], ...]]] = [(root, ())]  # (message, the dialog before it)
  while stack:
    msg, path_msgs = stack.pop()
    if not isinstance(msg, dict) or not isinstance(msg.get("text"), str) or msg.get("role") not in OASST_ROLES:
      raise ValueError(f"a message needs a string 'text' and role prompter|assistant, found "
                       f"{ {k: msg.get(k) for k in ('role', 'text')} if isinstance(msg, dict) else msg!r}")
    here = path_msgs + ((OASST_ROLES[msg["role"]], msg["text"].strip()),)
    replies = msg.get("replies", [])
    if not isinstance(replies, list):
      raise ValueError(f"'replies' is {type(replies).__name__}, expected a list")
    ranked = [m for m in replies if isinstance(m, dict) and not m.get("deleted") and m.get("rank") is not None
              and m.get("role") == "assistant"]
    if msg["role"] == "prompter" and len(ranked) >= 2:
      for m in ranked:
        if not isinstance(m["rank"], int) or not isinstance(m.get("text"), str):
          raise ValueError(f"reply {m.get('message_id')}: 'rank' must be an int and 'text' a string")
      ranked.sort(key=lambda m: m["rank"])
      for i, better in enumerate(ranked):
        for worse in ranked[i + 1:]:
          gap = worse["rank"] - better["rank"]
          if gap <= 0:
            raise ValueError(f"replies {better.get('message_id')} and {worse.get('message_id')} share rank "
                             f"{better['rank']}")
          out.append(Pair(here, better["text"].strip(), worse["text"].strip(), OASST_GAP_RATING.get(gap, 0),
                          where=where))
    stack += [(m, here) for m in reversed(replies) if not (isinstance(m, dict) and m.get("deleted"))]
  return out


def read_oasst(path: str | Path, errors: list[str] | None = None) -> list[Pair]:
  """Pairs of ranked sibling replies in OpenAssistant message trees (one tree per line; `oasst_tree_pairs`)."""
  path = Path(path)
  out: list[Pair] = []
  for lineno, line in _lines(path):
    where = f"{path}:{lineno}"
    try:
      obj = _json_object(line)
      if "prompt" not in obj:
        raise ValueError(f"missing field 'prompt' (keys: {sorted(obj)[:8]})")
      if not isinstance(obj["prompt"], dict) or obj["prompt"].get("role") != "prompter":
        raise ValueError("'prompt' must be a message with role 'prompter'")
      out += oasst_tree_pairs(obj["prompt"], where)
    except ValueError as e:
      _bad(where, e, errors)
  return out


def _rating(obj: dict) -> int:
  r = obj.get("rating")
  if r is None:
    return UNRATED
  if isinstance(r, str) and r in RATINGS:
    return RATINGS.index(r)
  if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < len(RATINGS):
    return r
  raise ValueError(f"'rating' must be one of {RATINGS}, an int 0..3 or null; found {r!r}")


def _safe(obj: dict, key: str) -> bool | None:
  v = obj.get(key)
  if v is not None and not isinstance(v, bool):
    raise ValueError(f"{key!r} must be true, false or null; found {v!r}")
  return v


def read_jsonl(path: str | Path, errors: list[str] | None = None) -> list[Pair]:
  """Pairs of a generic preference JSONL file (schema in the module docstring)."""
  path = Path(path)
  out = []
  for lineno, line in _lines(path):
    where = f"{path}:{lineno}"
    try:
      obj = _json_object(line)
      if "dialog" in obj:
        msgs = obj["dialog"]
        if not isinstance(msgs, list):
          raise ValueError(f"'dialog' is {type(msgs).__name__}, expected a list of messages")
        chat_exchanges(msgs)  # validates roles and order
        if msgs[-1]["role"] != "user":
          raise ValueError("'dialog' must end on a user message")
        dialog = tuple((m["role"], m["content"]) for m in msgs)
      else:
        dialog = (("user", _string(obj, "prompt")),)
      fin = [_safe(obj, k) for k in ("chosen_finished", "rejected_finished")]
      out.append(Pair(dialog, _string(obj, "chosen"), _string(obj, "rejected"), _rating(obj),
                      _safe(obj, "chosen_safe"), _safe(obj, "rejected_safe"), where,
                      fin[0] is not False, fin[1] is not False))
    except ValueError as e:
      _bad(where, e, errors)
  return out


READERS: dict[str, Callable[..., list[Pair]]] = {"hh": read_hh, "oasst": read_oasst, "jsonl": read_jsonl}


def parse_spec(spec: str) -> tuple[str, str]:
  """"FORMAT:PATH" -> (format, path pattern)."""
  fmt, sep, pattern = spec.partition(":")
  if not sep or fmt not in FORMATS or not pattern:
    raise ValueError(f"preference source {spec!r}: expected FORMAT:PATH with FORMAT one of {FORMATS}")
  return fmt, pattern


def read_source(spec: str, errors: list[str] | None = None) -> dict[str, list[Pair]]:
  """{file: pairs} for a "FORMAT:PATH" source (PATH may be a glob); a file without pairs is a DataError."""
  fmt, pattern = parse_spec(spec)
  out = {}
  for path in expand_paths(pattern):
    pairs = READERS[fmt](path, errors)
    if not pairs:
      raise DataError(f"{path}: no preference pairs found (read as {fmt!r})")
    out[str(path)] = pairs
  return out


# ----------------------------------------------------------------------------------------------- selection

def safety_filter(pairs: Sequence[Pair]) -> tuple[list[Pair], int]:
  """(kept, number dropped): drop pairs whose chosen response is unsafe while the rejected one is safe.

  Llama 2 section 3.2.2: safety labels are used so that pairs "where the chosen response was unsafe and the
  other response safe" are not included. Pairs with a missing label are kept.
  """
  kept = [p for p in pairs if not (p.chosen_safe is False and p.rejected_safe is True)]
  return kept, len(pairs) - len(kept)


def drop_identical(pairs: Sequence[Pair]) -> tuple[list[Pair], int]:
  """(kept, number dropped): drop pairs whose chosen and rejected answers are the same text.

  Such a pair says nothing about which answer is better: its ranking loss is the constant -log sigmoid(-m) whatever
  the model does, and its accuracy is a coin toss. The shipped HH-RLHF helpful test file holds 2.
  """
  kept = [p for p in pairs if p.chosen != p.rejected]
  return kept, len(pairs) - len(kept)


def is_heldout(pair: Pair, fraction: float) -> bool:
  """Deterministic held-out membership by a CRC32 of the conversation's first user turn (one conversation,
  e.g. all pairs of one OASST tree or of one HH prompt, is never on both sides)."""
  if fraction <= 0:
    return False
  return zlib.crc32(pair.conversation.encode("utf-8")) % 10_000 < round(fraction * 10_000)


def split_heldout(pairs: Sequence[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
  """(train, held-out) by `is_heldout`."""
  held = [is_heldout(p, fraction) for p in pairs]
  return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


DATA_PARTS = ("trainer", "judge")


def data_part(pair: Pair) -> str:
  """"trainer" or "judge": the half of the preference data a pair's conversation belongs to.

  A CRC32 of the first user turn with its own salt ("rm-part:"), so the halves are independent of the held-out
  split (`is_heldout`) and of the prompts' select / report halves (l2jax.data.prompts.heldout_part), and one
  conversation is never in both. Reward models trained on the two halves are disjoint: a judge trained on the
  "judge" half never saw a pair the policy's reward models (the "trainer" half) were trained on (section 3.4).
  """
  return DATA_PARTS[zlib.crc32(b"rm-part:" + pair.conversation.encode("utf-8")) % 2]


def select_part(pairs: Sequence[Pair], part: str) -> list[Pair]:
  """The pairs of `part` ("all" keeps every pair; "trainer" / "judge": `data_part`), order kept."""
  if part == "all":
    return list(pairs)
  if part not in DATA_PARTS:
    raise ValueError(f"preference part: expected 'all' or one of {DATA_PARTS}, found {part!r}")
  return [p for p in pairs if data_part(p) == part]


def mixture(primary: Sequence[Pair], pool: Sequence[Pair], fraction: float, seed: int) -> list[Pair]:
  """All of `primary` plus pairs sampled uniformly from `pool` so that they make `fraction` of the result.

  Llama 2 section 3.2.2 ("Data Composition"): the helpfulness RM takes all helpfulness data "combined with an
  equal part of the remaining data uniformly sampled from Meta Safety and from the open-source datasets"
  (fraction 0.5); the safety RM mixes safety and Anthropic harmless data with helpfulness data "in a 90/10
  proportion" (fraction 0.1). n = round(|primary| * fraction / (1 - fraction)) pairs are drawn without
  replacement; when the pool holds fewer, every pool pair is taken whole times and the rest drawn. The result
  is in primary-then-pool order; shuffling is the iterator's job.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"mixture fraction must be in [0, 1), found {fraction}")
  n = int(round(len(primary) * fraction / (1.0 - fraction)))
  if n == 0:
    return list(primary)
  if not pool:
    raise DataError(f"mixture: {n} pairs to draw for fraction {fraction}, but the mix sources hold no pairs")
  rng = np.random.default_rng(seed)
  whole, rest = divmod(n, len(pool))
  idx = np.concatenate([np.tile(np.arange(len(pool)), whole), rng.choice(len(pool), rest, replace=False)])
  return list(primary) + [pool[int(i)] for i in idx]


# ----------------------------------------------------------------------------------------------- tokens

def truncate_left(ids: list[int], max_len: int) -> list[int]:
  """Keep BOS and the last max_len - 1 tokens of a row that is too long."""
  return ids if len(ids) <= max_len else ids[:1] + ids[len(ids) - (max_len - 1):]


def encode_responses(tok: Tokenizer, messages: Sequence[dict], responses: Sequence[str],
                     max_len: int, finished: bool | Sequence[bool] = True) -> list[list[int]]:
  """Rows for one dialog context and each response: encode_chat(dialog) + answer pieces.

  A finished response ends with EOS, as Meta's chat format closes an answer. A response that was cut off by a
  token limit (finished False) gets no EOS: a reward model must score it as the unfinished answer it is, never
  as a complete one (so rejection sampling cannot pick, and fine-tune with an EOS, an answer stopped
  mid-sentence).
  """
  prompt, answers = response_pieces(tok, messages, responses, finished)
  return [truncate_left(prompt + answer, max_len) for answer in answers]


def response_pieces(tok: Tokenizer, messages: Sequence[dict], responses: Sequence[str],
                    finished: bool | Sequence[bool] = True) -> tuple[list[int], list[list[int]]]:
  """(prompt ids, answer ids of each response) of `encode_responses`' rows, before truncation: the prompt is
  encode_chat(dialog), each answer its exchange_pieces answer, ending with EOS only when finished."""
  prompt = encode_chat(tok, messages)
  last_user = chat_exchanges(messages)[-1][0]
  done = [finished] * len(responses) if isinstance(finished, bool) else list(finished)
  if len(done) != len(responses):
    raise ValueError(f"encode_responses: {len(done)} finished flags for {len(responses)} responses")
  answers = []
  for r, d in zip(responses, done):
    answer = exchange_pieces(tok, last_user, r)[1]
    if not d and answer and answer[-1] == tok.eos_id:
      answer = answer[:-1]
    answers.append(answer)
  return prompt, answers


def bucket_len(n: int, cap: int, minimum: int = 16) -> int:
  """The padded length of a batch whose longest row has n tokens: the next power of two >= max(n, minimum),
  at most cap (a few fixed shapes, so the jitted step compiles a bounded number of times)."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, cap)


def rows_to_arrays(rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) int32 [n, seq_len], right-padded with pad_id; mask 1 on real tokens."""
  tokens = np.full((len(rows), seq_len), pad_id, np.int32)
  mask = np.zeros((len(rows), seq_len), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return tokens, mask


def pair_batch_rows(tok: Tokenizer, pairs: Sequence[Pair], max_len: int) -> list[list[int]]:
  """The token rows of pairs: chosen, rejected, chosen, ... (each at most max_len tokens)."""
  rows: list[list[int]] = []
  for p in pairs:
    rows += encode_responses(tok, p.messages(), (p.chosen, p.rejected), max_len,
                             finished=(p.chosen_finished, p.rejected_finished))
  return rows


def pair_answer_lengths(tok: Tokenizer, pairs: Sequence[Pair]) -> list[int]:
  """Answer tokens of each row of the pairs (chosen, rejected, chosen, ...) before truncation: the exchange_pieces
  answer, with its EOS when the response is finished (`response_pieces`)."""
  return [len(a) for p in pairs
          for a in response_pieces(tok, p.messages(), (p.chosen, p.rejected), (p.chosen_finished,
                                                                               p.rejected_finished))[1]]


def answer_mask_rows(rows: Sequence[Sequence[int]], answer_lens: Sequence[int], seq_len: int) -> np.ndarray:
  """int32 [n, seq_len]: 1 on the answer tokens of each row. A row is prompt + answer, or, cut by `truncate_left`,
  BOS + its tail, so its answer is its last min(answer length, len(row) - 1) tokens either way."""
  mask = np.zeros((len(rows), seq_len), np.int32)
  for i, (r, a) in enumerate(zip(rows, answer_lens)):
    n = min(a, max(len(r) - 1, 0))
    mask[i, len(r) - n:len(r)] = 1
  return mask


def pair_batch(tok: Tokenizer, pairs: Sequence[Pair], seq_len: int, size: int | None = None,
               max_len: int | None = None, answer_mask: bool = False) -> dict[str, np.ndarray]:
  """A batch of `size` pairs (padding pairs have valid 0):
    tokens int32 [P, 2, T] (row 0 chosen, row 1 rejected), mask int32 [P, 2, T], rating int32 [P] (-1 unrated),
    valid float32 [P]; with answer_mask, also answer_mask int32 [P, 2, T] (`answer_mask_rows`: 1 on the answer
    tokens only, the prompt excluded). T = seq_len; rows are cut to max_len (default seq_len) tokens, which must
    fit in T."""
  size = len(pairs) if size is None else size
  rows = pair_batch_rows(tok, pairs, seq_len if max_len is None else max_len)
  if rows and max(len(r) for r in rows) > seq_len:
    raise ValueError(f"pair_batch: a row of {max(len(r) for r in rows)} tokens does not fit seq_len={seq_len}")
  answer_lens = pair_answer_lengths(tok, pairs) if answer_mask else []
  rows += [[]] * (2 * (size - len(pairs)))
  tokens, mask = rows_to_arrays(rows, seq_len, tok.pad_id)
  rating = np.full((size,), UNRATED, np.int32)
  rating[:len(pairs)] = [p.rating for p in pairs]
  valid = np.zeros((size,), np.float32)
  valid[:len(pairs)] = 1.0
  out = {"tokens": tokens.reshape(size, 2, seq_len), "mask": mask.reshape(size, 2, seq_len), "rating": rating,
         "valid": valid}
  if answer_mask:
    answer_lens += [0] * (len(rows) - len(answer_lens))
    out["answer_mask"] = answer_mask_rows(rows, answer_lens, seq_len).reshape(size, 2, seq_len)
  return out


class PairBatches:
  """Endless, deterministic batches of pairs: epoch e visits the pairs in the order permutation(seed + e).

  Each global batch is the next `global_batch` pairs of that stream (crossing into the next epoch); this
  process gets its contiguous share. State {"epoch", "index"} is JSON and restores the exact stream.
  buckets: pad each batch to `bucket_len` of the longest row of the *global* batch (the same on every process)
  instead of seq_len; a reward model reads its score at each row's last token and attention is causal, so the
  loss is that of the padded batch (tests/test_reward_buckets.py).
  answer_mask: batches also hold `pair_batch`'s answer_mask (DPO scores the answer tokens only).
  """

  def __init__(self, pairs: Sequence[Pair], tok: Tokenizer, *, seq_len: int, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, buckets: bool = False, answer_mask: bool = False):
    if not pairs:
      raise DataError("no training pairs")
    if global_batch % process_count:
      raise ValueError(f"global_batch={global_batch} is not divisible by {process_count} processes")
    self.pairs, self.tok, self.seq_len, self.seed = list(pairs), tok, seq_len, seed
    self.global_batch, self.local = global_batch, global_batch // process_count
    self.offset = process_index * self.local
    self.epoch, self.index = 0, 0
    self._order = self._permutation(0)
    self.buckets, self._lens, self.answer_mask = buckets, {}, answer_mask

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

  def _longest(self, picked: Sequence[int]) -> int:
    """Tokens of the longest row (chosen or rejected) of these pairs, cached per pair."""
    for i in picked:
      if i not in self._lens:
        self._lens[i] = max(len(r) for r in pair_batch_rows(self.tok, [self.pairs[i]], self.seq_len))
    return max(self._lens[i] for i in picked)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    picked = []
    for _ in range(self.global_batch):
      if self.index == len(self.pairs):
        self.epoch, self.index = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
      picked.append(int(self._order[self.index]))
      self.index += 1
    mine = picked[self.offset:self.offset + self.local]
    T = bucket_len(self._longest(picked), self.seq_len) if self.buckets else self.seq_len
    return pair_batch(self.tok, [self.pairs[i] for i in mine], T, max_len=self.seq_len, answer_mask=self.answer_mask)

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: dict[str, Any]) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._permutation(self.epoch)
