"""Sampling engine: cached decode equals a full forward, ragged rows are independent, sampling distributions,
stop rules, errors, sharding, and stories260K greedy output equal to llama2.c's run.c."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2jax.model import llama, presets
from l2jax.sample import Sampler, _generate, choose_tokens, process_logits

ROOT = Path(__file__).resolve().parents[1]
S260K = ROOT / "data" / "stories260K"
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
PROMPTS = [[1, 5, 6, 7], [1, 9], [1] + list(range(20, 37))]  # lengths 4, 2, 18: two prompt buckets apart
N_NEW = 12  # with PROMPTS: batch 4, prompt 32, cache 32, output 16 -- most tests share these compiled programs
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=40)


def make_model(seed: int = 0, scale: float = 10.0, **cfg_overrides) -> llama.Llama:
  """A random float32 test model with weights scaled up, so logits are peaked and argmax has clear margins."""
  cfg = presets.get("test", **cfg_overrides)
  graphdef, params = llama.split(llama.init(cfg, seed))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a if "norm" in jax.tree_util.keystr(path) else a * scale, params)
  return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def sampler(model):
  return Sampler(model)


# ---- the cache: every decode step's logits equal a full forward pass over the whole sequence ----

def full_logits(m: llama.Llama, seqs: list[list[int]]) -> np.ndarray:
  """Logits [B, T, V] of a plain causal forward (no cache) over right-padded sequences, in one jitted call."""
  graphdef, params = llama.split(m)
  T = max(map(len, seqs))
  tokens = np.zeros((len(seqs), T), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


@pytest.mark.parametrize("cfg,kw", [(dict(), dict(temperature=0.0)),
                                    (dict(), dict(temperature=1.0, top_p=0.95)),
                                    (dict(n_kv_heads=1, scan_layers=False), dict(temperature=1.0))],
                         ids=["gqa-scan-greedy", "gqa-scan-top_p", "mqa-unscanned-sampled"])
def test_cached_logits_equal_full_forward(cfg, kw):
  m = make_model(seed=1, **cfg)
  out = Sampler(m).generate(PROMPTS, max_new_tokens=N_NEW, seed=4, stop_on_eos=False, return_logits=True, **kw)
  assert out.tokens.shape == (3, N_NEW) and out.logits.shape == (3, N_NEW, 128)
  full_btv = full_logits(m, [p + list(out.tokens[b]) for b, p in enumerate(PROMPTS)])
  for b, p in enumerate(PROMPTS):
    full_tv = full_btv[b, len(p) - 1:len(p) - 1 + N_NEW]  # the logits that predicted each new token
    np.testing.assert_allclose(out.logits[b], full_tv, atol=1e-5, rtol=0)
    lp_tv = np.asarray(jax.nn.log_softmax(full_tv, axis=-1))
    np.testing.assert_allclose(out.model_logprobs[b], lp_tv[np.arange(N_NEW), out.tokens[b]], atol=1e-5)
    if kw["temperature"] == 0:
      np.testing.assert_array_equal(out.tokens[b], full_tv.argmax(-1))
      np.testing.assert_array_equal(out.logprobs[b], 0.0)


# ---- ragged batches: each row is exactly what its prompt gives alone ----

@pytest.mark.parametrize("kw", [dict(temperature=0.0), SAMPLED], ids=["greedy", "sampled"])
def test_ragged_rows_equal_alone(sampler, kw):
  seeds = [11, 22, 33]
  batch = sampler.generate(PROMPTS, N_NEW, seed=seeds, stop_on_eos=False, **kw)
  for b, p in enumerate(PROMPTS):
    alone = sampler.generate([p], N_NEW, seed=[seeds[b]], stop_on_eos=False, **kw)
    np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[b], alone.logprobs[0], atol=1e-5)
    np.testing.assert_allclose(batch.model_logprobs[b], alone.model_logprobs[0], atol=1e-5)
  # an int seed s for one prompt is row 0 of a batch with seed s
  first = sampler.generate(PROMPTS[:1], N_NEW, seed=11, stop_on_eos=False, **kw)
  np.testing.assert_array_equal(first.tokens[0], batch.tokens[0])


# ---- determinism and seeds ----

def test_greedy_deterministic_and_seeds(sampler):
  g1 = sampler.generate(PROMPTS, N_NEW, temperature=0.0, seed=1)
  g2 = sampler.generate(PROMPTS, N_NEW, temperature=0.0, seed=2)
  np.testing.assert_array_equal(g1.tokens, g2.tokens)
  s1 = sampler.generate(PROMPTS, N_NEW, seed=5, **SAMPLED)
  s2 = sampler.generate(PROMPTS, N_NEW, seed=5, **SAMPLED)
  s3 = sampler.generate(PROMPTS, N_NEW, seed=6, **SAMPLED)
  np.testing.assert_array_equal(s1.tokens, s2.tokens)
  np.testing.assert_array_equal(s1.logprobs, s2.logprobs)
  assert (s1.tokens != s3.tokens).any()
  assert (s1.logprobs < 0).any() and (s1.logprobs <= 1e-6).all()
  k1 = sampler.generate(PROMPTS, N_NEW, seed=5, **dict(SAMPLED, top_k=1))  # top-k 1 is greedy
  np.testing.assert_array_equal(k1.tokens, g1.tokens)
  np.testing.assert_allclose(k1.logprobs, 0.0, atol=1e-6)


# ---- top-k / top-p: sampled frequencies match the truncated, renormalised distribution ----

LOGITS_V = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, -0.3, -1.0, -2.0, 3.0, 0.2], np.float32)


def reference_probs(logits, temperature, top_k, top_p):
  """Independent numpy reference: softmax(logits / T), keep top k, renormalise, keep the top-p nucleus."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z)
  keep = np.zeros(len(z), bool)
  keep[order[:top_k or len(z)]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1.0:
    mass, nucleus = 0.0, np.zeros(len(z), bool)
    for i in order:
      if keep[i] and mass < top_p:
        nucleus[i] = True
        mass += p[i]
    p = np.where(nucleus, p, 0.0)
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p,candidates", [
    (0.7, 5, 1.0, 64), (1.0, 0, 0.8, 64), (1.3, 6, 0.7, 64), (1.0, 0, 1.0, 64),
    (0.7, 5, 1.0, 2), (1.3, 6, 0.7, 2)])  # candidates=2 forces the exact full-vocabulary path
