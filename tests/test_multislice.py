"""Multi-slice data parallelism: the "dcn" mesh axis (data parallelism across TPU slices, MaxText's
dcn_data_parallelism) splits the batch outermost, (dcn, fsdp, data), and trains exactly as one device does."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from l2jax import config as c
from l2jax import sharding as shd
from l2jax import train
from l2jax.model import llama, presets
from l2jax.stages.common import lm_loss_fn


def _batch(rng, B=8, T=16, V=128):
  toks = rng.integers(0, V, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  pos = np.arange(T)[None].repeat(B, 0).astype(np.int32)
  return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_mask": np.ones((B, T), np.float32)}


def test_batch_rule_is_dcn_then_fsdp_then_data():
  mesh = shd.make_mesh(2, 2, 1, dcn=2)
  assert dict(mesh.shape) == {"dcn": 2, "data": 2, "fsdp": 2, "tensor": 1}
  assert shd.logical_to_spec(("batch", "seq"), shd.TRAIN_RULES, mesh) == P(("dcn", "fsdp", "data"), None)
  assert shd.logical_to_spec(("batch", "seq"), shd.SAMPLE_RULES, mesh) == P(("dcn", "fsdp", "data"), None)
  # weights are never sharded across slices: only the batch (and so one gradient all-reduce) crosses the DCN
  assert "dcn" not in str(shd.logical_to_spec(("embed", "mlp"), shd.TRAIN_RULES, mesh))


@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (2, 2, 2, 1), (4, 1, 2, 1)])
def test_multislice_mesh_trains_as_one_device(shape):
  dcn, data, fsdp, tensor = shape
  model = llama.init(presets.get("test"), seed=1)
  graphdef, params = llama.split(model)
  rng = np.random.default_rng(2)
  opt = train.make_optimizer(c.AdamW(lr=1e-2, warmup_steps=1), 3)
  err = train.check_sharding(lm_loss_fn(graphdef), params, llama.logical_axes(model), opt,
                             [_batch(rng) for _ in range(3)], shd.make_mesh(data, fsdp, tensor, dcn=dcn),
                             shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  assert err["grad_rel_err"] < 1e-5 and err["param_rel_err"] < 1e-5, err


def test_mesh_config_dcn_and_errors():
  mesh = shd.mesh_from_config(c.Mesh(dcn=2, fsdp=-1))
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="dcn"):
    shd.mesh_shape(1, -1, 1, 8, dcn=0)
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.mesh_shape(2, 2, 2, 8, dcn=2)
  with pytest.raises(c.ConfigError, match="mesh.dcn"):
    c.apply_overrides(c.Pretrain(), ["mesh.dcn=0"])
