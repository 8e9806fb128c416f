"""The training loop: schedule, accumulation, sharded == unsharded, NaN stop, decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.checkpoint import TrainCheckpointer
from l2jax.model import llama, presets
from l2jax.stages.pretrain import lm_loss_fn


def _batch(rng, B=8, T=16, V=128):
  toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[:, T // 2:] = 2  # two packed documents per row
  pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[:, T // 2 - 1] = 0
  mask[1, 10:] = 0
  return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _setup(cfg=None):
  cfg = cfg or presets.get("test")
  model = llama.init(cfg, seed=1)
  graphdef, params = llama.split(model)
  return cfg, graphdef, params, llama.logical_axes(model)


def test_lr_schedule_matches_paper_formula():
  o = c.AdamW(lr=3e-4, warmup_steps=2000, decay_to=0.1)
  total = 10000
  sched = train.lr_schedule(o, total)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(1000)), 1.5e-4, rtol=1e-6)   # linear warmup
  np.testing.assert_allclose(float(sched(2000)), 3e-4, rtol=1e-6)     # warmup end: peak
  mid = 2000 + (total - 2000) // 2                                     # cos(pi/2) = 0: halfway to 10%
  np.testing.assert_allclose(float(sched(mid)), 0.1 * 3e-4 + 0.9 * 3e-4 * 0.5, rtol=1e-5)
  t = 7000
  want = 0.1 * 3e-4 + 0.9 * 3e-4 * (1 + math.cos(math.pi * (t - 2000) / (total - 2000))) / 2
  np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5)
  np.testing.assert_allclose(float(sched(total)), 3e-5, rtol=1e-5)    # end: 10% of peak


def test_weight_decay_skips_norms():
  _, _, params, _ = _setup()
  m = train.decay_mask(params)
  assert m["layers"]["wq"] and m["embed"] and m["lm_head"]
  assert not m["norm"] and not m["layers"]["attn_norm"] and not m["layers"]["ffn_norm"]


def test_gradient_accumulation_equals_one_big_batch():
  _, graphdef, params, _ = _setup()
  loss_fn = lm_loss_fn(graphdef)
  opt = __import__("optax").sgd(1.0)  # params - grads: compares the accumulated gradients themselves
  batch = _batch(np.random.default_rng(0))
  outs = []
  for k in (1, 4):
    step = jax.jit(train.make_train_step(loss_fn, opt, micro_batches=k))
    state, m = step(train.init_state(params, opt), batch)
    outs.append((state["params"], m))
  (p1, m1), (p4, m4) = outs
  np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1), (2, 1, 4)])
def test_sharded_equals_single_device(mesh_shape):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  _, graphdef, params, axes = _setup()
  rng = np.random.default_rng(1)
  batches = [_batch(rng) for _ in range(3)]
  opt = train.make_optimizer(c.AdamW(lr=1e-2, warmup_steps=1), 3)
  err = train.check_sharding(lm_loss_fn(graphdef), params, axes, opt, batches,
                             shd.make_mesh(*mesh_shape), shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  assert err["grad_rel_err"] < 1e-5, err
  assert err["param_rel_err"] < 1e-5, err


def test_sharding_rules_put_batch_on_fsdp_then_data():
  mesh = shd.make_mesh(2, 2, 2)
  assert shd.logical_to_spec(("batch", "seq"), shd.TRAIN_RULES, mesh) == jax.sharding.PartitionSpec(("fsdp", "data"), None)


class _ListIter:
  def __init__(self, items):
    self.items, self.i = items, 0

  def __next__(self):
    self.i += 1
    return self.items[self.i - 1]

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _, graphdef, params, axes = _setup()
  base = lm_loss_fn(graphdef)

  def loss_fn(p, b):  # NaN when the batch says so: injected at step 4
    s, w = base(p, b)
    return jnp.where(b["poison"][0, 0] > 0, jnp.nan, s), w

  rng = np.random.default_rng(2)
  batches = []
  for i in range(6):
    b = _batch(rng)
    b["poison"] = np.full((8, 1), 1 if i == 3 else 0, np.int32)
    batches.append(b)
  opt = train.make_optimizer(c.AdamW(lr=1e-3, warmup_steps=0), 6)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state = train.init_state(params, opt)
  step = train.compile_step(train.make_train_step(loss_fn, opt), jax.eval_shape(lambda s: s, state), axes, mesh,
                            batches[0])
  ck = TrainCheckpointer(tmp_path, keep=10, async_save=True, identity={"name": "nan"})
  with pytest.raises(train.NonFiniteLoss, match=r"at step 4; .*last good checkpoint: step 3"):
    train.run(step, state, _ListIter(batches), total_steps=6, run_dir=tmp_path, ckpt=ck, ckpt_every=1,
              mesh=mesh, progress=False)
  assert ck.latest_step() == 3


def _poisoned_run(tmp_path, loss_fn_of, poison_at, steps=5, outputs_fn=None, step_fn=None):
  """train.run over `steps` batches whose "poison" flag is set at step `poison_at` (1-based)."""
  _, graphdef, params, axes = _setup()
  rng = np.random.default_rng(2)
  batches = []
  for i in range(steps):
    b = _batch(rng)
    b["poison"] = np.full((8, 1), 1 if i + 1 == poison_at else 0, np.int32)
    batches.append(b)
  opt = train.make_optimizer(c.AdamW(lr=1e-3, warmup_steps=0), steps)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  state = train.init_state(params, opt)
  fn = step_fn or train.make_train_step(loss_fn_of(lm_loss_fn(graphdef)), opt)
  step = train.compile_step(fn, jax.eval_shape(lambda s: s, state), axes, mesh, batches[0])
  ck = TrainCheckpointer(tmp_path, keep=10, async_save=False, identity={"name": "nan"})
  return ck, lambda: train.run(step, state, _ListIter(batches), total_steps=steps, run_dir=tmp_path, ckpt=ck,
                               ckpt_every=1, mesh=mesh, progress=False, outputs_fn=outputs_fn)


def test_nonfinite_update_with_finite_loss_is_never_saved(tmp_path):
  """The loss is finite but the gradient (and so the updated parameters) is not: the state after that
  update must not be saved; the last checkpoint holds finite parameters."""
  def loss_fn_of(base):
    def loss_fn(p, b):
      s, w = base(p, b)
      leaf = jax.tree.leaves(p)[0]
      # value 0, gradient inf (d sqrt(u)/du at u = 0) on the poisoned step only
      poison = b["poison"][0, 0] > 0
      u = jnp.where(poison, jnp.sum(leaf - jax.lax.stop_gradient(leaf)).astype(jnp.float32), 1.0)
      return s + jnp.where(poison, jnp.sqrt(u), 0.0), w
    return loss_fn

  ck, go = _poisoned_run(tmp_path, loss_fn_of, poison_at=2)
  with pytest.raises(train.NonFiniteLoss, match=r"non-finite values in the update .* at step 2; .*step 1"):
    go()
  assert ck.latest_step() == 1
  _, graphdef, params, _ = _setup()
  opt = train.make_optimizer(c.AdamW(lr=1e-3, warmup_steps=0), 5)
  target = jax.eval_shape(lambda: train.init_state(params, opt))
  restored, _ = ck.restore(1, target)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_all_finite_metric():
  assert float(train.all_finite(jnp.ones(3), {"a": jnp.zeros((2, 2))})) == 1.0
  assert float(train.all_finite(jnp.float32(1), {"a": jnp.array([1.0, jnp.inf])})) == 0.0
  assert float(train.all_finite(jnp.float32(jnp.nan))) == 0.0
  assert float(train.all_finite({"i": jnp.arange(3)})) == 1.0   # integers are always finite


def test_array_metrics_go_to_outputs_fn_not_the_log(tmp_path):
  """Step metrics with ndim > 0 are handed to outputs_fn(step, arrays) as numpy, never logged as floats."""
  _, graphdef, params, _ = _setup()
  opt = train.make_optimizer(c.AdamW(lr=1e-3, warmup_steps=0), 3)
  base = train.make_train_step(lm_loss_fn(graphdef), opt)

  def step_fn(state, batch):
    new, m = base(state, batch)
    return new, {**m, "per_row_bt": batch["tokens"][:, :3] + state["step"]}

  got = {}
  ck, go = _poisoned_run(tmp_path, None, poison_at=0, steps=3, step_fn=step_fn,
                         outputs_fn=lambda s, arrays: got.__setitem__(s, arrays))
  result = go()
  assert sorted(got) == [1, 2, 3]
  assert isinstance(got[2]["per_row_bt"], np.ndarray) and got[2]["per_row_bt"].shape == (8, 3)
  rows = [__import__("json").loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows and all("per_row_bt" not in r for r in rows) and "per_row_bt" not in result.last_metrics
  assert result.last_metrics["finite"] == 1.0


def test_throughput_leaves_out_hook_time():
  """A PPO-like timeline: steps of 1 s and 100 tokens, a 10 s evaluation after step 2, steps settled two at a
  time around it: every window's rate is 100 tokens/s."""
  tp = train.Throughput(0.0)
  tp.step_done(1.0, 100)
  assert tp.rate() == pytest.approx(100)
  tp.step_done(2.0, 100)
  tp.exclude(10.0)            # the evaluation hook after step 2
  tp.step_done(13.0, 100)
  assert tp.rate() == pytest.approx(100)
  tp.step_done(14.0, 100)     # seen ready before step 5 was dispatched...
  assert tp.rate() == pytest.approx(100)
  tp.step_done(15.0, 100)     # ...and step 5 read right after it: no zero-length window
  assert tp.rate() == pytest.approx(100)
  tp.step_done(16.0, 100)
  tp.step_done(17.0, 100)
  assert tp.rate() == pytest.approx(100)   # a window of two steps