def test_sampling_frequencies(temperature, top_k, top_p, candidates, monkeypatch):
  from scipy import stats

  import l2jax.sample
  monkeypatch.setattr(l2jax.sample, "CANDIDATES", candidates)
  n = 40_000
  want = reference_probs(LOGITS_V, temperature, top_k, top_p)
  keys = jax.random.split(jax.random.key(1234), n)
  logits_bv = jnp.broadcast_to(jnp.asarray(LOGITS_V), (n, len(LOGITS_V)))
  tok, lp, mlp = jax.jit(lambda k, x: choose_tokens(k, x, jnp.float32(temperature), jnp.int32(top_k),
                                                    jnp.float32(top_p), greedy=False, use_top_k=top_k > 0,
                                                    use_top_p=top_p < 1))(keys, logits_bv)
  counts = np.bincount(np.asarray(tok), minlength=len(LOGITS_V))
  kept = want > 0
  assert counts[~kept].sum() == 0, f"mass outside the kept set: {counts[~kept]}"
  assert kept.sum() == (top_k or len(LOGITS_V)) if top_p == 1.0 else True
  chi2 = stats.chisquare(counts[kept], n * want[kept])
  assert chi2.pvalue > 1e-3, (counts, n * want)
  np.testing.assert_allclose(np.asarray(lp), np.log(want[np.asarray(tok)]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(mlp), np.asarray(jax.nn.log_softmax(LOGITS_V))[np.asarray(tok)], atol=1e-5)


def test_process_logits_kept_set():
  x = jnp.asarray(np.stack([LOGITS_V, LOGITS_V, np.r_[LOGITS_V[:-1], 1.5]]))  # row 2: a tie at the 3rd place
  kept = lambda k, p: np.isfinite(np.asarray(jax.jit(
      lambda x: process_logits(x, 1.0, k, p, use_top_k=True, use_top_p=True))(x)))
  assert [sorted(np.flatnonzero(r)) for r in kept(3, 1.0)] == [[0, 1, 10]] * 2 + [[0, 1, 10, 11]]  # ties kept
  assert [list(np.flatnonzero(r)) for r in kept(0, 1e-6)] == [[10]] * 3  # a tiny nucleus keeps the argmax
  assert kept(0, 1.0).all() and kept(len(LOGITS_V) + 5, 1.0).all()


@pytest.mark.parametrize("scale,top_k,top_p", [(4.0, 0, 0.9), (0.3, 0, 0.9), (1.0, 10, 1.0), (1.0, 100, 1.0),
                                                (4.0, 100, 0.5), (0.3, 80, 0.8), (1.0, 0, 1.0)])
def test_kept_set_matches_reference_fast_and_exact_paths(scale, top_k, top_p):
  from l2jax.sample import CANDIDATES
  logits = np.random.default_rng(7).standard_normal((3, 300)).astype(np.float32) * scale
  got = np.isfinite(np.asarray(jax.jit(lambda x: process_logits(
      x, 0.9, top_k, top_p, use_top_k=top_k > 0, use_top_p=top_p < 1))(logits)))
  want = np.stack([reference_probs(r, 0.9, top_k, top_p) > 0 for r in logits])
  np.testing.assert_array_equal(got, want)
  sizes = want.sum(-1)
  fallback = top_k > CANDIDATES or (top_p < 1 and sizes.max() > CANDIDATES)
  assert fallback == ((scale, top_k) in [(0.3, 0), (1.0, 100), (4.0, 100), (0.3, 80)]), sizes  # both paths run


# ---- stop rules, per row ----

def test_eos_stops_each_row_independently(model):
  free = Sampler(model).generate(PROMPTS, N_NEW, stop_on_eos=False)
  eos = int(free.tokens[0, 3])  # make row 0's 4th token the EOS id
  out = Sampler(model, eos_id=eos).generate(PROMPTS, N_NEW)
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free.tokens[b] == eos)
    n = hits[0] + 1 if len(hits) else N_NEW
    assert out.lengths[b] == n
    assert out.stop_reasons[b] == ("eos" if len(hits) else "length")
    np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
    np.testing.assert_array_equal(out.tokens[b, n:], 0)
    np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)
    assert out.mask()[b].sum() == n
  assert out.lengths[0] <= 4 and out.stop_reasons[0] == "eos"
  assert any(r == "length" for r in out.stop_reasons), "want a row that does not stop on this EOS"
  stopped = Sampler(model).generate(PROMPTS, N_NEW, stop_on_eos=False, stop_ids=[eos])
  np.testing.assert_array_equal(stopped.lengths, out.lengths)


