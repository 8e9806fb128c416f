"""The "text" chat format of a base model (a story model continues text; it was never taught [INST]), and answers
cut off by a token limit carried without EOS through preference pairs, the SFT reader and the rejection pool."""
import json
from pathlib import Path

import numpy as np
import pytest

from l2jax.data import dialogs, preferences
from l2jax.data.tokenizer import CHAT_FORMAT_FILE, Tokenizer, encode_chat, encode_chat_with_mask, exchange_pieces
from l2jax.rl import best_of_n as bon

ROOT = Path(__file__).resolve().parents[1]
TOK512 = ROOT / "data/stories260K/tok512.model"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOK512, chat_format="text")


def test_text_format_is_the_plain_continuation(tok):
  prompt, answer = exchange_pieces(tok, "Once upon a time", "there was a dog.")
  assert prompt == tok.encode("Once upon a time", bos=True)
  assert prompt + answer == tok.encode("Once upon a time there was a dog.", bos=True, eos=True)
  assert answer[-1] == tok.eos_id
  # punctuation continues the text without a space
  p2, a2 = exchange_pieces(tok, "Lily said", ", hello.")
  assert p2 + a2 == tok.encode("Lily said, hello.", bos=True, eos=True)
  assert encode_chat(tok, [{"role": "user", "content": "One day"}]) == tok.encode("One day", bos=True)
  ids, mask = encode_chat_with_mask(tok, [{"role": "user", "content": "One day"},
                                          {"role": "assistant", "content": "a cat ran."}])
  assert ids == tok.encode("One day a cat ran.", bos=True, eos=True)
  assert sum(mask) == len(ids) - len(tok.encode("One day", bos=True))


def test_chat_format_file_beside_the_tokenizer(tmp_path):
  import shutil
  shutil.copyfile(TOK512, tmp_path / "tokenizer.model")
  assert Tokenizer(tmp_path / "tokenizer.model").chat_format == "llama2"
  (tmp_path / CHAT_FORMAT_FILE).write_text("text\n")
  t = Tokenizer(tmp_path / "tokenizer.model")
  assert t.chat_format == "text"
  assert encode_chat(t, [{"role": "user", "content": "Hi"}]) == t.encode("Hi", bos=True)
  (tmp_path / CHAT_FORMAT_FILE).write_text("chatml\n")
  with pytest.raises(ValueError, match=r"chat_format: chat format 'chatml'; expected one of"):
    Tokenizer(tmp_path / "tokenizer.model")


def test_save_model_dir_keeps_the_chat_format(tmp_path):
  import shutil

  from l2jax import checkpoint
  from l2jax.model import llama, presets
  src = tmp_path / "src"
  src.mkdir()
  shutil.copyfile(TOK512, src / "tokenizer.model")
  (src / CHAT_FORMAT_FILE).write_text("text\n")
  cfg = presets.get("stories260k", dtype="float32")
  import jax
  params = jax.device_get(llama.split(llama.Llama(cfg, rngs=__import__("flax").nnx.Rngs(0)))[1])
  out = checkpoint.save_model_dir(tmp_path / "out", cfg, params, src / "tokenizer.model")
  assert (out / CHAT_FORMAT_FILE).read_text().strip() == "text"
  assert Tokenizer(out / "tokenizer.model").chat_format == "text"


def test_unfinished_pair_responses_are_scored_without_eos(tok, tmp_path):
  f = tmp_path / "pairs.jsonl"
  f.write_text(json.dumps({"prompt": "One day", "chosen": "a cat", "rejected": "a dog ran.",
                           "chosen_finished": False}) + "\n")
  pairs = preferences.read_jsonl(f)
  assert (pairs[0].chosen_finished, pairs[0].rejected_finished) == (False, True)
  b = preferences.pair_batch(tok, pairs, 32)
  chosen = b["tokens"][0, 0][b["mask"][0, 0] > 0].tolist()
  rejected = b["tokens"][0, 1][b["mask"][0, 1] > 0].tolist()
  assert chosen == tok.encode("One day a cat", bos=True)           # cut off: no EOS
  assert rejected == tok.encode("One day a dog ran.", bos=True, eos=True)
  f.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "chosen_finished": "no"}) + "\n")
  with pytest.raises(Exception, match=r"pairs.jsonl:1: 'chosen_finished' must be true, false or null"):
    preferences.read_jsonl(f)


def test_unfinished_last_answer_is_fine_tuned_without_eos(tok):
  msgs = [{"role": "user", "content": "One day"}, {"role": "assistant", "content": "a cat", "finished": False}]
  checked = dialogs.check_messages(msgs)
  ids, mask, _, _ = dialogs.encode_dialog(tok, checked, 64)
  assert ids == tok.encode("One day a cat", bos=True) and ids[-1] != tok.eos_id
  assert sum(mask) == len(ids) - len(tok.encode("One day", bos=True))
  full, _, _, _ = dialogs.encode_dialog(tok, dialogs.check_messages(msgs[:1] + [{"role": "assistant",
                                                                                  "content": "a cat"}]), 64)
  assert full == ids + [tok.eos_id]
  with pytest.raises(dialogs._Problem, match=r"'finished' must be true or false, on the last \(assistant\)"):
    dialogs.check_messages([msgs[0], {"role": "assistant", "content": "a", "finished": False}, msgs[0],
                            {"role": "assistant", "content": "b"}])


def test_pool_entry_of_a_cut_off_answer_says_so():
  rec = {"key": "k", "messages": [{"role": "user", "content": "Hi"}], "is_safety": False, "iteration": 1,
         "sampler": "s", "temperature": 1.0}
  cut = bon.pool_entry(rec, {"text": "a long", "stop_reason": "length", "helpful": 0.0, "safety": 0.0}, 1.0)
  done = bon.pool_entry(rec, {"text": "done.", "stop_reason": "eos", "helpful": 0.0, "safety": 0.0}, 1.0)
  assert cut["messages"][-1]["finished"] is False and "finished" not in done["messages"][-1]
  assert dialogs.check_messages(cut["messages"])[-1]["finished"] is False
  assert bon.entry_answer(cut)["stop_reason"] == "length"
