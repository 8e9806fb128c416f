"""Issue 9, part A: defaults that reproduce the references (compute dtype follows the checkpoint), one line
instead of a traceback for bad inputs, and values that make no sense rejected."""
from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_convert as H  # noqa: E402

from l2jax import checkpoint  # noqa: E402
from l2jax.model import llama, presets  # noqa: E402

S260 = H.DATA / "stories260K"
ENV = dict(os.environ, PYTHONPATH=str(H.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _one_line_error(capsys, *needles: str) -> str:
  """The captured stderr: exactly one line, starting with "error:", containing every needle."""
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
  assert len(lines) == 1 and lines[0].startswith("error:"), err
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  """A random `test`-preset model on the stories260K tokenizer (512 pieces), float32."""
  cfg = presets.get("test", vocab_size=512, dtype="float32", param_dtype="float32")
  rng = np.random.default_rng(0)  # numpy, not llama.init: no compile
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.5, s.shape).astype(np.float32),
                        llama.split(llama.abstract(cfg))[1])
  return checkpoint.save_model_dir(tmp_path_factory.mktemp("i9") / "ckpt", cfg, params, H.TOK512)


@pytest.fixture(scope="module")
def s260_dir(tmp_path_factory):
  from l2jax.convert.llama2c import llama2c_to_l2jax
  return llama2c_to_l2jax(S260 / "stories260K.bin", S260 / "tok512.model", tmp_path_factory.mktemp("s") / "c")


# ---- 1. compute dtype follows the checkpoint's parameter dtype ----