def test_max_new_tokens_and_context_limit(sampler):
  ctx = sampler.cfg.max_seq_len  # 64
  out = sampler.generate([[1] * (ctx - 3), [1, 2, 3], [1] * (ctx - 1)], max_new_tokens=10, stop_on_eos=False)
  np.testing.assert_array_equal(out.lengths, [3, 10, 1])
  assert out.stop_reasons == ["context", "length", "context"]
  assert out.tokens.shape == (3, 10) and (out.tokens[0, 3:] == 0).all()
  out = sampler.generate([[1, 2, 3]], max_new_tokens=1, stop_on_eos=False)
  assert out.lengths.tolist() == [1] and out.stop_reasons == ["length"] and out.tokens.shape == (1, 1)


def test_bad_prompts_are_clear_errors(sampler):
  ctx = sampler.cfg.max_seq_len
  with pytest.raises(ValueError, match=r"prompt 1: 64 tokens leave no room .*max_seq_len=64"):
    sampler.generate([[1, 2], [1] * ctx], 4)
  with pytest.raises(ValueError, match="prompt 0: 70 tokens"):
    sampler.generate([[1] * 70], 4)
  with pytest.raises(ValueError, match="prompt 0: empty"):
    sampler.generate([[]], 4)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
    sampler.generate([[1, 500]], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampler.generate([[1]], 0)
  with pytest.raises(ValueError, match="one seed per prompt"):
    sampler.generate([[1], [1]], 4, temperature=1.0, seed=[1])
  with pytest.raises(ValueError, match="top_p"):
    sampler.generate([[1]], 4, temperature=1.0, top_p=0.0)


def test_shape_buckets_limit_recompiles(sampler):
  sampler.generate([[1, 2, 3]], 5)
  before = _generate._cache_size()
  sampler.generate([[1, 2, 3, 4, 5, 6]], 7, stop_on_eos=False)      # same batch / prompt / cache / output buckets
  sampler.generate([[1, 2], [4, 5, 6, 7, 8]], 6, stop_on_eos=False)  # batch 2: one new program
  assert _generate._cache_size() == before + 1


def test_bf16_weights(model):
  s = Sampler(model, dtype="bfloat16")
  assert s.cfg.dtype == "bfloat16" and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(s.params))
  out = s.generate(PROMPTS, N_NEW, temperature=0.0)
  assert out.tokens.shape == (3, N_NEW) and np.isfinite(out.model_logprobs).all()


