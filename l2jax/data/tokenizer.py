"""SentencePiece tokenizer and the Llama 2 chat format (Touvron et al., 2023, section 3; Meta's `chat_completion`).

The chat format is implemented once, here, and used by sampling, chat, SFT and Ghost Attention:
  system prompt -> "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n" prepended to the first user message;
  each completed exchange -> BOS + "[INST] {user} [/INST] {answer} " + EOS   (user, answer stripped);
  the last user message   -> BOS + "[INST] {user} [/INST]".

A model that was never taught that format (a base language model such as llama2.c's stories260K) uses the
"text" format instead: the "user" message is a text to continue and the answer is its continuation,
  each completed exchange -> BOS + "{user}{sep}{answer}" + EOS,   the last user message -> BOS + "{user}",
sep being one space unless the answer starts with punctuation. A checkpoint says which format it takes in a
`chat_format` file beside its tokenizer.model ("llama2" when absent); every stage then reads, scores and writes
its prompts and answers in that format, so the RL stages run unchanged on a plain story model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")
CHAT_FORMAT_FILE = "chat_format"   # beside tokenizer.model: "llama2" (default) or "text"
CHAT_FORMATS = ("llama2", "text")
_NO_SPACE_BEFORE = tuple(",.;:!?)'\"")


def read_chat_format(tokenizer_path: str | Path) -> str:
  """The chat format recorded beside a tokenizer model (`CHAT_FORMAT_FILE`), "llama2" when there is none."""
  f = Path(tokenizer_path).with_name(CHAT_FORMAT_FILE)
  if not f.is_file():
    return "llama2"
  fmt = f.read_text().strip()
  if fmt not in CHAT_FORMATS:
    raise ValueError(f"{f}: chat format {fmt!r}; expected one of {CHAT_FORMATS}")
  return fmt


class Tokenizer:
  """A SentencePiece model with Llama's BOS / EOS conventions."""

  def __init__(self, path: str | Path, chat_format: str | None = None):
    import sentencepiece as spm
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: tokenizer model not found")
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      ok = self.sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError / RuntimeError on a bad file
      raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
    if not ok:
      raise ValueError(f"{path}: not a readable SentencePiece model")
    self.vocab_size = self.sp.GetPieceSize()
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0  # Llama 2 has no pad piece; rows are masked
    self.chat_format = chat_format or read_chat_format(path)
    if self.chat_format not in CHAT_FORMATS:
      raise ValueError(f"chat_format {self.chat_format!r}: expected one of {CHAT_FORMATS}")

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    ids = list(self.sp.EncodeAsIds(text))
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
    ids = self.sp.EncodeAsIds(list(texts))
    return [([self.bos_id] if bos else []) + list(x) + ([self.eos_id] if eos else []) for x in ids]

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])


def chat_exchanges(dialog: Sequence[dict]) -> list[tuple[str, str | None]]:
  """Validate a dialog and return its (user, answer) exchanges; the last answer is None if the dialog ends on a user.

  dialog: [{"role": "system"|"user"|"assistant", "content": str}, ...]; an optional system message first,
  then user and assistant strictly alternating, starting with the user.
  """
  msgs = list(dialog)
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i}: expected {{'role': ..., 'content': ...}}, found {m!r}")
    if m["role"] not in ROLES:
      raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], str):
      raise ValueError(f"message {i}: content must be a string, found {type(m['content']).__name__}")
  if msgs and msgs[0]["role"] == "system":
    if len(msgs) < 2:
      raise ValueError("a system message must be followed by a user message")
    msgs = [{"role": msgs[1]["role"], "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
  if not msgs:
    raise ValueError("empty dialog")
  for i, m in enumerate(msgs):
    want = "user" if i % 2 == 0 else "assistant"
    if m["role"] != want:
      raise ValueError(f"roles must alternate user/assistant starting with user (an optional system first): "
                       f"turn {i} is {m['role']!r}, expected {want!r}")
  users, answers = msgs[0::2], msgs[1::2]
  return [(u["content"].strip(), a["content"].strip() if a else None)
          for u, a in zip(users, list(answers) + [None] * (len(users) - len(answers)))]


def exchange_pieces(tok: Tokenizer, user: str, answer: str | None) -> tuple[list[int], list[int]]:
  """(prompt ids, answer ids) of one exchange; prompt + answer equals Meta's encoding of the whole exchange.

  The answer part is everything after the "[INST] ... [/INST]" prefix, including the closing EOS. In the "text"
  format (module docstring) the prompt is the user text itself and the answer its continuation.
  """
  if getattr(tok, "chat_format", "llama2") == "text":
    head = user
    text = head if answer is None else head + ("" if answer.startswith(_NO_SPACE_BEFORE) else " ") + answer
  else:
    head = f"{B_INST} {user} {E_INST}"
    text = f"{head} {answer} "
  prompt = tok.encode(head, bos=True)
  if answer is None:
    return prompt, []
  full = tok.encode(text, bos=True, eos=True)
  n = 0
  while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
    n += 1
  return full[:n], full[n:]


def encode_chat(tok: Tokenizer, dialog: Sequence[dict]) -> list[int]:
  """Meta's `chat_completion` token ids for a dialog ending on a user message (the model answers next)."""
  ex = chat_exchanges(dialog)
  if ex[-1][1] is not None:
    raise ValueError("the last message must be from the user for a completion prompt")
  return [t for u, a in ex for part in exchange_pieces(tok, u, a) for t in part]


def encode_chat_with_mask(tok: Tokenizer, dialog: Sequence[dict]) -> tuple[list[int], list[int]]:
  """Token ids of a dialog and a loss mask that is 1 exactly on assistant answer tokens and their EOS."""
  ids: list[int] = []
  mask: list[int] = []
  for u, a in chat_exchanges(dialog):
    prompt, answer = exchange_pieces(tok, u, a)
    ids += prompt + answer
    mask += [0] * len(prompt) + [1] * len(answer)
  return ids, mask