def test_llama2c_compute_dtype_follows_stored_dtype(s260_dir, tmp_path, capsys):
  cfg = json.loads((s260_dir / "config.json").read_text())
  assert (cfg["param_dtype"], cfg["dtype"]) == ("float32", "float32")
  tool = H.tool("llama2c_to_l2jax").main
  args = [str(S260 / "stories260K.bin"), str(S260 / "tok512.model")]
  assert tool(args + [str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
  cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
  assert (cfg["param_dtype"], cfg["dtype"]) == ("bfloat16", "bfloat16")
  assert tool(args + [str(tmp_path / "mixed"), "--compute-dtype", "bfloat16"]) == 0  # an explicit override wins
  cfg = json.loads((tmp_path / "mixed" / "config.json").read_text())
  assert (cfg["param_dtype"], cfg["dtype"]) == ("float32", "bfloat16")


def test_load_without_dtype_reproduces_run_c_logits(s260_dir):
  import jax.numpy as jnp

  import l2jax
  exp = json.loads((S260 / "expected_outputs.json").read_text())["runc_outputs"]["greedy_200_empty_prompt"]
  model = l2jax.load(s260_dir)  # no dtype argument: float32, from config.json
  assert model.cfg.dtype == "float32"
  ids = exp["sequence_ids"][:3]
  got = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
  H.assert_logits_close(got, np.asarray(exp["logits_first_3_positions"], np.float32), rel=2e-5)


def test_load_converted_fp32_hf_matches_transformers_without_dtype(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import jax.numpy as jnp

  import l2jax
  model = H.hf_model(n_heads=8, n_kv=2)
  model.save_pretrained(tmp_path / "hf")
  assert H.tool("hf_to_l2jax").main([str(tmp_path / "hf"), str(tmp_path / "l2"), "--tokenizer", str(H.TOK512)]) == 0
  assert json.loads((tmp_path / "l2" / "config.json").read_text())["dtype"] == "float32"
  ids = H.random_ids(model.config.vocab_size)
  got = np.asarray(l2jax.load(tmp_path / "l2")(jnp.asarray(ids, jnp.int32)))
  H.assert_logits_close(got, H.hf_logits(model, ids), rel=1e-5)
  bf = l2jax.load(tmp_path / "l2", dtype="bfloat16")  # the override still works
  assert bf.cfg.dtype == "bfloat16"


# ---- 2. one line instead of a traceback ----

@pytest.mark.parametrize("content", [b"[1, 2, 3]\n", bytes(range(256)) * 4], ids=["json-list", "random-bytes"])
def test_hf_bad_config_json_is_one_line(tmp_path, capsys, content):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_bytes(content)
  assert H.tool("hf_to_l2jax").main([str(src), str(tmp_path / "out")]) == 1
  _one_line_error(capsys, str(src / "config.json"))
  assert H.no_partial_output(tmp_path / "out")


def test_meta_bad_params_json_is_one_line(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  src = H.write_meta(tmp_path / "meta", H.hf_model(n_heads=4, n_kv=2, ffn=96), 1, multiple_of=32)
  tool = H.tool("meta_to_l2jax").main
  good = json.loads((src / "params.json").read_text())
  for bad, needle in ((dict(good, multiple_of=0), "multiple_of"), (dict(good, dim="64"), "dim"),
                      (dict(good, ffn_dim_multiplier="x"), "ffn_dim_multiplier"),
                      (dict(good, norm_eps=None), "norm_eps"), ([good], "expected a JSON object")):
    (src / "params.json").write_text(json.dumps(bad))
    assert tool([str(src), str(tmp_path / "out")]) == 1, bad
    _one_line_error(capsys, str(src / "params.json"), needle)
    assert H.no_partial_output(tmp_path / "out")
  (src / "params.json").write_bytes(bytes(range(255, -1, -1)) * 3)
  assert tool([str(src), str(tmp_path / "out")]) == 1
  _one_line_error(capsys, str(src / "params.json"))


def test_hf_bad_config_values_are_conversion_errors(tmp_path):
  pytest.importorskip("transformers")
  from l2jax.convert import ConversionError
  from l2jax.convert.hf import config_from_hf
  base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
          "intermediate_size": 96}
  for edit, needle in (({"num_attention_heads": 0, "head_dim": 16}, "num_attention_heads"),
                       ({"rms_norm_eps": None}, "rms_norm_eps"), ({"rope_theta": "x"}, "rope_theta"),
                       ({"hidden_size": 64.5}, "hidden_size")):
    with pytest.raises(ConversionError, match=needle):
      config_from_hf({**base, **edit}, "cfg.json")


def _enospc(*a, **k):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tensorstore_enospc(path, params):
  """What Orbax / tensorstore raise on a full disk (seen on a 64 KiB tmpfs), after writing part of the output."""
  (Path(path) / "partial").mkdir(parents=True)
  raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{path}/d/x": Failed to write 64151 bytes to file 7: '
                   "No space left on device [os_error_code='28']")


@pytest.mark.parametrize("failure", ["enospc", "tensorstore", "readonly"])
def test_converter_write_failure_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, failure):
  import tempfile
  if failure == "readonly":  # tests run as root, so chmod would not stop a write: refuse it where it happens
    def ro(*a, **k):
      raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(k.get("dir", "")))
    monkeypatch.setattr(tempfile, "mkdtemp", ro)
  else:
    monkeypatch.setattr(checkpoint, "save_params", _enospc if failure == "enospc" else _tensorstore_enospc)
  out = tmp_path / "new" / "deeper" / "out"  # parents that did not exist are removed again
  assert H.tool("llama2c_to_l2jax").main([str(S260 / "stories260K.bin"), str(S260 / "tok512.model"), str(out)]) == 1
  line = _one_line_error(capsys, str(out))
  assert ("Read-only" in line) if failure == "readonly" else ("No space left on device" in line)
  assert H.no_partial_output(out) and not (tmp_path / "new").exists()


def test_export_write_failure_is_one_line(s260_dir, tmp_path, capsys, monkeypatch):
  pytest.importorskip("transformers")
  from l2jax.convert import hf
  monkeypatch.setattr(hf, "write_safetensors", _enospc)
  out = tmp_path / "hf"
  assert H.tool("l2jax_to_hf").main([str(s260_dir), str(out)]) == 1
  _one_line_error(capsys, str(out), "No space left on device")
  assert H.no_partial_output(out)


