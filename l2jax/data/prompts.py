"""RL prompts with their IS_SAFETY flag (Llama 2 section 3.2.3), for PPO and rejection sampling.

A prompt is a dialog ending on a user turn, to be answered by the policy. IS_SAFETY(p) marks prompts that
"might elicit potentially unsafe responses"; for them the combined reward Rc always takes the safety model
(l2jax.rl.rewards.combine). Sources in configs are "FORMAT:PATH" (PATH may be a glob):

  hh-safety   Anthropic HH-RLHF JSONL(.gz) (e.g. data/hh-rlhf/harmless-base-test.jsonl.gz): the "chosen"
              transcript up to and including its last Human turn (same-role runs joined by a blank line, the
              HH turn splitter of l2jax.data.preferences). IS_SAFETY true.
  hh-helpful  the same reader (e.g. data/hh-rlhf/helpful-base-test.jsonl.gz). IS_SAFETY false.
  oasst       OpenAssistant message trees, one per line (data/oasst/en_100_tree.jsonl): each tree's root prompt
              (a single user turn). IS_SAFETY false.
  oasst-all   the same trees, every usable prompter message (not deleted, not review-rejected) with its history,
              the path from the root through the assistant replies it follows. IS_SAFETY false.
  jsonl       {"messages": [{"role", "content"}, ...], "safety": bool}; a final assistant turn is dropped (one
              turn); "safety" may be omitted (false). Messages are validated by l2jax.data.dialogs.check_messages.

Prompt.key is a SHA-1 of the messages (roles and contents, as read); a prompt whose key was already read (in
spec order) is kept once, the first occurrence winning (with its flag). A bad record raises DataError
"file:line: problem"; with skip_bad it is skipped and counted (and its message appended to `errors`).

The held-out split (`split_heldout`) hashes the prompt's first user turn exactly as
l2jax.data.preferences.is_heldout hashes a pair's, so all prompts of one conversation fall on one side, and with
the same fraction an HH conversation held out from reward-model training is held out here too.

Encoding: the one Llama 2 chat format, l2jax.data.tokenizer.encode_chat on the messages (a default system
prompt is prepended when the dialog has none), ending with "[/INST]" ready for the answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2jax.data.dialogs import OASST_ROLES, _oasst_usable, _Problem, check_messages, with_system
from l2jax.data.preferences import _hh_turns, _json_object, _lines, _string, bucket_len
from l2jax.data.sources import DataError, expand_paths
from l2jax.data.tokenizer import encode_chat

FORMATS = ("hh-safety", "hh-helpful", "oasst", "oasst-all", "jsonl")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A dialog ending on a user turn. messages: ({"role", "content"}, ...); where: "file:line"; key: its hash."""
  messages: tuple[dict, ...]
  is_safety: bool
  source: str   # the "FORMAT:PATH" spec it was read from
  where: str
  key: str

  def __hash__(self) -> int:  # messages hold dicts; the key identifies the prompt
    return hash(self.key)

  @property
  def conversation(self) -> str:
    """The first user turn: what keeps one conversation on one side of the held-out split."""
    return next((m["content"] for m in self.messages if m["role"] == "user"), "")


def prompt_key(messages: Sequence[dict]) -> str:
  """Stable hex SHA-1 (16 digits) of the roles and contents of a dialog."""
  text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class Prompts(list):
  """read_prompts' result: a list of Prompt with `stats` {"records", "duplicates", "skipped_bad"}."""
  stats: dict


# ----------------------------------------------------------------------------------------------- readers

def _hh_prompt(obj: dict) -> list[list[dict]]:
  turns = _hh_turns(_string(obj, "chosen"))
  last = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=-1)
  if last < 0:
    raise _Problem("the chosen transcript has no Human turn")
  return [check_messages([{"role": r, "content": c} for r, c in turns[:last + 1]])]


