"""The PPO stage (Llama 2 section 3.2.3): one run's outputs, the KL at pi_0, sharded = one device, learning on a
rule reward, resume after SIGKILL, early stopping (and its resume). Small random models on the 512-piece
stories260K tokenizer keep it fast on 2 cores."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2jax import checkpoint as ck
from l2jax import config as c
from l2jax.model import heads, llama, presets

ROOT = Path(__file__).resolve().parents[1]
TOK = str(ROOT / "data/stories260K/tok512.model")
PROMPTS = (f"hh-safety:{ROOT}/data/hh-rlhf/harmless-base-test.jsonl.gz", f"oasst:{ROOT}/data/oasst/en_100_tree.jsonl")
ARCH = dict(vocab_size=512, max_seq_len=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A random policy and two random reward models of the same small shape."""
  d = tmp_path_factory.mktemp("ppo_models")
  cfg = presets.get("test", **ARCH)
  ck.save_model_dir(d / "policy", cfg, jax.device_get(llama.split(llama.init(cfg, 0))[1]), TOK)
  for i, name in enumerate(("rm_helpful", "rm_safety")):
    p = llama.split(heads.ScalarModel(cfg, rngs=nnx.Rngs(params=10 + i)))[1]
    ck.save_model_dir(d / name, cfg, jax.device_get(p), TOK, extra_files={"head.json": '{"kind": "reward_model"}'})
  return d


@pytest.fixture
def one_device(monkeypatch):
  """Stage runs in this process use the first of the 8 fake CPU devices only (cheaper on 2 cores)."""
  from l2jax import sharding as shd
  orig = shd.make_mesh
  monkeypatch.setattr(shd, "make_mesh", lambda *a, **k: orig(1, 1, 1, devices=jax.devices()[:1]))


def ppo_config(models, **kw) -> c.PPO:
  base = dict(name="ppo-t", policy=str(models / "policy"),
              reward_models=c.RewardModels(str(models / "rm_helpful"), str(models / "rm_safety")),
              model=presets.get("test"), frozen_dtype="float32",
              prompts=c.Prompts(sources=PROMPTS, max_prompt_tokens=64, eval_prompts=8, skip_bad=True),
              max_new_tokens=16, batch_prompts=8, minibatch=4, iterations=2, eval_every=1, samples_logged=2,
              ckpt=c.Checkpointing(every=1, keep=2), tensorboard=False,
              optim=c.AdamW(lr=1e-3, warmup_steps=0, schedule="constant"),
              value_optim=c.AdamW(lr=1e-3, warmup_steps=0, schedule="constant"), mesh=c.Mesh(fsdp=-1))
  base.update(kw)
  return c.PPO(**base)


def metrics(run_dir) -> dict[int, dict]:
  out: dict[int, dict] = {}
  for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    out.setdefault(r["step"], {}).update(r)
  return out


PENALTY = 0.5


@pytest.fixture(scope="module")
def two_iterations(models, tmp_path_factory):
  from l2jax import sharding as shd
  from l2jax.stages import ppo
  run_dir = tmp_path_factory.mktemp("ppo_run")
  mp = pytest.MonkeyPatch()
  orig = shd.make_mesh
  mp.setattr(shd, "make_mesh", lambda *a, **k: orig(1, 1, 1, devices=jax.devices()[:1]))
  try:
    result = ppo.run(ppo_config(models, missing_eos_penalty=PENALTY), run_dir)
  finally:
    mp.undo()
  return run_dir, result


def test_first_iteration_samples_from_pi0_so_kl_is_zero(two_iterations):
  m = metrics(two_iterations[0])
  assert m[1]["kl"] == 0.0 and m[1]["kl_k3"] == 0.0     # the policy is the reference before any update
  assert m[1]["ratio"] == pytest.approx(1.0, abs=0.05)   # mean over mini-batches: 1 for the first one
  assert m[2]["kl"] != 0.0                               # the updated policy differs


def test_logs_what_rl_users_look_for(two_iterations):
  m = metrics(two_iterations[0])
  for key in ("rh", "rs", "rc", "rc_whitened", "kl", "entropy", "clipfrac", "approx_kl", "value_loss",
              "explained_variance", "response_len", "eos_rate", "safety_share", "t_generate", "t_score", "t_train",
              "gen_tokens_per_s", "policy_loss", "finite"):
    assert key in m[1] and key in m[2], key
  for s in (1, 2):   # R~c: the whitened score less the penalty on each response cut without EOS
    assert m[s]["rc_whitened"] == pytest.approx(-PENALTY * (1.0 - m[s]["eos_rate"]), abs=1e-5)
  for key in ("eval_rc", "eval_rh", "eval_rs", "eval_kl", "eval_violation_rate", "eval_safety_share"):
    assert key in m[2], key
  # the evaluation set's mean Rc is the prompt-weighted mean of its safety and helpful halves
  share = m[2]["eval_safety_share"]
  assert 0.0 < share < 1.0
  assert m[2]["eval_rc"] == pytest.approx(share * m[2]["eval_rc_safety"] + (1 - share) * m[2]["eval_rc_helpful"],
                                          rel=1e-5, abs=1e-6)
  assert 0.0 <= m[2]["eval_violation_rate"] <= 1.0 and m[1]["response_len"] <= 16