def test_tuple_model_argument(model, sampler):
  graphdef, params = llama.split(model)
  a = Sampler((graphdef, params)).generate(PROMPTS, N_NEW)
  b = sampler.generate(PROMPTS, N_NEW)
  np.testing.assert_array_equal(a.tokens, b.tokens)


# ---- sharded sampling (8 fake CPU devices, tests/conftest.py) equals one device ----

@pytest.mark.slow
def test_sharded_equals_single_device(model, sampler):
  from l2jax import sharding
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported")
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  many = Sampler(model, mesh=mesh)
  wq = many.params["layers"]["wq"]
  assert len(wq.sharding.device_set) == 8 and wq.sharding.spec[2] == "tensor"
  for kw in (dict(temperature=0.0), SAMPLED):
    a = sampler.generate(PROMPTS, N_NEW, stop_on_eos=False, seed=3, **kw)
    b = many.generate(PROMPTS, N_NEW, stop_on_eos=False, seed=3, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.model_logprobs, b.model_logprobs, atol=1e-4)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


# ---- stories260K (converted with tools/llama2c_to_l2jax.py) greedy output equals llama2.c's run.c ----

@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory):
  tool = ROOT / "tools" / "llama2c_to_l2jax.py"
  out = tmp_path_factory.mktemp("s260k") / "ckpt"
  r = subprocess.run([sys.executable, str(tool), str(S260K / "stories260K.bin"), str(S260K / "tok512.model"),
                      str(out)], env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def runc():
  return json.loads((S260K / "expected_outputs.json").read_text())["runc_outputs"]


def test_stories260k_greedy_matches_llama2c_api(stories_ckpt, runc):
  from l2jax.sample import load_sampler
  s = load_sampler(str(stories_ckpt))  # no dtype: float32 from the converted config.json
  want = runc["greedy_200_empty_prompt"]
  short = runc["greedy_64_prompt_once_upon_a_time"]
  n_short = len(short["sequence_ids"]) - len(short["prompt_ids"])
  # run.c stops on BOS (id 1): stop there too; neither expected sequence contains one
  out = s.generate([want["prompt_ids"], short["prompt_ids"]], max_new_tokens=200, stop_ids=[1])
  assert out.tokens[0].tolist() == want["sequence_ids"][1:]
  assert out.tokens[1, :n_short].tolist() == short["sequence_ids"][len(short["prompt_ids"]):]
  assert s.complete([""], 200, temperature=0.0) == [want["text"]]


def test_stories260k_greedy_matches_llama2c_cli(stories_ckpt, runc):
  r = subprocess.run([sys.executable, "-m", "l2jax.sample", "--ckpt", str(stories_ckpt), "--prompt", "",
                      "--max-new-tokens", "200", "--temperature", "0"],  # no --dtype: the default reproduces run.c
                     env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout == runc["greedy_200_empty_prompt"]["text"] + "\n"


MULTIHOST_SCRIPT = r"""
import json
from l2jax import sharding as shd
shd.initialize_distributed()
import jax
from l2jax.model import llama, presets
from l2jax.sample import Sampler
model = llama.init(presets.get("test"), seed=3)
mesh = shd.make_mesh(1, -1, 1) if jax.process_count() > 1 else None
out = Sampler(model, mesh=mesh, eos_id=2, pad_id=0).generate(
    [[1, 5, 6], [1, 7], [1, 9, 9, 9], [1]], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=4)
print("RESULT", json.dumps([out.tokens.tolist(), out.lengths.tolist(), out.model_logprobs.tolist()]))
"""


@pytest.mark.slow
def test_two_process_sampling_equals_one_process(tmp_path):
  """Sharded sampling across two processes (jax.distributed on localhost, CPU): every process gets the whole
  batch, equal to what one process samples alone."""
  import socket
  script = tmp_path / "mh.py"
  script.write_text(MULTIHOST_SCRIPT)
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}

  def result(text):
    return json.loads([l for l in text.splitlines() if l.startswith("RESULT")][0][len("RESULT"):])

  single = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-2000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    got, want = result(out), result(single.stdout)
    assert got[:2] == want[:2]                       # the same tokens and lengths, exactly
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=1e-5)   # log-probs up to the all-reduce's rounding
