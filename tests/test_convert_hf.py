"""tools/hf_to_l2jax.py and tools/l2jax_to_hf.py: live parity with transformers, round trips, shipped reference, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_convert as H  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from l2jax.convert import ConversionError  # noqa: E402
from l2jax.convert import hf  # noqa: E402

TINY = H.DATA / "hf-tiny-random-llama-2"


@pytest.fixture(scope="module")
def to_l2jax():
  return H.tool("hf_to_l2jax").main


@pytest.fixture(scope="module")
def to_hf():
  return H.tool("l2jax_to_hf").main


def _state_dicts_equal(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert set(sa) == set(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype, k
    assert torch.equal(sa[k], sb[k]), f"{k} differs after the round trip"


@pytest.mark.parametrize("n_heads,n_kv,sharded", [(8, 1, False), (8, 2, True), (4, 4, False), (8, 4, False),
                                                   (8, 8, False)])
def test_hf_parity_and_round_trip(tmp_path, to_l2jax, to_hf, n_heads, n_kv, sharded):
  model = H.hf_model(n_heads=n_heads, n_kv=n_kv)
  src = tmp_path / "hf"
  model.save_pretrained(src, max_shard_size="40KB" if sharded else "5GB")
  assert (src / hf.INDEX).exists() == sharded
  assert to_l2jax([str(src), str(tmp_path / "l2"), "--tokenizer", str(H.TOK512)]) == 0
  ids = H.random_ids(model.config.vocab_size)
  want = H.hf_logits(model, ids)
  H.assert_logits_close(H.l2jax_logits(tmp_path / "l2", ids), want)
  assert (tmp_path / "l2" / "tokenizer.model").read_bytes() == H.TOK512.read_bytes()

  back = tmp_path / "back"
  assert to_hf([str(tmp_path / "l2"), str(back)] + (["--max-shard-size", "40KB"] if sharded else [])) == 0
  assert (back / hf.INDEX).exists() == sharded
  assert (back / "tokenizer.model").exists()
  model2 = transformers.LlamaForCausalLM.from_pretrained(back).eval()
  _state_dicts_equal(model, model2)  # HF -> l2jax -> HF is bit-identical
  np.testing.assert_array_equal(H.hf_logits(model2, ids), want)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", "bfloat16"), ("float16", "float16")])
def test_half_precision_sources_keep_their_bits(tmp_path, to_l2jax, to_hf, dtype, torch_dtype):
  model = H.hf_model(n_kv=2).to(getattr(torch, torch_dtype))
  model.save_pretrained(tmp_path / "hf")
  assert to_l2jax([str(tmp_path / "hf"), str(tmp_path / "l2")]) == 0
  cfg = json.loads((tmp_path / "l2" / "config.json").read_text())
  assert cfg["param_dtype"] == dtype and cfg["dtype"] == dtype  # compute dtype follows the stored dtype
  ids = H.random_ids(model.config.vocab_size)
  # The stored half-precision weights upcast exactly, so fp32 compute matches HF's fp32 run of them
  # (loaded fresh: `model.float()` would keep a half-precision-rounded rotary inv_freq buffer).
  ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  H.assert_logits_close(H.l2jax_logits(tmp_path / "l2", ids), H.hf_logits(ref, ids))
  assert to_hf([str(tmp_path / "l2"), str(tmp_path / "back")]) == 0
  model2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=getattr(torch, torch_dtype))
  _state_dicts_equal(model.to(getattr(torch, torch_dtype)), model2)


def test_dtype_flag_casts_stored_params(tmp_path, to_l2jax):
  model = H.hf_model(n_kv=2)
  model.save_pretrained(tmp_path / "hf")
  assert to_l2jax([str(tmp_path / "hf"), str(tmp_path / "l2"), "--dtype", "bfloat16",
                   "--compute-dtype", "float32"]) == 0
  cfg = json.loads((tmp_path / "l2" / "config.json").read_text())
  assert (cfg["param_dtype"], cfg["dtype"]) == ("bfloat16", "float32")
  from l2jax import checkpoint
  _, params = checkpoint.load_model_dir(tmp_path / "l2")
  assert str(params["layers"]["wq"].dtype) == "bfloat16"


def test_tied_embeddings_copy_embed_to_lm_head(tmp_path, to_l2jax):
  model = H.hf_model(n_kv=2, tie=True)
  model.save_pretrained(tmp_path / "hf")
  assert to_l2jax([str(tmp_path / "hf"), str(tmp_path / "l2")]) == 0
  ids = H.random_ids(model.config.vocab_size)
  H.assert_logits_close(H.l2jax_logits(tmp_path / "l2", ids), H.hf_logits(model, ids))


def test_permutation_is_the_inverse_of_transformers_permute():
  w = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8 * 6, 5)  # 8 heads of head_dim 6, dim 5
  # transformers' convert_llama_weights_to_hf.py: w.view(n, dim1 // n // 2, 2, dim2).transpose(1, 2).reshape(...)
  ref = torch.from_numpy(w).view(8, 3, 2, 5).transpose(1, 2).reshape(48, 5).numpy()
  np.testing.assert_array_equal(hf.permute(w, 8, 6), ref)
  np.testing.assert_array_equal(hf.unpermute(ref, 8, 6), w)


# ---- the shipped tiny checkpoint (bf16 safetensors) and its transformers reference outputs ----

def test_shipped_tiny_random_llama_reference(tmp_path, to_l2jax):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import l2jax
  from l2jax.model import llama
  assert to_l2jax([str(TINY), str(tmp_path / "l2")]) == 0
  ref = json.loads((TINY / "reference_outputs.json").read_text())
  tol = ref["logit_tolerance"]
  model = l2jax.load(tmp_path / "l2", dtype="float32")
  graphdef, params = llama.split(model)
  width = 8  # every pass runs on a fixed width (one compile); causal attention ignores the padding after `n`
  fwd = jax.jit(lambda p, ids_bt: nnx.merge(graphdef, p)(ids_bt))

  def last_logits(ids):
    padded = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
    return np.asarray(fwd(params, padded))[0, len(ids) - 1]

  for case in ref["model_cases"]:
    ids = list(case["input_ids"])
    logits = last_logits(ids)
    idx = np.array([int(k) for k in case["sampled_logits"]])
    want = np.array(list(case["sampled_logits"].values()))
    np.testing.assert_allclose(logits[idx], want, rtol=tol["relative"], atol=tol["absolute"])
    assert int(logits.argmax()) == case["greedy_token"]
    for _ in range(len(case["greedy_continuation"])):  # greedy decoding by repeated full forward passes
      ids.append(int(last_logits(ids).argmax()))
    assert ids[len(case["input_ids"]):] == case["greedy_continuation"]


# ---- errors: clear message naming file/key/shape/dtype, and no partial output directory ----

def _convert_err(src, out, exc=ConversionError, **kw):
  with pytest.raises(exc) as e:
    hf.hf_to_l2jax(src, out, **kw)
  assert H.no_partial_output(Path(out))
  return str(e.value)


@pytest.fixture()
def saved(tmp_path):
  model = H.hf_model(n_heads=4, n_kv=2, layers=2)
  model.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf"


def _rewrite(path: Path, edit):
  """Rewrite a safetensors file with `edit(dict of arrays) -> dict of arrays` (fp32 numpy)."""
  from safetensors.numpy import load_file, save_file
  tensors = edit(load_file(path))
  path.unlink()
  save_file(tensors, path, metadata={"format": "pt"})


def test_error_missing_config(saved, tmp_path):
  (saved / "config.json").unlink()
  msg = _convert_err(saved, tmp_path / "out", FileNotFoundError)
  assert "config.json" in msg and str(saved) in msg


def test_error_no_weights(saved, tmp_path):
  (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
  msg = _convert_err(saved, tmp_path / "out", FileNotFoundError)
  assert "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_error_missing_key(saved, tmp_path):
  key = "model.layers.1.mlp.up_proj.weight"
  _rewrite(saved / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != key})
  msg = _convert_err(saved, tmp_path / "out")
  assert "missing" in msg and key in msg


def test_error_unexpected_key(saved, tmp_path):
  _rewrite(saved / "model.safetensors", lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
  msg = _convert_err(saved, tmp_path / "out")
  assert "model.layers.0.self_attn.q_proj.bias" in msg and "model.safetensors" in msg


def test_error_wrong_shape(saved, tmp_path):
  cfg = json.loads((saved / "config.json").read_text())
  cfg["intermediate_size"] = 100
  (saved / "config.json").write_text(json.dumps(cfg))
  msg = _convert_err(saved, tmp_path / "out")
  assert "model.safetensors" in msg and "mlp." in msg and "expected shape" in msg
  assert "100" in msg and "96" in msg


def test_error_unknown_dtype(saved, tmp_path):
  _rewrite(saved / "model.safetensors",
           lambda t: {k: (v.astype(np.float64) if k == "model.norm.weight" else v) for k, v in t.items()})
  msg = _convert_err(saved, tmp_path / "out")
  assert "F64" in msg and "model.norm.weight" in msg


def test_error_truncated_file(saved, tmp_path):
  p = saved / "model.safetensors"
  p.write_bytes(p.read_bytes()[:-1000])
  msg = _convert_err(saved, tmp_path / "out")
  assert "truncated" in msg and str(p) in msg


def test_error_shard_count_and_missing_shard(tmp_path):
  model = H.hf_model(n_heads=4, n_kv=2)
  src = tmp_path / "hf"
  model.save_pretrained(src, max_shard_size="40KB")
  shards = sorted(src.glob("model-*.safetensors"))
  assert len(shards) >= 3
  index = json.loads((src / hf.INDEX).read_text())
  shards[1].unlink()
  assert shards[1].name in _convert_err(src, tmp_path / "out")
  # An index naming N-of-M files with N != M.
  last = shards[-1].name
  index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[1].name}
  (src / hf.INDEX).write_text(json.dumps(index))
  msg = _convert_err(src, tmp_path / "out")
  assert "mismatched shard count" in msg and last in msg


def test_error_index_key_not_in_file(tmp_path):
  model = H.hf_model(n_heads=4, n_kv=2)
  src = tmp_path / "hf"
  model.save_pretrained(src, max_shard_size="40KB")
  index = json.loads((src / hf.INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  key = next(k for k, f in index["weight_map"].items() if f == files[-1])
  index["weight_map"][key] = files[0]  # every file keeps some key; this one is listed in the wrong file
  (src / hf.INDEX).write_text(json.dumps(index))
  msg = _convert_err(src, tmp_path / "out")
  assert files[0] in msg and key in msg


@pytest.mark.parametrize("edit,needle", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_error_unsupported_config(saved, tmp_path, edit, needle):
  cfg = json.loads((saved / "config.json").read_text())
  cfg.update(edit)
  (saved / "config.json").write_text(json.dumps(cfg))
  msg = _convert_err(saved, tmp_path / "out")
  assert needle in msg and "config.json" in msg


def test_error_output_not_empty(saved, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    hf.hf_to_l2jax(saved, out)
  assert (out / "keep.txt").read_text() == "x"


def test_failure_while_writing_leaves_nothing(saved, tmp_path, monkeypatch):
  from l2jax import checkpoint

  def boom(path, params):
    (Path(path) / "partial").mkdir(parents=True)
    raise OSError("disk full")
  monkeypatch.setattr(checkpoint, "save_params", boom)
  _convert_err(saved, tmp_path / "out", OSError)


def test_error_tokenizer_larger_than_vocab(saved, tmp_path):
  # The Llama 2 tokenizer has 32000 pieces; this model has 512 embedding rows.
  msg = _convert_err(saved, tmp_path / "out", tokenizer=H.LLAMA2_TOKENIZER)
  assert "32000" in msg and "512" in msg


def test_export_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
    hf.l2jax_to_hf(tmp_path / "nope", tmp_path / "out")
  assert H.no_partial_output(tmp_path / "out")


def test_cli_reports_error_and_exit_code(saved, tmp_path):
  (saved / "config.json").unlink()
  r = subprocess.run([sys.executable, str(H.ROOT / "tools" / "hf_to_l2jax.py"), str(saved), str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=tmp_path)
  assert r.returncode == 1
  assert "error:" in r.stderr and "config.json" in r.stderr
  assert H.no_partial_output(tmp_path / "out")


def test_bench_converter_rss_smoke(tmp_path):
  # tools/bench_forward.py's memory figure: a synthetic sharded checkpoint converted by the CLI in a subprocess.
  r = H.tool("bench_forward").bench_convert_rss("test", "bfloat16", "4KB", str(tmp_path))
  assert r["shards"] > 1 and r["peak_rss_bytes"] > r["checkpoint_bytes"] > 0
  assert (tmp_path / "l2jax" / "params").is_dir()


# ---- the streaming parameter writer the converters use ----

def _read_back(path: Path) -> tuple[dict, dict, dict]:
  """(restored arrays by key, Orbax tree metadata by key as (shape, dtype, chunk shape), _METADATA json)."""
  import jax
  import orbax.checkpoint as ocp

  from l2jax import checkpoint
  arrays = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(checkpoint.restore_params(path))}
  meta = ocp.PyTreeCheckpointer().metadata(path).item_metadata
  meta = meta.tree if hasattr(meta, "tree") else meta
  info = {jax.tree_util.keystr(k): (tuple(m.shape), str(m.dtype), tuple(m.storage.chunk_shape))
          for k, m in jax.tree_util.tree_leaves_with_path(meta, is_leaf=lambda m: hasattr(m, "shape"))}
  return arrays, info, json.loads((path / "_METADATA").read_text())


def _assert_same_checkpoint(a: Path, b: Path) -> None:
  arrays_a, info_a, meta_a = _read_back(a)
  arrays_b, info_b, meta_b = _read_back(b)
  assert set(arrays_a) == set(arrays_b)
  for k in arrays_a:
    assert arrays_a[k].dtype == arrays_b[k].dtype and arrays_a[k].shape == arrays_b[k].shape, k
    assert arrays_a[k].tobytes() == arrays_b[k].tobytes(), f"{k} differs"
  assert info_a == info_b
  assert meta_a == meta_b  # tree metadata (value types, write shapes), OCDBT, zarr version
  handlers = [json.loads((p / "_CHECKPOINT_METADATA").read_text())["item_handlers"] for p in (a, b)]
  assert handlers[0] == handlers[1]


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_streaming_write_matches_plain_save(saved, tmp_path, monkeypatch, dtype):
  # The converters hand save_params lazily built parameters, written one at a time with Orbax partial
  # saves; the result must read back exactly like PyTreeCheckpointer's save of the whole tree.
  import jax

  from l2jax import checkpoint
  seen = {}
  real = checkpoint.save_params

  def spy(path, params):
    seen["params"] = params
    return real(path, params)
  monkeypatch.setattr(checkpoint, "save_params", spy)
  hf.hf_to_l2jax(saved, tmp_path / "l2", dtype=dtype)
  lazy = seen["params"]
  assert all(callable(v) for v in jax.tree.leaves(lazy))
  assert not list((tmp_path / "l2").glob("params.tmp-stream-*")) and not list(tmp_path.glob("*.tmp-*"))
  real(tmp_path / "plain", jax.tree.map(lambda f: f(), lazy))  # the whole tree at once
  _assert_same_checkpoint(tmp_path / "l2" / "params", tmp_path / "plain")
  # Restoring onto shardings (how training restores) reads the streamed checkpoint too.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  arrays = _read_back(tmp_path / "plain")[0]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                          checkpoint.restore_params(tmp_path / "plain"))
  got = checkpoint.restore_params(tmp_path / "l2" / "params", abstract)
  for k, v in jax.tree_util.tree_leaves_with_path(got):
    assert isinstance(v, jax.Array) and np.asarray(v).tobytes() == arrays[jax.tree_util.keystr(k)].tobytes()
  checkpoint.load_model_dir(tmp_path / "l2")


def test_streaming_write_without_partial_save_falls_back(tmp_path, monkeypatch):
  # An Orbax without the partial-save API: lazy leaves are all built and saved at once, same checkpoint.
  from l2jax import checkpoint
  rng = np.random.default_rng(0)
  params = {"embed": rng.standard_normal((6, 4)).astype(np.float32),
            "layers": {"w1": rng.standard_normal((2, 4, 3)).astype(np.float16), "wo": np.ones((2, 3), np.float32)}}
  checkpoint.save_params(tmp_path / "plain", params)
  lazy = {"embed": lambda: params["embed"],
          "layers": {"w1": lambda: params["layers"]["w1"], "wo": params["layers"]["wo"]}}  # a mix of both
  checkpoint.save_params(tmp_path / "streamed", lazy)
  _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "plain")
  monkeypatch.setattr(checkpoint, "_partial_save_api", lambda: None)
  checkpoint.save_params(tmp_path / "fallback", lazy)
  _assert_same_checkpoint(tmp_path / "fallback", tmp_path / "plain")


def test_streaming_write_failure_leaves_nothing(tmp_path):
  from l2jax import checkpoint

  def unreadable():
    raise OSError("read error")
  # "a" is written before "b" fails.
  params = {"a": lambda: np.ones((3, 2), np.float32), "b": {"c": unreadable}}
  with pytest.raises(OSError, match="read error"):
    checkpoint.save_params(tmp_path / "params", params)
  assert list(tmp_path.iterdir()) == []