def test_writes_samples_final_value_and_plot(two_iterations, models):
  import l2jax
  import l2jax.reward
  run_dir = two_iterations[0]
  rows = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
  assert [r["iteration"] for r in rows] == [1, 1, 2, 2]
  assert rows[0]["prompt"][-1]["role"] == "user" and isinstance(rows[0]["response"], str)
  assert {"rh", "rs", "rc", "is_safety"} <= set(rows[0])
  early = json.loads((run_dir / "early_stop.json").read_text())
  assert early["best_step"] in (0, 1, 2) and [h["step"] for h in early["history"]] == [0, 1, 2]
  assert "eval_rc" in metrics(run_dir)[0]           # the starting policy is evaluated as iteration 0
  from l2jax.stages.ppo_outputs import summary
  assert summary(run_dir).startswith("ppo: held-out at iteration 0: Rc ") and "python -m l2jax.report" in summary(run_dir)
  policy = l2jax.load(run_dir / "final")                 # final/ is a model directory l2jax.chat opens
  assert policy(jnp.array([[1, 5, 6]], jnp.int32)).shape == (1, 3, 512)
  value = l2jax.reward.load(run_dir / "value")
  assert value.score(["Hi"], ["Hello"]).shape == (1,)
  assert (run_dir / "ppo.png").stat().st_size > 1000
  stats = json.loads((run_dir / "data_stats.json").read_text())
  assert stats["train"]["kept"] > 100 and stats["eval_prompts"] == 8


def _run_one_iteration(models, mesh_cfg):
  from l2jax import sharding as shd
  from l2jax.stages import ppo
  cfg = ppo_config(models, mesh=mesh_cfg)
  return ppo.one_iteration(cfg, shd.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor))


@pytest.mark.slow
def test_one_iteration_on_8_devices_equals_one_device(models):
  assert jax.device_count() == 8
  p8, m8 = _run_one_iteration(models, c.Mesh(data=2, fsdp=2, tensor=2))
  from l2jax import sharding as shd
  one = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  import l2jax.sharding
  orig = l2jax.sharding.make_mesh
  l2jax.sharding.make_mesh = lambda *a, **k: one
  try:
    p1, m1 = _run_one_iteration(models, c.Mesh(fsdp=1))
  finally:
    l2jax.sharding.make_mesh = orig
  for k in ("rc", "kl", "policy_loss", "value_loss", "entropy"):
    assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_policy_learns_a_rule_reward_with_bounded_kl(models, tmp_path, one_device):
  """A rule scorer (10x the share of response tokens with an id below 64, an eighth of the 512-piece
  vocabulary) in place of the reward models: the reward rises clearly within a fixed number of iterations while
  the KL stays bounded (fixed seeds)."""
  from l2jax.stages import ppo

  def rule(frozen, tokens_bt, seq_mask_bt, mask_bt):
    share = jnp.sum((tokens_bt < 64) & mask_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1)
    return 10.0 * share, 10.0 * share
  cfg = ppo_config(models, iterations=24, eval_every=0, batch_prompts=16, minibatch=4, kl_beta=0.3,
                   optim=c.AdamW(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                   ckpt=c.Checkpointing(every=100, keep=1))
  ppo.run(cfg, tmp_path, reward_fn=rule)
  m = metrics(tmp_path)
  first = np.mean([m[s]["rc"] for s in (1, 2, 3)])
  last = np.mean([m[s]["rc"] for s in (22, 23, 24)])
  kls = [m[s]["kl"] for s in sorted(m)]
  print("rule reward: first", first, "last", last, "kl", kls)
  assert last > first + 1.0, (first, last)       # share of the target token up by 10 points or more
  assert max(kls) < 16.0                          # nats per 16-token response: < 1 nat per token


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(models, tmp_path):
  sets = ["--set", f"policy={models / 'policy'}", "--set", f"reward_models.helpful={models / 'rm_helpful'}",
          "--set", f"reward_models.safety={models / 'rm_safety'}", "--set", "model.dtype=float32",
          "--set", "prompts.max_prompt_tokens=64", "--set", "max_new_tokens=16", "--set", "eval_every=0",
          "--set", "iterations=4", "--set", "ckpt.every=1", "--set", "ckpt.async_save=false",
          "--set", "prompts.sources=" + ",".join(PROMPTS)]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

  def launch(run_dir, wait=True):
    cmd = [sys.executable, "-m", "l2jax.launch", "experiments/ppo.py:test", "--run-dir", str(run_dir), *sets]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
      out, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
    return p

  launch(tmp_path / "ref")
  p = launch(tmp_path / "killed", wait=False)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpts / "2").is_dir():
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  launch(tmp_path / "killed")
  for part in ("final", "value"):
    a = ck.restore_params(tmp_path / "ref" / part / "params")
    b = ck.restore_params(tmp_path / "killed" / part / "params")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ref, res = metrics(tmp_path / "ref"), metrics(tmp_path / "killed")
  assert [ref[s]["batch_crc"] for s in (1, 2, 3, 4)] == [res[s]["batch_crc"] for s in (1, 2, 3, 4)]
  assert [ref[s]["rc"] for s in (1, 2, 3, 4)] == [res[s]["rc"] for s in (1, 2, 3, 4)]