def test_sample_prompt_with_invalid_utf8_bytes(tiny_ckpt):
  r = subprocess.run([sys.executable.encode(), b"-m", b"l2jax.sample", b"--ckpt", str(tiny_ckpt).encode(),
                      b"--prompt", b"caf\xe9 au lait", b"--max-new-tokens", b"2"],
                     env=ENV, capture_output=True, timeout=300)
  err = r.stderr.decode(errors="replace")
  assert r.returncode == 2, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "--prompt" in lines[0] and "UTF-8" in lines[0] and "0xe9" in lines[0], err


def _chat(argv, stdin, monkeypatch):
  from l2jax import chat
  monkeypatch.setattr(sys, "stdin", stdin)
  return chat.main(argv)


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_stdin_with_invalid_utf8(tiny_ckpt, capsys, monkeypatch, errors):
  stdin = io.TextIOWrapper(io.BytesIO(b"Hi\n\xff\xfe oops\nnever read\n"), encoding="utf-8", errors=errors)
  code = _chat(["--ckpt", str(tiny_ckpt), "--max-new-tokens", "2", "--temperature", "0"], stdin, monkeypatch)
  assert code == 2
  out, err = capsys.readouterr()
  assert out.count("assistant> ") == 1  # the first line was answered
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "stdin line 2" in lines[0] and "UTF-8" in lines[0], err


@pytest.mark.parametrize("flag,value,needle", [("--temperature", "-1", "temperature"),
                                               ("--temperature", "nan", "temperature"),
                                               ("--max-new-tokens", "0", "max_new_tokens"),
                                               ("--top-p", "0", "top_p"), ("--top-k", "-2", "top_k")])
@pytest.mark.parametrize("cli", ["sample", "chat"])
def test_cli_sampling_values_checked_before_loading(tmp_path, capsys, monkeypatch, cli, flag, value, needle):
  from l2jax import chat, sample
  monkeypatch.setattr(sample, "load_sampler", lambda *a, **k: pytest.fail("loaded the model before validating"))
  argv = ["--ckpt", str(tmp_path / "nope"), flag, value]
  if cli == "sample":
    assert sample.main(argv + ["--prompt", "x"]) == 2
  else:
    assert _chat(argv, io.StringIO("hi\n"), monkeypatch) == 2
  _one_line_error(capsys, needle, value)


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"), (dict(temperature=1.0, top_p=math.nan), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"), (dict(temperature=1.0, top_k=2.5), "top_k")])
def test_sampler_generate_rejects_values_that_make_no_sense(tiny_ckpt, kw, needle):
  from l2jax.sample import load_sampler
  s = load_sampler(str(tiny_ckpt))
  with pytest.raises(ValueError, match=needle):
    s.generate([[1, 5]], 2, **kw)


def test_sample_cli_temperature_nan_is_an_error_not_question_marks(tiny_ckpt, capsys):
  from l2jax import sample
  assert sample.main(["--ckpt", str(tiny_ckpt), "--prompt", "Once", "--temperature", "nan",
                      "--max-new-tokens", "2"]) == 2
  _one_line_error(capsys, "temperature", "nan")


# ---- deep OpenAssistant trees ----

def _deep_tree_json(n: int) -> str:
  """An OASST tree n messages deep (built as text: json.dumps itself recurses), two ranked replies per prompt."""
  s = '{"role": "%s", "text": "m%d", "rank": 0, "replies": []}' % ("assistant" if n % 2 else "prompter", n)
  for i in range(n - 1, -1, -1):
    role = "assistant" if i % 2 else "prompter"
    alt = ', {"role": "assistant", "text": "alt%d", "rank": 1, "replies": []}' % i if role == "prompter" else ""
    s = '{"role": "%s", "text": "m%d", "rank": 0, "replies": [%s%s]}' % (role, i, s, alt)
  return '{"prompt": %s}' % s


def _deep_tree(n: int) -> dict:
  node = {"role": "assistant" if n % 2 else "prompter", "text": f"m{n}", "rank": 0, "replies": []}
  for i in range(n - 1, -1, -1):
    role = "assistant" if i % 2 else "prompter"
    alt = [{"role": "assistant", "text": f"alt{i}", "rank": 1, "replies": []}] if role == "prompter" else []
    node = {"role": role, "text": f"m{i}", "rank": 0, "replies": [node] + alt}
  return {"prompt": node}


