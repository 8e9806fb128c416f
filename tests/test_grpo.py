"""GRPO and RLOO as PPO's rollout with group advantages (PPO.estimator; DeepSeekMath section 4.1.2, Ahmadian et al.
2024): the config's combinations, k samples per prompt with their own keys, the group score by hand, one iteration
on 8 devices = one device, SIGKILL resume, the launcher (no value/ written), and learning on a rule reward. The
small random models and configs are tests/test_ppo.py's."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax import checkpoint as ck
from l2jax import config as c
from l2jax import sharding as shd
from l2jax.model import llama, presets
from l2jax.rl import rollout as ro
from tests.test_ppo import PROMPTS, ROOT, metrics, models, one_device, ppo_config  # noqa: F401 (fixtures)

GROUP = dict(batch_prompts=4, group_size=2, minibatch=2)


def group_config(models, estimator, **kw) -> c.PPO:
  return ppo_config(models, **{"estimator": estimator, **GROUP, **kw})


# ----------------------------------------------------------------------------------------------- config

def test_config_defaults_per_estimator_and_refused_combinations(models):
  g, r, p = group_config(models, "grpo"), group_config(models, "rloo"), ppo_config(models)
  assert (g.kl_placement, g.normalization, g.rows) == ("loss", "sequence", 8)     # DeepSeekMath
  assert (r.kl_placement, r.normalization) == ("reward", "token")                 # Ahmadian et al., TRL RLOO
  assert (p.estimator, p.group_size, p.kl_placement, p.normalization, p.rows) == ("gae", 1, "reward", "token", 8)
  assert group_config(models, "rloo", kl_in="loss", loss_normalization="sequence").kl_placement == "loss"
  for kw, msg in ((dict(estimator="ppo"), "estimator: expected one of gae, grpo, rloo"),
                  (dict(group_size=4), "group_size=4: estimator='gae' samples one response"),
                  (dict(kl_in="loss"), "kl_in='loss': estimator='gae'"),
                  (dict(loss_normalization="sequence"), "loss_normalization='sequence': estimator='gae'"),
                  (dict(estimator="grpo"), "group_size=1: estimator='grpo' needs >= 2"),
                  (dict(estimator="rloo", group_size=2, kl_in="both"), "kl_in: expected 'reward', 'loss'"),
                  (dict(estimator="grpo", group_size=2, loss_normalization="seq"), "loss_normalization: expected")):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
      ppo_config(models, **kw)


def test_memory_plan_drops_the_value_model_and_counts_k_rows_per_prompt():
  from l2jax.launch import load_experiment
  from l2jax.stages import ppo_plan
  ppo70, _ = load_experiment(str(ROOT / "experiments/ppo.py:70b"))
  grpo70, _ = load_experiment(str(ROOT / "experiments/grpo.py:70b"))
  assert (grpo70.rows, grpo70.minibatch * grpo70.group_size) == (ppo70.batch_prompts, ppo70.minibatch)
  a, b = ppo_plan.plan(ppo70, 64), ppo_plan.plan(grpo70, 64)
  assert not any("value" in k for k in b["items_gib"]) and not any("value" in k for k in b["phases_gib"]["train"])
  value = a["items_gib"]["value params"] + a["items_gib"]["value AdamW moments"]
  assert b["resident_gib"] == pytest.approx(a["resident_gib"] - value)
  assert b["phases_gib"]["generate"] == a["phases_gib"]["generate"]       # the same 512 rows decode
  assert b["phases_gib"]["train"]["policy activations (one micro-batch)"] == \
      a["phases_gib"]["train"]["policy activations (one micro-batch)"]    # micro-batch: 1 prompt x 8 = PPO's 8 rows


# ----------------------------------------------------------------------------------------------- rollout

CFG = presets.get("test", vocab_size=128, max_seq_len=64)


def test_group_rows_are_contiguous_and_draw_their_own_samples():
  """row = prompt * k + sample, one generate call; each row's key folds in (prompt index, row), so the k samples
  of a prompt differ, and a row draws the same tokens whatever else is in the batch."""
  graphdef, params = llama.split(llama.init(CFG, 0))
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  sample_sh = shd.tree_shardings(llama.logical_axes(llama.abstract(CFG)), mesh, shd.SAMPLE_RULES, params)
  gen = jax.jit(ro.make_generate(graphdef, CFG, mesh, sample_sh, max_new_tokens=8, temperature=1.0, eos_id=127,
                                 pad_id=0))
  prompt = np.zeros((2, 6), np.int32)
  prompt[0, :3], prompt[1, :5] = [1, 5, 6], [1, 7, 8, 9, 10]
  batch = {"prompt_tokens": prompt, "prompt_lens": np.array([3, 5], np.int32), "is_safety": np.array([0, 1], np.int32),
           "index": np.array([11, 42], np.int32)}
  k = 4
  grouped = jax.device_get(ro.repeat_groups(batch, k))
  np.testing.assert_array_equal(grouped["index"], [11] * k + [42] * k)
  np.testing.assert_array_equal(grouped["prompt_tokens"][k + 2], prompt[1])
  key = jax.random.key_data(jax.random.key(0))
  with shd.use_rules(mesh, shd.SAMPLE_RULES):
    toks = np.asarray(gen(params, grouped, key).tokens_bn)
    again = np.asarray(gen(params, grouped, key).tokens_bn)
    other = dict(grouped, index=np.array([11] * k + [7] * k, np.int32))   # prompt 42's rows now another prompt
    toks_other = np.asarray(gen(params, other, key).tokens_bn)
  for g in range(2):
    assert len({tuple(t) for t in toks[g * k:(g + 1) * k]}) == k, toks
  np.testing.assert_array_equal(toks, again)
  np.testing.assert_array_equal(toks_other[:k], toks[:k])


def _rule(frozen, tokens_bt, seq_mask_bt, mask_bt):
  """Rh = the count of response tokens below 40, Rs = 0.3 x the response length - 2."""
  helpful = jnp.sum((tokens_bt < 40) & mask_bt, axis=1).astype(jnp.float32)
  return helpful, 0.3 * jnp.sum(mask_bt, axis=1).astype(jnp.float32) - 2.0


@pytest.mark.parametrize("estimator,kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_group_score_by_hand(estimator, kl_in):
  """Sequence reward = raw LOGIT(Rc) - penalty (no EOS) [- beta * sum k1]; advantages by hand, per group, on
  every response token; no value model, per-token rewards or returns."""
  graphdef, params = llama.split(llama.init(CFG, 0))
  ref = llama.split(llama.init(CFG, 1))[1]          # another reference: the KL is not 0
  k, B, N = 3, 6, 5
  rng = np.random.default_rng(0)
  lens_b = np.array([0, 5, 2, 5, 1, 5], np.int32)   # rows 1, 3, 5 run to the limit; row 0 is empty
  resp = rng.integers(2, 120, (B, N)).astype(np.int32)
  eos = 127
  resp[2, 1], resp[4, 0] = eos, eos
  resp = np.where(np.arange(N)[None] < lens_b[:, None], resp, 0)
  batch = {"prompt_tokens": np.tile(np.array([[1, 5, 6, 0]], np.int32), (B, 1)),
           "prompt_lens": np.full(B, 3, np.int32), "is_safety": np.array([0, 0, 0, 1, 1, 1], np.int32),
           "index": np.repeat(np.arange(2, dtype=np.int32), k)}
  beta, penalty = 0.2, 0.5
  score = ro.make_group_score(graphdef, graphdef, _rule, estimator=estimator, group_size=k, eos_id=eos, pad_id=0,
                              kl_beta=beta, kl_in=kl_in, threshold=0.15, missing_eos_penalty=penalty)
  r = jax.jit(score)({"policy": params}, {"ref": ref}, batch, ro.Responses(jnp.asarray(resp), jnp.asarray(lens_b)))
  assert r.values is None and r.rewards is None and r.returns is None and r.whitened is None
  mask = np.asarray(r.mask)
  np.testing.assert_array_equal(mask.sum(1), lens_b)
  helpful = np.array([np.sum(resp[b, :lens_b[b]] < 40) for b in range(B)], np.float64)
  safety = 0.3 * lens_b - 2.0
  rc = np.where(batch["is_safety"].astype(bool) | (safety < np.log(0.15 / 0.85)), safety, helpful)
  ended = np.array([lens_b[b] > 0 and resp[b, lens_b[b] - 1] == eos for b in range(B)])
  k1 = np.sum(np.where(mask, np.asarray(r.logprobs) - np.asarray(r.ref_logprobs), 0.0), axis=1)
  assert np.all(np.abs(k1[lens_b > 0]) > 1e-3) and k1[0] == 0.0
  want_r = rc - penalty * ~ended - (beta * k1 if kl_in == "reward" else 0.0)
  np.testing.assert_allclose(np.asarray(r.seq_reward), want_r, rtol=1e-5, atol=1e-5)
  g = want_r.reshape(2, k)
  if estimator == "grpo":   # (r - mean) / (unbiased std + 1e-4)
    want_a = (g - g.mean(1, keepdims=True)) / (np.sqrt(((g - g.mean(1, keepdims=True)) ** 2).sum(1, keepdims=True)
                                                        / (k - 1)) + 1e-4)
  else:                     # r - the mean of the other k - 1
    want_a = g - (g.sum(1, keepdims=True) - g) / (k - 1)
  np.testing.assert_allclose(np.asarray(r.seq_advantage), want_a.reshape(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(r.advantages), np.where(mask, want_a.reshape(-1)[:, None], 0.0),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- the stage

def _one_iteration(models, estimator, mesh_cfg, **kw):
  from l2jax.stages import ppo
  cfg = group_config(models, estimator, mesh=mesh_cfg, **kw)
  return ppo.one_iteration(cfg, shd.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor))


@pytest.mark.slow
@pytest.mark.parametrize("estimator,kw", [("grpo", {}), ("rloo", {"micro_batch": 1, "missing_eos_penalty": 0.5})])
def test_one_iteration_on_8_devices_equals_one_device(models, estimator, kw):
  assert jax.device_count() == 8
  p8, m8 = _one_iteration(models, estimator, c.Mesh(data=2, fsdp=2, tensor=2), **kw)
  import l2jax.sharding
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  orig = l2jax.sharding.make_mesh
  l2jax.sharding.make_mesh = lambda *a, **k: one
  try:
    p1, m1 = _one_iteration(models, estimator, c.Mesh(fsdp=1), **kw)
  finally:
    l2jax.sharding.make_mesh = orig
  assert sorted(p1) == ["policy"]                     # no value model
  assert m1["kl"] == 0.0 and m1["group_reward_std"] > 0 and 0.0 <= m1["zero_std_groups"] <= 1.0
  for k in ("rc", "reward_total", "group_reward_std", "advantage_abs", "policy_loss", "entropy", "ratio"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _sets(models, *more):
  sets = [f"policy={models / 'policy'}", f"reward_models.helpful={models / 'rm_helpful'}",
          f"reward_models.safety={models / 'rm_safety'}", "model.dtype=float32", "prompts.max_prompt_tokens=64",
          "max_new_tokens=16", "samples_logged=8", "prompts.sources=" + ",".join(PROMPTS), *more]
  return [a for s in sets for a in ("--set", s)]


def _launch(exp, run_dir, sets, wait=True, devices=2):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, "-m", "l2jax.launch", exp, "--run-dir", str(run_dir), *sets]
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if wait:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  return p


def _check_samples_by_hand(run_dir, estimator, k, beta, kl_in):
  """Every row of each iteration is logged: its reward is LOGIT(Rc) [- beta * k1] (no penalty in test configs),
  its advantage the estimator's on its group (numpy), and the k responses of a prompt differ."""
  from l2jax.rl import advantages
  rows = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
  iters = sorted({r["iteration"] for r in rows})
  for it in iters:
    rs = [r for r in rows if r["iteration"] == it]
    reward = np.array([r["reward"] for r in rs])
    kl = np.array([r["kl"] for r in rs])
    want = np.array([r["rc"] for r in rs]) - (beta * kl if kl_in == "reward" else 0.0)
    np.testing.assert_allclose(reward, want, rtol=1e-5, atol=1e-5)
    g = reward.reshape(-1, k)
    if estimator == "grpo":
      hand = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    else:
      hand = g - (g.sum(1, keepdims=True) - g) / (k - 1)
    adv = np.array([r["advantage"] for r in rs])
    np.testing.assert_allclose(adv, hand.reshape(-1), rtol=1e-4, atol=1e-5)
    lib = getattr(advantages, estimator)(jnp.asarray(reward, jnp.float32), k)
    np.testing.assert_allclose(adv, np.asarray(lib), rtol=1e-4, atol=1e-5)
    for p in range(len(rs) // k):
      group = rs[p * k:(p + 1) * k]
      assert len({json.dumps(r["prompt"]) for r in group}) == 1
      assert len({r["response"] for r in group}) == k, group
  return iters


@pytest.mark.slow
def test_rloo_through_the_launcher_writes_no_value_model(models, tmp_path):
  """experiments/rloo.py:test: evaluations at 0, 1, 2 (one response per held-out prompt), samples with the
  estimator's reward and advantage per row, final/ and no value/."""
  import l2jax
  run = tmp_path / "rloo"
  _launch("experiments/rloo.py:test", run, _sets(models, "eval_every=1"))
  assert (run / "final" / "config.json").is_file() and not (run / "value").exists()
  assert l2jax.load(run / "final")(jnp.array([[1, 5, 6]], jnp.int32)).shape == (1, 3, 512)
  cfg = json.loads((run / "config.json").read_text())
  assert (cfg["estimator"], cfg["group_size"], cfg["kl_in"]) == ("rloo", 2, "")
  m = metrics(run)
  assert sorted(m) == [0, 1, 2] and all("eval_rc" in m[s] for s in (0, 1, 2))
  for key in ("rc", "kl", "kl_k3", "entropy", "reward_total", "group_reward_std", "zero_std_groups", "clipfrac",
              "approx_kl", "policy_loss", "response_len", "eos_rate", "t_generate", "t_train"):
    assert key in m[1] and key in m[2], key
  assert "value_loss" not in m[1] and "explained_variance" not in m[1] and "kl_loss" not in m[1]
  assert m[2]["kl"] != 0.0
  assert _check_samples_by_hand(run, "rloo", 2, 0.05, "reward") == [1, 2]


@pytest.mark.slow
def test_grpo_sigkill_resume_is_bit_identical_through_the_launcher(models, tmp_path):
  sets = _sets(models, "eval_every=0", "iterations=4", "ckpt.every=1", "ckpt.async_save=false")
  _launch("experiments/grpo.py:test", tmp_path / "ref", sets)
  p = _launch("experiments/grpo.py:test", tmp_path / "killed", sets, wait=False)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpts / "2").is_dir():
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  _launch("experiments/grpo.py:test", tmp_path / "killed", sets)
  for d in ("ref", "killed"):
    assert (tmp_path / d / "final" / "config.json").is_file() and not (tmp_path / d / "value").exists()
  a = ck.restore_params(tmp_path / "ref" / "final" / "params")
  b = ck.restore_params(tmp_path / "killed" / "final" / "params")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ref, res = metrics(tmp_path / "ref"), metrics(tmp_path / "killed")
  for k in ("batch_crc", "rc", "reward_total", "kl_loss", "policy_loss"):
    assert [ref[s][k] for s in (1, 2, 3, 4)] == [res[s][k] for s in (1, 2, 3, 4)], k
  assert _check_samples_by_hand(tmp_path / "killed", "grpo", 2, 0.04, "loss") == [1, 2, 3, 4]