def test_memory_plan_for_70b_is_the_arithmetic_of_the_shardings():
  from l2jax.launch import load_experiment
  from l2jax.stages import ppo_plan
  cfg, _ = load_experiment(str(ROOT / "experiments/ppo.py:70b"))
  p = ppo_plan.plan(cfg, 64)
  assert p["mesh"] == {"dcn": 1, "data": 1, "fsdp": 8, "tensor": 8} and p["fits"]
  n = presets.get("llama2-70b").num_params()
  gib = 1024 ** 3
  # fp32 master weights sharded over the 64 devices (but the RMSNorm gains, 161 x 8192, replicated: + 0.12%);
  # AdamW's two moments alike; the frozen copies in bf16
  norms = 161 * 8192 * 4 * (1 - 1 / 64) / gib
  assert p["items_gib"]["policy params"] == pytest.approx(n * 4 / 64 / gib + norms, rel=1e-4)
  assert p["items_gib"]["policy AdamW moments"] == pytest.approx(2 * (n * 4 / 64 / gib + norms), rel=1e-4)
  assert p["items_gib"]["reference (frozen)"] == pytest.approx((n * 4 / 64 / gib + norms) / 2, rel=1e-4)
  # KV cache: 80 layers x (512 prompts / 4 chunks / 8 fsdp) rows x 2048 positions x (8 kv heads / 8) x 128 x k,v x bf16
  assert p["phases_gib"]["generate"]["KV cache"] == pytest.approx(80 * 16 * 2048 * 1 * 128 * 2 * 2 / gib)
  # the sampling copy is replicated over fsdp and split over tensor only: bf16 weights / 8
  assert p["phases_gib"]["generate"]["policy in the sampling layout"] == pytest.approx(n * 2 / 8 / gib, rel=2e-3)
  assert not ppo_plan.plan(cfg, 8)["fits"]          # 70B PPO does not fit one 8-GPU node