def _oasst_prompts(obj: dict, deep: bool) -> list[list[dict]]:
  root = obj.get("prompt")
  if not isinstance(root, dict) or root.get("role") != "prompter":
    raise _Problem("expected an OpenAssistant message tree with a 'prompt' node of role 'prompter'")
  out: list[list[dict]] = []

  def walk(node: dict, history: list[dict], depth: int) -> None:
    for key in ("role", "text"):
      if key not in node:
        raise _Problem(f"message {depth}: missing {key!r} (keys: {sorted(node)[:8]})")
    if node["role"] not in OASST_ROLES:
      raise _Problem(f"message {depth}: unknown role {node['role']!r}; expected one of {sorted(OASST_ROLES)}")
    here = history + [{"role": OASST_ROLES[node["role"]], "content": node["text"]}]
    if node["role"] == "prompter":
      out.append(check_messages(here))
      if not deep:
        return
    replies = node.get("replies") or []
    if not isinstance(replies, list):
      raise _Problem(f"message {depth}: 'replies' is {type(replies).__name__}, expected a list")
    for r in replies:
      if _oasst_usable(r):
        walk(r, here, depth + 1)

  if _oasst_usable(root):
    walk(root, [], 0)
  return out


def _jsonl_prompt(obj: dict) -> tuple[list[list[dict]], bool]:
  if "messages" not in obj:
    raise _Problem(f"missing field 'messages' (keys: {sorted(obj)[:8]})")
  msgs = check_messages(obj["messages"])
  if msgs[-1]["role"] == "assistant":
    msgs = msgs[:-1]
  if msgs[-1]["role"] != "user":
    raise _Problem("no user turn to answer")
  safety = obj.get("safety", False)
  if not isinstance(safety, bool):
    raise _Problem(f"'safety' must be true or false, found {safety!r}")
  return [msgs], safety


def parse_spec(spec: str) -> tuple[str, str]:
  """"FORMAT:PATH" -> (format, path pattern)."""
  fmt, sep, pattern = spec.partition(":")
  if not sep or fmt not in FORMATS or not pattern:
    raise ValueError(f"prompt source {spec!r}: expected FORMAT:PATH with FORMAT one of {FORMATS}")
  return fmt, pattern


def _read_file(path: Path, fmt: str, spec: str, on_bad) -> list[Prompt]:
  out = []
  for lineno, line in _lines(path):
    where = f"{path}:{lineno}"
    try:
      obj = _json_object(line)
      safety = fmt == "hh-safety"
      if fmt in ("hh-safety", "hh-helpful"):
        dialogs = _hh_prompt(obj)
      elif fmt in ("oasst", "oasst-all"):
        dialogs = _oasst_prompts(obj, deep=fmt == "oasst-all")
      else:
        dialogs, safety = _jsonl_prompt(obj)
    except (ValueError, _Problem, RecursionError) as e:
      on_bad(f"{where}: {e}")
      continue
    out += [Prompt(tuple(m), safety, spec, where, prompt_key(m)) for m in dialogs]
  return out


def read_prompts(specs: Sequence[str], *, skip_bad: bool = False, errors: list | None = None) -> list[Prompt]:
  """The prompts of "FORMAT:PATH" sources, in spec, file and line order, each key once (module docstring).

  A bad record raises DataError "file:line: problem"; with skip_bad it is skipped, counted in the result's
  `stats["skipped_bad"]` and its message appended to `errors` (when given). Returns a `Prompts` list whose
  `stats` also hold "records" (prompts read, duplicates included) and "duplicates".
  """
  if isinstance(specs, str):
    specs = [specs]
  bad: list[str] = []

  def on_bad(msg: str) -> None:
    if not skip_bad:
      raise DataError(msg)
    bad.append(msg)

  out, seen, records = Prompts(), set(), 0
  for spec in specs:
    fmt, pattern = parse_spec(spec)
    for path in expand_paths(pattern):
      bad_before = len(bad)
      found = _read_file(path, fmt, spec, on_bad)
      if not found and len(bad) == bad_before:   # a file of only skipped bad records is counted, not refused
        raise DataError(f"{path}: no prompts found (read as {fmt!r})")
      records += len(found)
      for p in found:
        if p.key not in seen:
          seen.add(p.key)
          out.append(p)
  if errors is not None:
    errors += bad
  out.stats = {"records": records, "duplicates": records - len(out), "skipped_bad": len(bad)}
  return out


# ----------------------------------------------------------------------------------------------- split, encode

def is_heldout(prompt: Prompt, fraction: float) -> bool:
  """Deterministic held-out membership: CRC32 of the first user turn, as l2jax.data.preferences.is_heldout."""
  if fraction <= 0:
    return False
  return zlib.crc32(prompt.conversation.encode("utf-8")) % 10_000 < round(fraction * 10_000)


HELDOUT_PARTS = ("select", "report")


