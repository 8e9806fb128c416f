"""The versions evaluation on degenerate but valid answers (Llama 2 section 3.4): a version that answers nothing
(EOS first) and a version whose answers are all cut off by the token limit. Neither may stop the evaluation, and a
cut-off answer is scored as unfinished (no EOS), never as a complete one."""
import json
import types

import numpy as np
import pytest

from l2jax.eval import compare


def _fake_generate(sampler, ids, seeds, *, max_new_tokens, temperature, top_p, batch_size):
  n = len(ids)
  kind = sampler.name.rsplit("/", 1)[-1]
  if kind == "empty":                       # EOS as the first token: a valid, empty answer
    return [""] * n, np.zeros(n, np.int64), np.ones(n, bool)
  if kind == "cut":                         # stopped by max_new_tokens: no EOS
    return ["and then the"] * n, np.full(n, max_new_tokens, np.int64), np.zeros(n, bool)
  return ["Hello, here is an answer."] * n, np.full(n, 6, np.int64), np.ones(n, bool)


@pytest.mark.slow
def test_compare_survives_empty_and_cut_off_versions(tmp_path, llama2_tokenizer_path, monkeypatch):
  import shutil

  import l2jax.reward
  import l2jax.sample
  from l2jax.data.preferences import encode_responses, rows_to_arrays
  from l2jax.data.tokenizer import Tokenizer
  from tests.test_eval import _fake_checkpoints
  ck = _fake_checkpoints(tmp_path, llama2_tokenizer_path)
  for name in ("empty", "cut"):
    shutil.copytree(ck["A"], tmp_path / name)
  tok = Tokenizer(llama2_tokenizer_path)
  monkeypatch.setattr(l2jax.sample, "load_sampler", lambda d, **k: types.SimpleNamespace(name=str(d), tokenizer=tok))
  monkeypatch.setattr(compare, "generate", _fake_generate)
  s = compare.Settings(prompts_per_set=3, max_new_tokens=8, diversity_prompts=2, diversity_samples=3,
                       diversity_temperatures=(0.5,), tension_pairs=4, batch_size=8)
  res = compare.compare({"empty": str(tmp_path / "empty"), "cut": str(tmp_path / "cut")}, ("ref", str(ck["A"])),
                        str(ck["rm_h"]), str(ck["rm_s"]), None, tmp_path / "eval", s)
  empty, cut = res["versions"]["empty"], res["versions"]["cut"]
  assert empty["eos_rate"] == 1.0 and empty["mean_length"] == 0.0 and cut["eos_rate"] == 0.0
  assert empty["win"]["helpful"]["n"] == 3 and res["diversity"]["factual"]["empty"]["0.5"] == 0.0
  assert "| empty |" in (tmp_path / "eval" / "compare.md").read_text()
  # the cut-off answers were scored without EOS
  rows = [json.loads(x) for x in (tmp_path / "eval" / "compare_samples.jsonl").read_text().splitlines()]
  got = [r for r in rows if r["version"] == "cut" and r["kind"] == "helpful"]
  rm = l2jax.reward.load(str(ck["rm_h"]), batch_size=8)

  def direct(r, finished):
    row = encode_responses(tok, r["prompt"], [r["response"]], rm.seq_len, finished=[finished])[0]
    tokens, mask = rows_to_arrays([row], 160, tok.pad_id)
    return float(np.asarray(rm.score_tokens(tokens, mask))[0])

  for r in got:
    assert r["rh"] == pytest.approx(direct(r, False), rel=1e-4, abs=1e-4)
    assert abs(direct(r, True) - direct(r, False)) > 1e-3
