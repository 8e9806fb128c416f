"""tools/llama2c_to_l2jax.py on stories260K: run.c's logits and per-token NLL; the .bin format's errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_convert as H  # noqa: E402

from l2jax.convert import ConversionError  # noqa: E402
from l2jax.convert import llama2c  # noqa: E402

S260 = H.DATA / "stories260K"
BIN, TOK = S260 / "stories260K.bin", S260 / "tok512.model"
EXPECTED = json.loads((S260 / "expected_outputs.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """stories260K converted by running the tool as a script from the repository root."""
  out = tmp_path_factory.mktemp("s260") / "ckpt"
  r = subprocess.run([sys.executable, "tools/llama2c_to_l2jax.py", str(BIN), str(TOK), str(out)],
                     cwd=H.ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  return out


@pytest.fixture(scope="module")
def model(ckpt):
  import l2jax
  return l2jax.load(ckpt)  # no dtype: the converted config computes in float32, as run.c does


def _logits(model, ids):
  import jax.numpy as jnp
  return np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]


def test_config_and_files(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  h = EXPECTED["config_from_header"]
  assert (cfg["dim"], cfg["ffn_dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["vocab_size"],
          cfg["max_seq_len"]) == (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
                                  h["vocab_size"], h["seq_len"])
  assert (ckpt / "tokenizer.model").read_bytes() == TOK.read_bytes()
  from l2jax import checkpoint
  _, params = checkpoint.load_model_dir(ckpt)
  np.testing.assert_array_equal(params["lm_head"], params["embed"].T)  # shared classifier
  n = sum(a.size for a in (params["embed"], params["norm"], *params["layers"].values()))
  assert n == EXPECTED["n_params_excluding_freq_cis"]


@pytest.mark.parametrize("case,field", [("greedy_200_empty_prompt", "logits_first_3_positions"),
                                        ("greedy_64_prompt_once_upon_a_time", "logits_first_5_positions")])
def test_logits_match_run_c(model, case, field):
  c = EXPECTED["runc_outputs"][case]
  want = np.array(c[field], np.float32)
  got = _logits(model, c["sequence_ids"][:len(want)])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_sequence_matches_run_c(model):
  # With teacher forcing on run.c's greedy output, every argmax after the prompt must reproduce it.
  c = EXPECTED["runc_outputs"]["greedy_64_prompt_once_upon_a_time"]
  ids, n_prompt = c["sequence_ids"], len(c["prompt_ids"])
  argmax = _logits(model, ids[:-1]).argmax(-1)
  assert argmax[n_prompt - 1:].tolist() == ids[n_prompt:]


def test_teacher_forced_nll_matches_run_c(model):
  c = EXPECTED["runc_outputs"]["teacher_forced_nll_tinystories"]
  ids = c["ids"]
  logits = _logits(model, ids[:-1]).astype(np.float64)  # [511, vocab]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(ids) - 1), ids[1:]]
  assert abs(nll.mean() - c["mean_nll"]) < 1e-3
  assert abs(nll.mean() - 1.3112) < 1e-3
  np.testing.assert_allclose(nll, c["per_position_nll"], atol=1e-3)


def test_unshared_classifier(tmp_path):
  raw = BIN.read_bytes()
  header = np.frombuffer(raw[:28], "<i4").copy()
  V, D = header[5], header[0]
  wcls = np.random.default_rng(0).standard_normal((V, D)).astype("<f4")
  header[5] = -V
  (tmp_path / "m.bin").write_bytes(header.tobytes() + raw[28:] + wcls.tobytes())
  llama2c.llama2c_to_l2jax(tmp_path / "m.bin", TOK, tmp_path / "out")
  from l2jax import checkpoint
  _, params = checkpoint.load_model_dir(tmp_path / "out")
  np.testing.assert_array_equal(params["lm_head"], wcls.T)
  emb = np.frombuffer(raw[28:28 + 4 * V * D], "<f4").reshape(V, D)
  np.testing.assert_array_equal(params["embed"], emb)


# ---- errors ----

def _err(path, out, exc=ConversionError, tok=TOK):
  with pytest.raises(exc) as e:
    llama2c.llama2c_to_l2jax(path, tok, out)
  assert H.no_partial_output(Path(out))
  return str(e.value)


def test_error_truncated(tmp_path):
  p = tmp_path / "t.bin"
  p.write_bytes(BIN.read_bytes()[:-100])
  msg = _err(p, tmp_path / "out")
  assert "truncated" in msg and "1056540" in msg and "1056440" in msg and str(p) in msg


def test_error_trailing_bytes(tmp_path):
  p = tmp_path / "t.bin"
  p.write_bytes(BIN.read_bytes() + b"\0" * 8)
  assert "trailing" in _err(p, tmp_path / "out")


def test_error_header_too_short(tmp_path):
  p = tmp_path / "t.bin"
  p.write_bytes(b"\0" * 10)
  assert "truncated" in _err(p, tmp_path / "out")


def test_error_version1_file(tmp_path):
  p = tmp_path / "v1.bin"
  p.write_bytes(np.array([0x616B3432, 1], "<u4").tobytes() + b"\0" * 248)
  assert "version 1" in _err(p, tmp_path / "out")


def test_error_bad_header(tmp_path):
  p = tmp_path / "bad.bin"
  p.write_bytes(np.array([64, 172, 5, 7, 4, 512, 512], "<i4").tobytes())  # 64 not divisible by 7 heads
  assert "header" in _err(p, tmp_path / "out")


def test_error_missing_inputs(tmp_path):
  assert "not found" in _err(tmp_path / "nope.bin", tmp_path / "out", FileNotFoundError)
  assert "tokenizer" in _err(BIN, tmp_path / "out", FileNotFoundError, tok=tmp_path / "nope.model")


def test_error_tokenizer_vocab_too_large(tmp_path):
  msg = _err(BIN, tmp_path / "out", tok=H.LLAMA2_TOKENIZER)
  assert "32000" in msg and "512" in msg