def heldout_part(prompt: Prompt) -> str:
  """Which half of the held-out prompts `prompt` belongs to: "select" or "report".

  The evaluation protocol: prompts that select a checkpoint (PPO's early stopping and `final/`, rejection
  sampling's Figure 8 temperature) and prompts that report a result (the versions' win rates, reward shift,
  Figure 11) must be disjoint, or the reported numbers are optimistic. Both halves are drawn from the held-out
  conversations (`is_heldout`), by a second CRC32 with its own salt so the halves are independent of the
  held-out fraction: a prompt keeps its half at every fraction.
  """
  return HELDOUT_PARTS[zlib.crc32(b"part:" + prompt.conversation.encode("utf-8")) % 2]


def split_heldout(prompts: Sequence[Prompt], fraction: float,
                  part: str | None = None) -> tuple[Prompts, Prompts]:
  """(train, held-out) by `is_heldout`, order kept; with `part` ("select" | "report") only that half of the
  held-out prompts is returned (the other half is in neither list).

  Both parts are `Prompts` carrying the reading's `stats` (records, duplicates, skipped_bad of the whole read,
  when `prompts` has them), so `encode_prompts` of either part still reports the bad records skipped.
  """
  if part is not None and part not in HELDOUT_PARTS:
    raise ValueError(f"held-out part: expected one of {HELDOUT_PARTS}, found {part!r}")
  held = [is_heldout(p, fraction) for p in prompts]
  train, kept = Prompts(p for p, h in zip(prompts, held) if not h), \
      Prompts(p for p, h in zip(prompts, held) if h and (part is None or heldout_part(p) == part))
  for x in (train, kept):
    if hasattr(prompts, "stats"):
      x.stats = dict(prompts.stats)
  return train, kept


def stratum(prompt: Prompt) -> tuple[str, bool]:
  """The stratum of an evaluation sample: (source format, IS_SAFETY)."""
  return prompt.source.split(":", 1)[0], prompt.is_safety


def stratified_sample(prompts: Sequence[Prompt], n: int, seed: int) -> list[int]:
  """Indices of a seeded sample of `n` of `prompts` (all when n <= 0 or n >= len), stratified by `stratum`.

  Each stratum gets n * its share, rounded by largest remainder (so a stratum never vanishes by rounding when n
  is at least the number of strata), drawn without replacement with numpy's Generator([seed, stratum index]).
  The result is in the original order. Never "the first n": the source order puts one source first, and an
  evaluation of the first n can see one kind of prompt only.
  """
  if n <= 0 or n >= len(prompts):
    return list(range(len(prompts)))
  groups: dict[tuple, list[int]] = {}
  for i, p in enumerate(prompts):
    groups.setdefault(stratum(p), []).append(i)
  keys = sorted(groups, key=lambda k: (k[0], k[1]))
  exact = [n * len(groups[k]) / len(prompts) for k in keys]
  take = [int(x) for x in exact]
  if n >= len(keys):  # every stratum at least one
    take = [max(t, 1) for t in take]
  while sum(take) > n:
    j = max((j for j in range(len(keys)) if take[j] > 1), key=lambda j: take[j] - exact[j])
    take[j] -= 1
  for j in sorted(range(len(keys)), key=lambda j: exact[j] - take[j], reverse=True):
    if sum(take) == n:
      break
    if take[j] < len(groups[keys[j]]):
      take[j] += 1
  picked = []
  for j, k in enumerate(keys):
    rng = np.random.default_rng([seed, j])
    picked += [groups[k][i] for i in rng.choice(len(groups[k]), size=take[j], replace=False)]
  return sorted(picked)


def eval_stats(prompts: Sequence[Prompt]) -> dict[str, Any]:
  """{"prompts", "safety_share", "by_stratum": {"FORMAT/safety|helpful": count}} of an evaluation set."""
  by: dict[str, int] = {}
  for p in prompts:
    src, safe = stratum(p)
    key = f"{src}/{'safety' if safe else 'helpful'}"
    by[key] = by.get(key, 0) + 1
  return {"prompts": len(prompts), "safety_share": sum(p.is_safety for p in prompts) / max(len(prompts), 1),
          "by_stratum": dict(sorted(by.items()))}


