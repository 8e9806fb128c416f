"""Ghost Attention data (Llama 2 section 3.3): instructions, their checkers, the turn loop, and GAtt examples.

GAtt: for a dialog [u1, a1, ..., un, an] and an instruction `inst` that must hold throughout, sample the answers
with `inst` concatenated to EVERY user message ("sampling" prompts), then train on the dialog with `inst` kept
only in the first turn and the loss zeroed on every token but the last answer (and its EOS).

Instructions combine 1..k synthetic constraints of distinct kinds, each with a long and a short form (the paper
shortens half of the instructions: "Always act as Napoleon from now" -> "Figure: Napoleon."):

  kind        long form                                    short form         checker
  hobby       You enjoy Tennis.                            Hobby: Tennis.     none (needs a judge)
  language    Always speak in French.                      Language: French.  approximate (function words)
  figure      Always act as Napoleon from now.             Figure: Napoleon.  none (needs a judge)
  start_word  Start every answer with the word Indeed.     First word: Indeed.  exact (first word, any case)
  capitals    Write every answer in capital letters.       Capitals.          exact (letters, none lower case)
  end_sign    End every answer with "!".                   Last sign: "!".    exact (last non-space chars)

The rule kinds (start_word, capitals, end_sign) also have a `repair`: prefix the word, upper-case, append the
sign. The lists of values are data in data/gatt/ (hobbies.txt, languages.tsv, figures.txt, words.txt, signs.txt).

A sampled answer that is empty (first token EOS, or whitespace only) or cut off by max_new_tokens is never a
GAtt answer by default (`answer_problem`): a repair would make the first look like an answer and the second look
finished, and the SFT format closes every answer with EOS (DESIGN.md section 6b). Its dialog is rejected.

Placement of the instruction in a training example (`placement`): "system" (default) puts it in the system
prompt, which the Llama 2 chat format writes inside the first [INST] (and which the SFT truncation policy never
drops); "user" prepends it to the first user message. Either way it appears once, in the first turn.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import numpy as np

KINDS = ("hobby", "language", "figure", "start_word", "capitals", "end_sign")
RULE_KINDS = ("start_word", "capitals", "end_sign")
CHECKERS = {"hobby": None, "language": "approximate", "figure": None,
            "start_word": "exact", "capitals": "exact", "end_sign": "exact"}
TEMPLATES = {  # kind -> (long form, short form)
    "hobby": ("You enjoy {v}.", "Hobby: {v}."),
    "language": ("Always speak in {v}.", "Language: {v}."),
    "figure": ("Always act as {v} from now.", "Figure: {v}."),
    "start_word": ("Start every answer with the word {v}.", "First word: {v}."),
    "capitals": ("Write every answer in capital letters.", "Capitals."),
    "end_sign": ('End every answer with "{v}".', 'Last sign: "{v}".'),
}
LIST_FILES = {"hobby": "hobbies.txt", "figure": "figures.txt", "start_word": "words.txt", "end_sign": "signs.txt"}
PLACEMENTS = ("system", "user")


@dataclasses.dataclass(frozen=True)
class Lists:
  """Values of each constraint kind, and function words per language (for the language checker)."""
  values: dict                 # kind -> tuple of values ("capitals": ("",))
  stopwords: dict              # language -> frozenset of lower-case words


def _read_lines(p: Path) -> list[str]:
  """The lines of a UTF-8 text file; a line that is not valid UTF-8 is an error naming file:line."""
  out = []
  for n, raw in enumerate(p.read_bytes().split(b"\n"), 1):
    try:
      out.append(raw.decode("utf-8").rstrip("\r"))
    except UnicodeDecodeError as e:
      raise ValueError(f"{p}:{n}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
  return out


def load_lists(lists_dir: str | Path = "data/gatt") -> Lists:
  """Read data/gatt/*: one value a line (# comments); languages.tsv is `language<TAB>function words`."""
  d = Path(lists_dir)
  values, stop = {"capitals": ("",)}, {}
  for kind, name in LIST_FILES.items():
    p = d / name
    if not p.is_file():
      raise FileNotFoundError(f"{p}: GAtt list for {kind!r} not found")
    vals = tuple(s.strip() for s in _read_lines(p) if s.strip() and not s.startswith("#"))
    if not vals:
      raise ValueError(f"{p}: no values")
    values[kind] = vals
  p = d / "languages.tsv"
  if not p.is_file():
    raise FileNotFoundError(f"{p}: GAtt language list not found")
  for n, line in enumerate(_read_lines(p), 1):
    if not line.strip() or line.startswith("#"):
      continue
    lang, sep, words = line.partition("\t")
    if not sep or not words.split():
      raise ValueError(f"{p}:{n}: expected 'language<TAB>words', found {line[:40]!r}")
    stop[lang.strip()] = frozenset(words.split())
  values["language"] = tuple(k for k in stop if k != "English")
  return Lists(values, stop)


# ----------------------------------------------------------------------------------------------- checkers

def first_word(text: str) -> str:
  m = re.match(r"\W*([\w'-]+)", text.strip())
  return m.group(1).lower() if m else ""


def detect_language(text: str, stopwords: dict) -> str | None:
  """The language whose function words are most frequent in `text` (at least 2 hits), else None. Approximate."""
  words = re.findall(r"[^\W\d_]+", text.lower())
  hits = {lang: sum(w in s for w in words) for lang, s in stopwords.items()}
  best = max(hits, key=hits.get) if hits else None
  return best if best is not None and hits[best] >= 2 and list(hits.values()).count(hits[best]) == 1 else None


@dataclasses.dataclass(frozen=True)
class Constraint:
  kind: str
  value: str = ""

  def text(self, short: bool) -> str:
    return TEMPLATES[self.kind][int(short)].format(v=self.value)

  def check(self, answer: str, lists: Lists | None = None) -> bool | None:
    """True / False when an automatic checker exists for this kind, None otherwise."""
    a = answer.strip()
    if self.kind == "start_word":
      return first_word(a) == self.value.lower()
    if self.kind == "capitals":
      return any(ch.isalpha() for ch in a) and a == a.upper()
    if self.kind == "end_sign":
      return bool(a) and a.endswith(self.value)
    if self.kind == "language" and lists is not None:
      return detect_language(a, lists.stopwords) == self.value
    return None

  def repair(self, answer: str) -> str:
    """The answer made to satisfy a rule constraint (prefix the word / upper-case / append the sign)."""
    a = answer.strip()
    if self.kind == "start_word" and not self.check(a):
      return f"{self.value}, {a}" if a else self.value
    if self.kind == "capitals":
      return a.upper()
    if self.kind == "end_sign" and not self.check(a):
      return a.rstrip(".,;:!?~ ") + self.value
    return a


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A combination of constraints of distinct kinds, in long or shortened form."""
  constraints: tuple
  short: bool = False

  @property
  def text(self) -> str:
    return " ".join(c.text(self.short) for c in self.constraints)

  def checks(self, answer: str, lists: Lists | None = None) -> dict:
    """kind -> True / False for each constraint with an automatic checker."""
    out = {}
    for c in self.constraints:
      r = c.check(answer, lists)
      if r is not None:
        out[c.kind] = bool(r)
    return out

  def check(self, answer: str, lists: Lists | None = None) -> bool | None:
    """Every checkable constraint holds (and the answer is not empty); None when nothing is checkable."""
    r = self.checks(answer, lists)
    return (all(r.values()) and bool(answer.strip())) if r else None

  def repair(self, answer: str) -> str:
    """Apply the rule kinds' repairs (start word, then end sign, then capitals); other kinds are left as sampled."""
    order = {k: i for i, k in enumerate(("start_word", "end_sign", "capitals"))}
    for c in sorted((c for c in self.constraints if c.kind in RULE_KINDS), key=lambda c: order[c.kind]):
      answer = c.repair(answer)
    return answer

  def to_json(self) -> dict:
    return {"constraints": [[c.kind, c.value] for c in self.constraints], "short": self.short, "text": self.text}

  @classmethod
  def from_json(cls, d: dict) -> "Instruction":
    return cls(tuple(Constraint(k, v) for k, v in d["constraints"]), bool(d["short"]))


def sample_instruction(rng: np.random.Generator, lists: Lists, kinds: Sequence[str], max_constraints: int = 1,
                       short_prob: float = 0.5) -> Instruction:
  """1..max_constraints constraints of distinct kinds drawn from `kinds`, values uniform; short with short_prob."""
  kinds = list(kinds)
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"constraint kind {k!r}: expected one of {KINDS}")
  n = int(rng.integers(1, min(max_constraints, len(kinds)) + 1))
  chosen = [kinds[i] for i in sorted(rng.choice(len(kinds), size=n, replace=False))]
  cons = tuple(Constraint(k, str(lists.values[k][int(rng.integers(len(lists.values[k])))])) for k in chosen)
  return Instruction(cons, bool(rng.random() < short_prob))


# ----------------------------------------------------------------------------------------------- dialogs

def sampling_messages(inst: Instruction, users: Sequence[str], answers: Sequence[str]) -> list[dict]:
  """The paper's sampling prompt: `inst` concatenated to every user message; ends on user len(answers)+1."""
  msgs = []
  for i, u in enumerate(users[:len(answers) + 1]):
    msgs.append({"role": "user", "content": f"{u}\n{inst.text}"})
    if i < len(answers):
      msgs.append({"role": "assistant", "content": answers[i]})
  return msgs


def placed_messages(inst: Instruction | str, users: Sequence[str], answers: Sequence[str],
                    placement: str = "system") -> list[dict]:
  """The dialog with the instruction only in the first turn (system prompt or first user message)."""
  text = inst if isinstance(inst, str) else inst.text
  if placement not in PLACEMENTS:
    raise ValueError(f"placement: expected one of {PLACEMENTS}, found {placement!r}")
  msgs = [{"role": "system", "content": text}] if placement == "system" else []
  for i, u in enumerate(users):
    msgs.append({"role": "user", "content": f"{text}\n{u}" if placement == "user" and i == 0 else u})
    if i < len(answers):
      msgs.append({"role": "assistant", "content": answers[i]})
  return msgs


def gatt_example(inst: Instruction | str, users: Sequence[str], answers: Sequence[str],
                 placement: str = "system") -> list[dict]:
  """A GAtt training dialog: instruction in the first turn only; `"train": false` on every answer but the last,
  so `l2jax.data.dialogs.encode_dialog` gives loss mask 1 only on the last answer and its EOS."""
  if len(users) != len(answers) or not answers:
    raise ValueError(f"expected as many answers as user turns (>= 1), found {len(users)} users, {len(answers)} answers")
  msgs = placed_messages(inst, users, answers, placement)
  n = sum(m["role"] == "assistant" for m in msgs)
  k = 0
  for m in msgs:
    if m["role"] == "assistant":
      k += 1
      if k < n:
        m["train"] = False
  return msgs


def answer_problem(sampled: str, stop_reason: str = "eos", keep_truncated: bool = False) -> str | None:
  """Why a sampled answer cannot be a GAtt answer: "empty" (first token EOS or whitespace only; a repair would
  hide it), "truncated" (cut off by max_new_tokens or the context, unless keep_truncated: the SFT format would
  close it with an EOS), or None."""
  if not sampled.strip():
    return "empty"
  return "truncated" if stop_reason != "eos" and not keep_truncated else None


def record_problems(record: dict, keep_truncated: bool = False) -> list[str | None]:
  """answer_problem of each answer of a sampled record (no "sampled" / "stop_reasons": as answered, finished)."""
  sampled = record.get("sampled", record["answers"])
  reasons = record.get("stop_reasons", ["eos"] * len(sampled))
  return [answer_problem(s, r, keep_truncated) for s, r in zip(sampled, reasons)]


def rejection_filter(records: Sequence[dict], lists: Lists | None = None,
                     keep_truncated: bool = False) -> tuple[list[dict], list[dict]]:
  """(kept, dropped): a record {"instruction", "answers"} is kept iff every answer passes the instruction's
  checker (the rejection step) and none was sampled empty or (unless keep_truncated) cut off."""
  kept, dropped = [], []
  for r in records:
    inst = Instruction.from_json(r["instruction"])
    ok = bool(r["answers"]) and all(inst.check(a, lists) is not False and a.strip() for a in r["answers"])
    ok = ok and not any(record_problems(r, keep_truncated))
    (kept if ok else dropped).append(r)
  return kept, dropped


def build_examples(kept: Sequence[dict], placement: str, all_prefixes: bool) -> tuple[list[list[dict]], int]:
  """(examples of the kept records, how many the SFT reader's check_messages refuses: dropped, never written)."""
  from l2jax.data.dialogs import _Problem, check_messages
  out, bad = [], 0
  for ex in (ex for r in kept for ex in examples_from(r, placement, all_prefixes)):
    try:
      check_messages(ex)
      out.append(ex)
    except _Problem:
      bad += 1
  return out, bad


def examples_from(record: dict, placement: str, all_prefixes: bool) -> list[list[dict]]:
  """GAtt examples of a kept record: the whole dialog, or (all_prefixes) one per turn k (trained on answer k)."""
  inst = Instruction.from_json(record["instruction"])
  users, answers = record["users"][:len(record["answers"])], record["answers"]
  ks = range(1, len(answers) + 1) if all_prefixes else [len(answers)]
  return [gatt_example(inst, users[:k], answers[:k], placement) for k in ks]


def dialog_users(own: Sequence[str], pool: Sequence[str], turns: int, rng: np.random.Generator,
                 max_words: int = 0) -> list[str]:
  """`turns` user messages: the dialog's own, then follow-ups drawn from `pool`; each cut to max_words (0 = all)."""
  users = list(own[:turns])
  while len(users) < turns:
    users.append(pool[int(rng.integers(len(pool)))])
  cut = lambda u: " ".join(u.split()[:max_words]) if max_words > 0 else u.strip()
  return [cut(u) or "Hi" for u in users]


# ----------------------------------------------------------------------------------------------- the turn loop

def fit_prompt(tok, inst: Instruction, users: Sequence[str], answers: Sequence[str], mode: str, budget: int,
               placement: str = "system") -> tuple[list[int], int] | None:
  """(prompt ids for answer k = len(answers), exchanges dropped) within `budget` tokens, or None.

  mode "appended": `inst` on every user message (the paper's sampling prompt); the oldest exchanges are dropped.
  mode "first": `inst` only in the first turn (evaluation, as trained); exchange 1 (with the instruction) is
  kept and the oldest exchanges after it are dropped.
  """
  from l2jax.data.tokenizer import encode_chat
  k, keep_first = len(answers), int(mode == "first")
  for drop in range(0, k - min(keep_first, k) + 1):
    idx = list(range(min(keep_first, k))) + list(range(min(keep_first, k) + drop, k))
    us, As = [users[i] for i in idx] + [users[k]], [answers[i] for i in idx]
    msgs = sampling_messages(inst, us, As) if mode == "appended" else placed_messages(inst, us, As, placement)
    ids = encode_chat(tok, msgs)
    if len(ids) <= budget:
      return ids, drop
  return None


def converse(sampler, instructions: Sequence[Instruction], users: Sequence[Sequence[str]], *, mode: str,
             placement: str = "system", repair: bool = False, lists: Lists | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, ids: Sequence[int] | None = None,
             stop_on_fail: bool = False, keep_truncated: bool = False) -> list[dict]:
  """Sample the assistant turns of many dialogs one turn after another, the live dialogs batched at every turn.

  Dialog j answers users[j][0], users[j][1], ... with `instructions[j]` placed by `mode` (see fit_prompt).
  repair: apply Instruction.repair to each sampled answer before it enters the history (rule kinds only).
  stop_on_fail: stop a dialog at its first answer that fails the checker or was sampled empty or (unless
  keep_truncated) cut off (answer_problem; the rejection step drops it anyway).
  Row seeds depend only on (seed, ids[j], turn), so results do not depend on how dialogs are batched.
  Returns per dialog {"answers", "sampled", "stop_reasons" (the sampler's, per answer), "checks": [{kind: bool}],
  "stop": "done"|"failed"|"empty"|"truncated"|"context"}.
  """
  tok = sampler.tokenizer
  n = len(instructions)
  ids = list(range(n)) if ids is None else list(ids)
  budget = sampler.cfg.max_seq_len - max_new_tokens
  out = [{"answers": [], "sampled": [], "stop_reasons": [], "checks": [], "stop": "done"} for _ in range(n)]
  live = list(range(n))
  for k in range(max((len(u) for u in users), default=0)):
    rows, prompts = [], []
    for j in live:
      if k >= len(users[j]):
        continue
      fit = fit_prompt(tok, instructions[j], users[j], out[j]["answers"], mode, budget, placement)
      if fit is None:
        out[j]["stop"] = "context"
        continue
      rows.append(j)
      prompts.append(fit[0])
    if not rows:
      break
    seeds = [(seed * 1_000_003 + ids[j] * 101 + k) % (2 ** 31) for j in rows]
    gen = sampler.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seeds)
    live = []
    for r, j in enumerate(rows):
      text = sampler.decode_new(prompts[r], gen.tokens[r, :gen.lengths[r]]).strip()
      final = instructions[j].repair(text) if repair else text
      o = out[j]
      o["sampled"].append(text)
      o["answers"].append(final)
      o["stop_reasons"].append(gen.stop_reasons[r])
      o["checks"].append(instructions[j].checks(final, lists))
      problem = answer_problem(text, gen.stop_reasons[r], keep_truncated)
      if stop_on_fail and (problem or instructions[j].check(final, lists) is False):
        o["stop"] = problem or "failed"
      else:
        live.append(j)
  return out


def consistency(instructions: Sequence[Instruction], answers: Sequence[Sequence[str]], turns: int,
                lists: Lists | None = None) -> dict:
  """Share of answers at turn t = 1..turns that satisfy the (first-turn) instruction, over dialogs whose
  instruction has an automatic checker; also per constraint kind. None where no dialog reached turn t."""
  per_turn, count, by_kind = [], [], {}
  for t in range(turns):
    ok, n, kinds = 0, 0, {}
    for inst, ans in zip(instructions, answers):
      if t >= len(ans):
        continue
      r = inst.checks(ans[t], lists)
      if not r:
        continue
      n += 1
      ok += int(all(r.values()) and bool(ans[t].strip()))
      for kind, v in r.items():
        kinds.setdefault(kind, []).append(v)
    per_turn.append(ok / n if n else None)
    count.append(n)
    for kind in set(by_kind) | set(kinds):
      vals = kinds.get(kind)
      by_kind.setdefault(kind, [None] * t).append(float(np.mean(vals)) if vals else None)
  return {"turns": list(range(1, turns + 1)), "all": per_turn, "n": count, "by_kind": by_kind}


def user_turns(source, skip_bad: bool = False) -> list[list[str]]:
  """The user messages of every dialog of a dialogs reader (l2jax.data.dialogs); a bad record raises unless skip_bad."""
  from l2jax.data.dialogs import RecordError
  out = []
  for i in range(len(source)):
    try:
      msgs = source[i]
    except RecordError:
      if not skip_bad:
        raise
      continue
    us = [m["content"] for m in msgs if m["role"] == "user"]
    if us:
      out.append(us)
  return out
