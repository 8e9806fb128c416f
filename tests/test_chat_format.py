"""The Llama 2 chat format (l2jax.data.tokenizer) equals Meta's `chat_completion`, re-implemented here
independently with sentencepiece (meta-llama/llama, llama/generation.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from l2jax.data.tokenizer import Tokenizer, chat_exchanges, encode_chat, encode_chat_with_mask

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "llama2-tokenizer" / "tokenizer.model"

DIALOG = [
    {"role": "system", "content": "Always answer with Haiku. "},
    {"role": "user", "content": "I am going to Paris, what should I see?"},
    {"role": "assistant", "content": "  Eiffel tower high,\nart in the Louvre, Seine flows;\ncroissants at dawn.  "},
    {"role": "user", "content": "What is so great about #1?"},
    {"role": "assistant", "content": "Iron lattice lace\nover the city of light\nsunset from the top"},
    {"role": "user", "content": " And the food? "},
]


def meta_chat_completion_tokens(sp, dialog):
  """Meta's formatting, transcribed: system folded into the first user turn, BOS [INST] u [/INST] a EOS per
  exchange (content stripped), BOS [INST] last [/INST] at the end."""
  B_INST, E_INST = "[INST]", "[/INST]"
  B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
  if dialog[0]["role"] == "system":
    dialog = [{"role": dialog[1]["role"],
               "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
  assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
  tokens = []
  for prompt, answer in zip(dialog[::2], dialog[1::2]):
    tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} "
                                        f"{answer['content'].strip()} ") + [sp.eos_id()]
  assert dialog[-1]["role"] == "user"
  tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}")
  return tokens


@pytest.fixture(scope="module")
def sp():
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


def test_three_turns_with_system_equal_meta(tok, sp):
  want = meta_chat_completion_tokens(sp, DIALOG)
  assert encode_chat(tok, DIALOG) == want
  assert want.count(sp.bos_id()) == 3 and want.count(sp.eos_id()) == 2
  assert sp.decode(want).startswith("[INST] <<SYS>>\nAlways answer with Haiku.")


def test_without_system_and_single_turn_equal_meta(tok, sp):
  for dialog in (DIALOG[1:], DIALOG[-1:], DIALOG[:2]):
    assert encode_chat(tok, dialog) == meta_chat_completion_tokens(sp, dialog)


def test_answer_mask_covers_answers_and_eos(tok, sp):
  dialog = DIALOG[:5]  # ends on an answer: the SFT form
  ids, mask = encode_chat_with_mask(tok, dialog)
  full = meta_chat_completion_tokens(sp, dialog + [{"role": "user", "content": "x"}])
  assert ids == full[:len(ids)]
  assert sum(mask) > 0 and ids[len(ids) - 1] == sp.eos_id() and mask[-1] == 1
  answers = sp.decode([t for t, m in zip(ids, mask) if m and t != sp.eos_id()])
  assert "Eiffel tower high" in answers and "[INST]" not in answers and "Paris" not in answers


@pytest.mark.parametrize("dialog,match", [
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
     "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "bot", "content": "a"}], "unknown role"),
    ([{"role": "user"}], "expected"),
    ([], "empty dialog"),
])
def test_bad_role_orders_raise(tok, dialog, match):
  with pytest.raises(ValueError, match=match):
    chat_exchanges(dialog)


def test_completion_prompt_must_end_on_user(tok):
  with pytest.raises(ValueError, match="last message must be from the user"):
    encode_chat(tok, DIALOG[:3])