def encode_prompts(tok, prompts: Sequence[Prompt], max_prompt_tokens: int,
                   system: str = "") -> tuple[list[list[int]], list[Prompt], dict[str, Any]]:
  """(ids, kept prompts, stats): encode_chat of each prompt's messages (with `system` when it has none).

  Prompts of more than max_prompt_tokens tokens are dropped and counted; a key seen before is dropped as a
  duplicate. stats: records (read, duplicates included: the whole read's, from `Prompts.stats` when given
  one, as `read_prompts` and both parts of `split_heldout` give; else len(prompts)), kept, dropped_too_long,
  duplicates, skipped_bad (the read's bad records, from `Prompts.stats`), safety (kept safety prompts),
  safety_share, max_tokens, mean_tokens.
  """
  ids, kept, seen = [], [], set()
  dup, too_long = 0, 0
  for p in prompts:
    if p.key in seen:
      dup += 1
      continue
    seen.add(p.key)
    x = encode_chat(tok, with_system(list(p.messages), system))
    if len(x) > max_prompt_tokens:
      too_long += 1
      continue
    ids.append(x)
    kept.append(p)
  pre = getattr(prompts, "stats", {})
  n_safety = sum(p.is_safety for p in kept)
  lens = [len(x) for x in ids]
  stats = {"records": pre.get("records", len(prompts)), "kept": len(kept), "dropped_too_long": too_long,
           "duplicates": pre.get("duplicates", 0) + dup, "skipped_bad": pre.get("skipped_bad", 0),
           "safety": n_safety,
           "safety_share": n_safety / max(len(kept), 1), "max_tokens": max(lens, default=0),
           "mean_tokens": float(np.mean(lens)) if lens else 0.0}
  return ids, kept, stats


# ----------------------------------------------------------------------------------------------- batches

class PromptBatches:
  """Endless, deterministic prompt batches: epoch e visits the prompts in the order permutation([seed, e]).

  Each global batch is the next `batch_size` prompts of that stream (crossing into the next epoch); this
  process gets its contiguous share of batch_size / process_count rows (as preferences.PairBatches). Yields
  host dicts: prompt_tokens int32 [b, prompt_len] right-padded with pad_id, prompt_lens int32 [b],
  is_safety int32 [b] (0/1), index int32 [b] (into `prompts`). State {"epoch", "index"} is JSON and restores
  the exact stream. buckets: prompt_tokens is [b, W] with W = preferences.bucket_len(the longest prompt of the
  *global* batch, prompt_len), a power of two from 16 (so every process pads alike and the jitted programs see a
  few widths), instead of [b, prompt_len].
  """

  def __init__(self, ids: Sequence[Sequence[int]], prompts: Sequence[Prompt], *, batch_size: int, prompt_len: int,
               seed: int, pad_id: int, process_index: int = 0, process_count: int = 1, buckets: bool = False):
    if not ids:
      raise DataError("no prompts")
    if len(ids) != len(prompts):
      raise ValueError(f"{len(ids)} token rows for {len(prompts)} prompts")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} processes")
    for x, p in zip(ids, prompts):
      if len(x) > prompt_len:
        raise ValueError(f"{p.where}: prompt of {len(x)} tokens > prompt_len={prompt_len}")
    self.ids, self.prompts = [list(x) for x in ids], list(prompts)
    self.batch_size, self.local = batch_size, batch_size // process_count
    self.offset = process_index * self.local
    self.prompt_len, self.seed, self.pad_id, self.buckets = prompt_len, seed, pad_id, buckets
    self.epoch, self.index = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    picked = []
    for _ in range(self.batch_size):
      if self.index == len(self.ids):
        self.epoch, self.index = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
      picked.append(int(self._order[self.index]))
      self.index += 1
    mine = picked[self.offset:self.offset + self.local]
    width = bucket_len(max(len(self.ids[i]) for i in picked), self.prompt_len) if self.buckets else self.prompt_len
    tokens = np.full((len(mine), width), self.pad_id, np.int32)
    for r, i in enumerate(mine):
      tokens[r, :len(self.ids[i])] = self.ids[i]
    return {"prompt_tokens": tokens,
            "prompt_lens": np.asarray([len(self.ids[i]) for i in mine], np.int32).reshape(-1),
            "is_safety": np.asarray([int(self.prompts[i].is_safety) for i in mine], np.int32).reshape(-1),
            "index": np.asarray(mine, np.int32).reshape(-1)}

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: dict[str, Any]) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._order = self._permutation(self.epoch)