@pytest.mark.slow
def test_grpo_learns_a_rule_reward_with_bounded_kl(models, tmp_path, one_device):
  """tests/test_ppo.py's rule scorer (10x the share of response tokens with an id below 64) in place of the
  reward models, with GRPO's defaults (k3 KL in the loss with DeepSeekMath's beta 0.04, sequence-mean loss) and
  PPO's test rows (4 prompts x 4 samples, 4 steps of 4 rows per iteration): the reward rises clearly while the
  KL stays bounded (fixed seeds; here 1.4 -> 3.9 with the KL at most 13 nats)."""
  from l2jax.stages import ppo

  def rule(frozen, tokens_bt, seq_mask_bt, mask_bt):
    share = jnp.sum((tokens_bt < 64) & mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1)
    return 10.0 * share, 10.0 * share
  cfg = group_config(models, "grpo", iterations=12, eval_every=0, batch_prompts=4, group_size=4, minibatch=1,
                     kl_beta=0.04, optim=c.AdamW(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                     ckpt=c.Checkpointing(every=100, keep=1))
  ppo.run(cfg, tmp_path, reward_fn=rule)
  m = metrics(tmp_path)
  first = np.mean([m[s]["rc"] for s in (1, 2, 3)])
  last = np.mean([m[s]["rc"] for s in (10, 11, 12)])
  kls = [m[s]["kl"] for s in sorted(m)]
  print("grpo rule reward: first", first, "last", last, "kl", kls)
  assert last > first + 1.0, (first, last)
  assert max(kls) < 16.0
  assert not (tmp_path / "value").exists() and (tmp_path / "final" / "config.json").is_file()