class _BlockingStep:
  """A step that holds the host for `seconds` (as a PPO iteration does) and reports a loss."""
  rules = shd.TRAIN_RULES

  def __init__(self, seconds):
    self.seconds = seconds

  def __call__(self, state, batch):
    import time
    time.sleep(self.seconds)
    return {"step": state["step"] + 1}, {"loss": jnp.float32(1.0)}


def test_tokens_per_s_ignores_evaluations(tmp_path):
  """Steps of 0.2 s and 1000 tokens (5000 tokens/s) with a 1 s evaluation hook every 2 steps: every logged
  tokens_per_s stays near 5000 (the old rate jumped about 100-fold on the step settled right before a hook)."""
  import json
  import time
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  batches = _ListIter([{"tokens": np.zeros((8, 4), np.int32)} for _ in range(6)])
  hook = train.Hook(2, lambda s, state: time.sleep(1.0) or {"eval_rc": 0.0})
  train.run(_BlockingStep(0.2), {"step": jnp.int32(0)}, batches, total_steps=6, run_dir=tmp_path, ckpt=None,
            ckpt_every=1, mesh=mesh, log_every=1, hooks=(hook,), tokens_per_step=1000, tensorboard=False,
            progress=False)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
  assert len(rates) == 6 and all(5000 / 3 < r < 5000 * 2 for r in rates), rates


def test_micro_batched_evaluation_equals_one_piece():
  _, graphdef, params, _ = _setup()
  loss_fn = lm_loss_fn(graphdef)
  batch = _batch(np.random.default_rng(3))
  whole = jax.jit(loss_fn)(params, batch)
  for k in (2, 4):
    acc = jax.jit(train.make_eval_step(loss_fn, k))(params, batch)
    np.testing.assert_allclose(float(acc[0]), float(whole[0]), rtol=1e-6)
    assert float(acc[1]) == float(whole[1])
  short = {key: v[:6] for key, v in batch.items()}   # 6 rows, 4 micro-batches: evaluated in one piece
  np.testing.assert_allclose(float(jax.jit(train.make_eval_step(loss_fn, 4))(params, short)[0]),
                             float(jax.jit(loss_fn)(params, short)[0]), rtol=1e-6)
  # the scan really splits: its jaxpr holds a scan of k steps over [m, T] rows
  jaxpr = str(jax.make_jaxpr(train.make_eval_step(loss_fn, 4))(params, batch))
  assert "scan" in jaxpr and "length=4" in jaxpr
