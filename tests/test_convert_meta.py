"""tools/meta_to_l2jax.py: Meta consolidated.NN.pth shards merged into the same model as the HF route; errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_convert as H  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from l2jax.convert import ConversionError, ffn_dim_meta  # noqa: E402
from l2jax.convert import meta  # noqa: E402

# dim 64, multiple_of 16, ffn_dim_multiplier 1.3: int(2 * 256 / 3) = 170 -> int(1.3 * 170) = 221 -> 224.
FFN = 224


def test_ffn_dim_as_meta_computes_it():
  assert ffn_dim_meta(64, 16, 1.3) == FFN
  assert ffn_dim_meta(4096, 256, None) == 11008       # Llama 2 7B
  assert ffn_dim_meta(5120, 256, None) == 13824       # 13B
  assert ffn_dim_meta(8192, 4096, 1.3) == 28672       # 70B
  assert ffn_dim_meta(8192, 256, 1.0) == 22016        # 34B (Code Llama params.json)


@pytest.fixture(scope="module")
def model():
  return H.hf_model(n_heads=8, n_kv=2, ffn=FFN)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_shards_give_the_hf_route_logits(tmp_path, model, n_shards):
  src = H.write_meta(tmp_path / "meta", model, n_shards, multiple_of=16, ffn_dim_multiplier=1.3)
  assert H.tool("meta_to_l2jax").main([str(src), str(tmp_path / "l2"), "--tokenizer", str(H.TOK512),
                                       "--max-seq-len", "64"]) == 0
  model.save_pretrained(tmp_path / "hf")
  assert H.tool("hf_to_l2jax").main([str(tmp_path / "hf"), str(tmp_path / "l2hf")]) == 0
  ids = H.random_ids(model.config.vocab_size)
  got = H.l2jax_logits(tmp_path / "l2", ids)
  np.testing.assert_array_equal(got, H.l2jax_logits(tmp_path / "l2hf", ids))  # same parameters, bit for bit
  H.assert_logits_close(got, H.hf_logits(model, ids))
  cfg = json.loads((tmp_path / "l2" / "config.json").read_text())
  assert (cfg["vocab_size"], cfg["ffn_dim"], cfg["max_seq_len"]) == (512, FFN, 64)  # vocab_size -1 resolved


def test_bf16_shards_stay_bf16(tmp_path, model):
  src = H.write_meta(tmp_path / "meta", model, 2, multiple_of=16, ffn_dim_multiplier=1.3, dtype=torch.bfloat16)
  meta.meta_to_l2jax(src, tmp_path / "l2")
  from l2jax import checkpoint
  cfg, params = checkpoint.load_model_dir(tmp_path / "l2")
  assert cfg.param_dtype == "bfloat16" and str(params["layers"]["w2"].dtype) == "bfloat16"
  want = model.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(params["layers"]["w2"][1].astype(np.float32), want.T)


def test_tokenizer_found_beside_meta_dir(tmp_path, model):
  src = H.write_meta(tmp_path / "llama-2-tiny", model, 1, multiple_of=16, ffn_dim_multiplier=1.3)
  (tmp_path / "tokenizer.model").write_bytes(H.TOK512.read_bytes())  # Meta's download layout
  meta.meta_to_l2jax(src, tmp_path / "l2")
  assert (tmp_path / "l2" / "tokenizer.model").read_bytes() == H.TOK512.read_bytes()


# ---- errors ----

@pytest.fixture()
def two_shards(tmp_path, model):
  return H.write_meta(tmp_path / "meta", model, 2, multiple_of=16, ffn_dim_multiplier=1.3)


def _err(src, out, exc=ConversionError):
  with pytest.raises(exc) as e:
    meta.meta_to_l2jax(src, out)
  assert H.no_partial_output(Path(out))
  return str(e.value)


def _edit_shard(path: Path, edit):
  sd = torch.load(path, weights_only=True)
  edit(sd)
  torch.save(sd, path)


def test_error_missing_params_json(two_shards, tmp_path):
  (two_shards / "params.json").unlink()
  assert "params.json" in _err(two_shards, tmp_path / "out", FileNotFoundError)


def test_error_no_shards(tmp_path):
  (tmp_path / "meta").mkdir()
  (tmp_path / "meta" / "params.json").write_text("{}")
  assert "consolidated" in _err(tmp_path / "meta", tmp_path / "out", FileNotFoundError)


def test_error_missing_shard(two_shards, tmp_path):
  (two_shards / "consolidated.01.pth").rename(two_shards / "consolidated.02.pth")
  msg = _err(two_shards, tmp_path / "out")
  assert "mismatched shard count" in msg and "consolidated.01.pth" in msg


def test_error_shard_count_does_not_divide(two_shards, tmp_path):
  # A third copy of shard 1: every split weight now has the wrong per-shard size for 3 shards.
  (two_shards / "consolidated.02.pth").write_bytes((two_shards / "consolidated.01.pth").read_bytes())
  msg = _err(two_shards, tmp_path / "out")
  assert "3" in msg and ("mismatched shard count" in msg or "split 3 ways" in msg)


def test_error_wrong_shape(two_shards, tmp_path):
  key = "layers.1.feed_forward.w2.weight"
  _edit_shard(two_shards / "consolidated.01.pth", lambda sd: sd.__setitem__(key, sd[key][:, :-1].contiguous()))
  msg = _err(two_shards, tmp_path / "out")
  assert "consolidated.01.pth" in msg and key in msg and "(64, 112)" in msg and "(64, 111)" in msg


def test_error_missing_key(two_shards, tmp_path):
  key = "layers.0.attention.wv.weight"
  for j in (0, 1):
    _edit_shard(two_shards / f"consolidated.{j:02d}.pth", lambda sd: sd.pop(key))
  msg = _err(two_shards, tmp_path / "out")
  assert "missing" in msg and key in msg


def test_error_keys_differ_between_shards(two_shards, tmp_path):
  _edit_shard(two_shards / "consolidated.01.pth", lambda sd: sd.pop("norm.weight"))
  msg = _err(two_shards, tmp_path / "out")
  assert "consolidated.01.pth" in msg and "norm.weight" in msg


def test_error_unknown_dtype(two_shards, tmp_path):
  key = "layers.0.ffn_norm.weight"
  for j in (0, 1):
    _edit_shard(two_shards / f"consolidated.{j:02d}.pth", lambda sd: sd.__setitem__(key, sd[key].double()))
  msg = _err(two_shards, tmp_path / "out")
  assert "float64" in msg and key in msg


def test_error_pickled_objects_are_refused(two_shards, tmp_path):
  torch.save({"evil": Path("/")}, two_shards / "consolidated.01.pth")  # needs full unpickling to load
  msg = _err(two_shards, tmp_path / "out")
  assert "consolidated.01.pth" in msg and "weights-only" in msg


def test_error_unsupported_params(two_shards, tmp_path):
  p = two_shards / "params.json"
  p.write_text(json.dumps({**json.loads(p.read_text()), "use_scaled_rope": True}))
  assert "use_scaled_rope" in _err(two_shards, tmp_path / "out")