def test_deep_oasst_tree_dialogs(tmp_path):
  from l2jax.data import dialogs
  from l2jax.data.tokenizer import Tokenizer
  assert len(dialogs.oasst_best_path(_deep_tree(3001))) == 3002  # iterative: no RecursionError
  good = (H.DATA / "oasst" / "en_100_tree.jsonl").read_text().splitlines()[0]
  f = tmp_path / "deep.jsonl"
  f.write_text(good + "\n" + _deep_tree_json(3000) + "\n")
  src = dialogs.OasstTrees([f])
  with pytest.raises(dialogs.RecordError, match=f"{f}:2: .*nested too deeply"):
    src[1]
  with pytest.raises(dialogs.RecordError, match=f"{f}:2"):
    dialogs.encode_dialogs(src, Tokenizer(H.LLAMA2_TOKENIZER), seq_len=256)
  enc = dialogs.encode_dialogs(src, Tokenizer(H.LLAMA2_TOKENIZER), seq_len=256, skip_bad=True)
  assert enc.stats["skipped_bad"] == 1 and enc.stats["dialogs"] == 1


def test_deep_oasst_tree_preferences(tmp_path):
  from l2jax.data import preferences as P
  pairs = P.oasst_tree_pairs(_deep_tree(3000)["prompt"], "here")  # the walk itself is iterative
  assert len(pairs) == 1500 and {p.rating for p in pairs} == {2}
  assert pairs[3].dialog[-1] == ("user", "m6") and (pairs[3].chosen, pairs[3].rejected) == ("m7", "alt6")
  assert len(pairs[3].dialog) == 7
  f = tmp_path / "deep.jsonl"
  f.write_text(_deep_tree_json(3000) + "\n" + (H.DATA / "oasst" / "en_100_tree.jsonl").read_text())
  with pytest.raises(P.DataError, match=f"{f}:1: .*nested too deeply"):
    P.read_oasst(f)
  errors: list[str] = []
  assert len(P.read_oasst(f, errors)) == 754 and len(errors) == 1 and f"{f}:1:" in errors[0]


# ---- 3. values that make no sense ----

def test_reward_score_rejects_non_string_responses():
  from flax import nnx

  from l2jax.data.tokenizer import Tokenizer
  from l2jax.model import heads
  from l2jax.reward import RewardModel
  cfg = presets.get("test", vocab_size=512)
  abstract = llama.split(nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))))[1]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), abstract)
  rm = RewardModel(cfg, params, Tokenizer(H.TOK512), {}, batch_size=2, seq_len=32)
  assert rm.score(["Hi", "Hello"], ["Hello!", "Hi."]).shape == (2,)
  for bad in (None, 3, ["a"]):
    with pytest.raises(ValueError, match=f"response 1: expected a string, found {type(bad).__name__}"):
      rm.score(["Hi", "Hello"], ["Hello!", bad])
  with pytest.raises(ValueError, match="dialog 0"):
    rm.score([None], ["x"])


def test_identical_pairs_dropped_and_counted(tmp_path):
  from l2jax import config as c
  from l2jax.data import preferences as P
  from l2jax.stages.reward import load_preferences
  helpful = H.DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"
  pairs = P.read_hh(helpful)
  kept, n = P.drop_identical(pairs)
  assert n == 2 and len(kept) == len(pairs) - 2 and all(p.chosen != p.rejected for p in kept)
  d = c.Preferences(sources=(f"hh:{helpful}",), heldout_fraction=0.2, tokenizer=str(H.LLAMA2_TOKENIZER))
  mix, evals, summary = load_preferences(d, 0)
  assert summary["identical_dropped"] == 2 and summary["files"][str(helpful)]["identical_dropped"] == 2
  assert len(mix) + sum(len(v) for v in evals.values()) == len(pairs) - 2
  assert all(p.chosen != p.rejected for v in [mix, *evals.values()] for p in v)