def test_check_sharding_prints_the_plan_and_fails_when_it_does_not_fit():
  cmd = [sys.executable, "-m", "l2jax.launch", "experiments/ppo.py:70b", "--check-sharding"]
  ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "PPO memory plan per device: 64 devices" in ok.stdout and "fits" in ok.stdout
  bad = subprocess.run(cmd + ["--set", "device_memory_gib=40"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and "DOES NOT FIT" in bad.stdout


@pytest.mark.slow
def test_tiny_chain_through_the_launcher_from_an_empty_runs_dir(tmp_path):
  """experiments/ppo.py:test names sft:test and both rm:test models; the launcher builds them, then PPO runs;
  a second launch redoes nothing."""
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path / "runs"), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  cmd = [sys.executable, "-m", "l2jax.launch", "experiments/ppo.py:test"]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  runs = tmp_path / "runs"
  for dep in ("sft-test", "rm_helpful-test", "rm_safety-test", "ppo-test"):
    assert (runs / dep / "final" / "config.json").is_file(), dep
  assert "running experiments/sft.py:test first" in p.stderr
  saved = json.loads((runs / "ppo-test" / "config.json").read_text())
  assert saved["policy"] == str(runs / "sft-test" / "final")     # references resolved in the saved config
  m = metrics(runs / "ppo-test")
  assert sorted(m) == [0, 1, 2] and "eval_rc" in m[0] and "eval_rc" in m[2]
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "first" not in again.stderr and sorted(metrics(runs / "ppo-test")) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- early stopping

def test_early_stopping_derives_its_count_from_the_history(tmp_path):
  """A resumed run that repeats an evaluation (killed after early_stop.json recorded it, before the checkpoint)
  reaches the decision of the uninterrupted run: the count comes from the history, not from a saved counter."""
  from l2jax.stages.ppo_outputs import EarlyStopping
  e = EarlyStopping(tmp_path, patience=2)
  assert e.update(0, 1.0) == (True, False) and e.update(2, 0.5) == (False, False)
  e.save()
  assert EarlyStopping(tmp_path, 2).update(2, 0.5) == (False, False)    # the repeat is not a second bad one
  r = EarlyStopping(tmp_path, 2, start=1)
  assert r.update(2, 0.5) == (False, False) and r.bad == 1 and r.update(4, 0.4) == (False, True)
  r.save()
  # a stop recorded at 4 by a run killed before checkpoints/4: the resumed run (from 3) redoes iteration 4
  again = EarlyStopping(tmp_path, 2, start=3)
  assert not again.stopped and [h["step"] for h in again.history] == [0, 2] and again.bad == 1
  assert EarlyStopping(tmp_path, 2, start=4).stopped
  # a better evaluation resets the count; a repeated best stays the best once
  (tmp_path / "b").mkdir()
  b = EarlyStopping(tmp_path / "b", 2)
  for step, rc in ((0, 1.0), (2, 0.9), (4, 1.5), (4, 1.5), (6, 1.0)):
    b.update(step, rc)
  assert (b.best, b.best_step, b.bad, b.stopped) == (1.5, 4, 1, False)


def test_the_plan_module_does_not_import_the_stage():
  """ppo_plan is arithmetic on shapes; the one-iteration check lives with the programs (no import circle)."""
  import ast
  tree = ast.parse((ROOT / "l2jax/stages/ppo_plan.py").read_text())
  names = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "l2jax.stages"
           for a in n.names] + [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  assert "ppo" not in names and "l2jax.stages.ppo" not in names


def _zero_reward(frozen, tokens_bt, seq_mask_bt, mask_bt):
  """Every answer scores 0: no evaluation ever beats the first, so patience decides the stop."""
  z = jnp.zeros(tokens_bt.shape[:1], jnp.float32)
  return z, z


def _stopping_config(models):
  # one mini-batch per iteration: the only step's ratio is exactly 1, at a temperature other than 1 too
  return ppo_config(models, iterations=6, eval_every=2, patience=2, temperature=0.7, minibatch=8,
                    ckpt=c.Checkpointing(every=1, keep=10, async_save=False))


@pytest.mark.slow
def test_early_stop_writes_value_and_a_resumed_run_stops_where_the_uninterrupted_one_does(models, tmp_path,
                                                                                           one_device):
  import shutil
  from l2jax.stages import ppo
  cfg = _stopping_config(models)
  ref = tmp_path / "ref"
  ppo.run(cfg, ref, reward_fn=_zero_reward)
  early = json.loads((ref / "early_stop.json").read_text())
  assert [h["step"] for h in early["history"]] == [0, 2, 4] and early["stopped"] and early["best_step"] == 0
  m = metrics(ref)
  assert sorted(m) == [0, 1, 2, 3, 4]
  for s in (1, 2, 3, 4):   # log-probs of the sampled distribution (T = 0.7) in the rollout and the update
    assert m[s]["ratio"] == pytest.approx(1.0, abs=1e-5) and m[s]["approx_kl"] < 1e-8, m[s]
  assert (ref / "final" / "config.json").is_file() and (ref / "value" / "config.json").is_file()
  ref_value = ck.restore_params(ref / "value" / "params")

  def killed_copy(name, last_ckpt, evals):
    """ref as a SIGKILL would have left it: checkpoints up to `last_ckpt`, evaluations up to `evals` recorded."""
    d = tmp_path / name
    shutil.copytree(ref, d)
    for p in (d / "checkpoints").iterdir():
      if p.name.isdigit() and int(p.name) > last_ckpt:
        shutil.rmtree(p)
    shutil.rmtree(d / "final")
    shutil.rmtree(d / "value")
    hist = [h for h in early["history"] if h["step"] <= evals]
    bad = len(hist) - 1   # every evaluation after the first is no better (the reward is 0)
    (d / "early_stop.json").write_text(json.dumps({**early, "history": hist, "bad_evals": bad,
                                                   "stopped": bad >= 2}))
    return d

  for d in (killed_copy("after_eval_2", 1, 2), killed_copy("after_eval_4", 3, 4)):
    ppo.run(cfg, d, reward_fn=_zero_reward)
    assert json.loads((d / "early_stop.json").read_text())["history"] == early["history"], d.name
    got = ck.restore_params(d / "value" / "params")
    for x, y in zip(jax.tree.leaves(ref_value), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
