"""Causal self-attention through the TPU's Pallas splash attention kernel (training, scoring and prefill).

softmax(q k^T / sqrt(head_dim) + causal [+ same-segment] mask) v, as `l2jax.model.llama.attention`, computed
blockwise in VMEM without the [B, H, T, T] score matrix. Grouped-query attention runs the multi-query kernel once
per KV head over its group of G = n_heads / n_kv_heads query heads, so keys and values are never repeated in
memory. `segment_ids` [B, T] keep packed documents apart (pretraining, SFT).

Pallas kernels cannot be partitioned by XLA's SPMD partitioner, so under active sharding rules the kernel runs
inside `jax.shard_map` over the batch axes and the KV-head axis (where the tensor axis divides the KV heads;
otherwise heads stay whole on every shard, which costs the tensor-parallel split of attention, not memory for
repeated KV). Off TPU the kernel runs in Pallas interpret mode (CPU tests against the XLA path).
The KV-cache decode path always uses XLA (one query per row: nothing for a flash kernel to tile).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from l2jax import sharding as shd

BLOCKS = (512, 256, 128)


def block_size(seq_len: int) -> int | None:
  """The largest supported tile (512, 256 or 128) dividing seq_len, or None (then XLA attention is used)."""
  return next((b for b in BLOCKS if seq_len % b == 0), None)


def supported(seq_len: int) -> bool:
  return block_size(seq_len) is not None


def on_tpu() -> bool:
  """True when the program is being built for TPU: the active mesh's devices (also when compiling ahead of
  time for a TPU topology from a CPU host), else JAX's default backend."""
  active = shd._ACTIVE.get()
  if active is not None:
    return active[0].devices.flat[0].platform == "tpu"
  return jax.default_backend() == "tpu"


def _kernel(seq_len: int, group: int, interpret: bool):
  """The multi-query splash kernel for `group` query heads per KV head. Built inside the trace that uses it
  (its block-mask tables become that program's constants; a kernel kept across traces would leak them)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = block_size(seq_len)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(group)])
  return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q_bthk, k_bshk, v_bshk, seg_bt, interpret: bool):
  """Splash attention on one shard: [B, T, H, Dh] queries, [B, T, K, Dh] keys / values."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H, Dh = q_bthk.shape
  K = k_bshk.shape[2]
  G = H // K
  kernel = _kernel(T, G, interpret)
  q_bkgtd = (q_bthk * jnp.asarray(1.0 / math.sqrt(Dh), q_bthk.dtype)).reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4)
  k_bktd = k_bshk.transpose(0, 2, 1, 3)
  v_bktd = v_bshk.transpose(0, 2, 1, 3)

  def one_head(q_gtd, k_td, v_td, seg_t):
    return kernel(q_gtd, k_td, v_td, segment_ids=None if seg_t is None else sk.SegmentIds(q=seg_t, kv=seg_t))

  per_head = jax.vmap(one_head, in_axes=(0, 0, 0, None))
  out_bkgtd = jax.vmap(per_head, in_axes=(0, 0, 0, None if seg_bt is None else 0))(q_bkgtd, k_bktd, v_bktd, seg_bt)
  return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh).astype(q_bthk.dtype)


def splash_attention(q_bthk, k_bshk, v_bshk, segment_ids_bt=None, *, interpret: bool | None = None):
  """Causal (and same-segment) attention [B, T, H, Dh] through splash attention; T must be `supported`."""
  if interpret is None:
    interpret = not on_tpu()
  seg = None if segment_ids_bt is None else segment_ids_bt.astype(jnp.int32)
  active = shd._ACTIVE.get()
  if active is None:
    return _local(q_bthk, k_bshk, v_bshk, seg, interpret)
  mesh, rules = active
  batch = shd.logical_to_spec(("batch",), rules, mesh)[0]
  heads = shd.logical_to_spec(("kv_heads",), rules, mesh)[0]
  n_heads_shards = 1 if heads is None else math.prod(mesh.shape[a] for a in ((heads,) if isinstance(heads, str)
                                                                             else heads))
  if k_bshk.shape[2] % n_heads_shards:
    heads = None
  n_batch = 1 if batch is None else math.prod(mesh.shape[a] for a in ((batch,) if isinstance(batch, str) else batch))
  if q_bthk.shape[0] % n_batch:
    batch = None
  qkv = P(batch, None, heads, None)
  fn = functools.partial(_local, interpret=interpret)
  if seg is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv,
                         check_vma=False)(q_bthk, k_bshk, v_bshk)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)), out_specs=qkv,
                       check_vma=False)(q_bthk, k_bshk, v_bshk, seg)
