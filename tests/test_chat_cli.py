"""`python -m l2jax.chat` over a tiny checkpoint with piped stdin, and the history truncation it relies on."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from l2jax import checkpoint, chat
from l2jax.data.tokenizer import Tokenizer, encode_chat
from l2jax.model import llama, presets

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "llama2-tokenizer" / "tokenizer.model"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
SYSTEM = "You are a terse assistant."
LINES = ["Hello there, how are you today?",
         "Tell me about the weather in Paris in the spring, please.",
         "word " * 150,  # longer than the context: not sent, with a notice
         "What should I pack for a trip to the mountains?",
         "And what about the food there, is it good?"]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  cfg = presets.get("test", vocab_size=32000, max_seq_len=128)
  params = jax.tree.map(np.asarray, llama.split(llama.init(cfg, seed=0))[1])
  return checkpoint.save_model_dir(tmp_path_factory.mktemp("chat") / "ckpt", cfg, params, TOKENIZER)


def test_fit_dialog_drops_oldest_keeps_system(tok):
  history = [(f"question number {i} about something", f"answer number {i} to it") for i in range(6)]
  full = encode_chat(tok, chat.build_dialog(SYSTEM, history, "last one"))
  ids, dropped = chat.fit_dialog(tok, SYSTEM, history, "last one", budget=len(full) - 1)
  assert dropped == 1 and ids == encode_chat(tok, chat.build_dialog(SYSTEM, history[1:], "last one"))
  ids, dropped = chat.fit_dialog(tok, SYSTEM, history, "last one", budget=60)
  assert len(ids) <= 60 < len(encode_chat(tok, chat.build_dialog(SYSTEM, history[dropped - 1:], "last one")))
  text = tok.decode(ids)
  assert text.startswith(f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n") and "question number 5" in text
  assert "question number 0" not in text
  ids, dropped = chat.fit_dialog(tok, SYSTEM, history, "last one", budget=5)  # cannot fit: all history dropped
  assert dropped == 6 and ids == encode_chat(tok, chat.build_dialog(SYSTEM, [], "last one"))
  assert chat.fit_dialog(tok, None, [], "hi", budget=100) == (encode_chat(tok, [{"role": "user", "content": "hi"}]), 0)


def test_chat_cli_piped_stdin(ckpt):
  stdin = "\n".join(LINES + ["/exit", "this line comes after /exit and is not answered"]) + "\n"
  r = subprocess.run([sys.executable, "-m", "l2jax.chat", "--ckpt", str(ckpt), "--system", SYSTEM,
                      "--max-new-tokens", "16", "--temperature", "0"],
                     input=stdin, env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count(chat.ANSWER_PREFIX) == 4, r.stdout
  assert "history truncated: dropped the" in r.stderr and "the system prompt is kept" in r.stderr, r.stderr
  assert r.stderr.count("message not sent") == 1
  assert chat.USER_PROMPT not in r.stdout  # no prompt marker when stdin is not a terminal


def test_chat_main_ends_at_eof(ckpt, monkeypatch, capsys):
  monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\n/reset\nHi again"))  # no trailing newline, no /exit
  assert chat.main(["--ckpt", str(ckpt), "--max-new-tokens", "4", "--temperature", "0.7", "--top-p", "0.9"]) == 0
  out, err = capsys.readouterr()
  assert out.count(chat.ANSWER_PREFIX) == 2 and "history cleared" in err


def test_chat_cli_bad_ckpt(tmp_path, capsys):
  assert chat.main(["--ckpt", str(tmp_path / "missing")]) == 2
  assert "checkpoint directory not found" in capsys.readouterr().err
