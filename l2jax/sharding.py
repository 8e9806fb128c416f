"""Mesh, logical-axis rules and placement: the one place where logical names meet mesh axes (DESIGN.md section 4).

Model code names what each dimension *is* ("batch", "embed", "q_heads", ...). The rules here map those
names onto the mesh axes ("dcn", "data", "fsdp", "tensor"): "dcn" is data parallelism across TPU slices
(multi-slice, over the data-center network; MaxText's dcn_data_parallelism), size 1 on one slice or one host. `constrain` is a no-op unless a rule set is active
(`with use_rules(mesh, TRAIN_RULES): ...`), so the model runs unchanged on one device.

Warning (DESIGN.md section 4): with jax 0.10-0.12 the SPMD partitioner returns wrong gradients for a batch
sharded P(("data", "fsdp")) against weights P("fsdp", "tensor"); the batch must be P(("fsdp", "data")).
Use `python -m l2jax.launch EXP --check-sharding` to compare a mesh against one device.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Training: batch over (dcn, fsdp, data) -- fsdp before data, see the warning above (dcn, outermost, only
# splits the batch across slices; tested against one device); weights fully sharded over fsdp within a slice,
# heads / mlp / vocab over tensor. Gradients are all-reduced over dcn once per step.
TRAIN_RULES: Rules = (
    ("batch", ("dcn", "fsdp", "data")),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("seq", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("cache_seq", None),
)
# Sampling: weights replicated over data/fsdp (no all-gather per decoded token), tensor-parallel heads.
SAMPLE_RULES: Rules = (
    ("batch", ("dcn", "fsdp", "data")),
    ("embed", None),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("seq", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("cache_seq", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("l2jax_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Activate `rules` on `mesh` for `constrain` calls traced inside this block."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axis `names` under `rules`; a mesh axis of size 1, or used twice, is dropped."""
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op with no active rules."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int, dcn: int = 1) -> tuple[int, int, int, int]:
  """(dcn, data, fsdp, tensor) with -1 (at most one of data / fsdp / tensor) resolved so that the product is
  n_devices; a clear error otherwise."""
  names = MESH_AXES
  sizes = [dcn, data, fsdp, tensor]
  shown = dict(zip(names, sizes))
  if dcn < 1:
    raise ValueError(f"mesh {shown}: dcn (slices) must be >= 1")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shown}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {shown}: sizes must be positive or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh {shown}: {n_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh {shown} needs {int(np.prod(sizes))} devices; {n_devices} are available")
  return tuple(sizes)  # type: ignore[return-value]


def _device_grid(devices: Sequence[jax.Device], shape: tuple[int, ...]) -> np.ndarray:
  """Devices arranged as `shape` (dcn, data, fsdp, tensor): across slices (devices with a `slice_index`,
  multi-slice TPU) the dcn axis runs over slices and the rest stays inside one slice's interconnect
  (mesh_utils.create_hybrid_device_mesh); otherwise the devices in order."""
  n_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if shape[0] > 1 and n_slices == shape[0]:
    from jax.experimental import mesh_utils
    return mesh_utils.create_hybrid_device_mesh((1,) + tuple(shape[1:]), (shape[0], 1, 1, 1), devices)
  if n_slices > 1 and shape[0] != n_slices:
    raise ValueError(f"mesh dcn={shape[0]} but the devices span {n_slices} slices: set mesh.dcn={n_slices}")
  if getattr(devices[0], "platform", "cpu") == "cpu":
    return np.asarray(devices).reshape(shape)
  from jax.experimental import mesh_utils  # physical-topology-aware order on TPU / GPU (as jax.make_mesh)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              dcn: int = 1) -> Mesh:
  """A mesh ("dcn", "data", "fsdp", "tensor") with Auto axes (sharding propagated by XLA from our constraints)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(data, fsdp, tensor, len(devices), dcn)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(_device_grid(devices, shape), MESH_AXES, axis_types=auto)


def mesh_from_config(m, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of a config's `Mesh` group (dcn, data, fsdp, tensor)."""
  return make_mesh(m.data, m.fsdp, m.tensor, devices=devices, dcn=getattr(m, "dcn", 1))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from `spec` where they do not divide that dimension (e.g. 2 KV heads on tensor=4)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    keep, size = [], 1
    for a in axes_t:
      if dim % (size * mesh.shape[a]) == 0:
        keep.append(a)
        size *= mesh.shape[a]
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def _is_axes(x) -> bool:
  return x is None or (isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x))


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules, shapes: Any | None = None) -> Any:
  """NamedShardings for a tree of logical-axis tuples (leaves: tuples of names, or None = replicated).

  shapes: a matching tree of arrays / ShapeDtypeStructs; axes that do not divide a dimension are dropped.
  """
  if shapes is None:
    return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules, mesh)), axes_tree,
                        is_leaf=_is_axes)
  return jax.tree.map(lambda names, s: NamedSharding(mesh, fit_spec(logical_to_spec(names, rules, mesh), s.shape, mesh)),
                      axes_tree, shapes, is_leaf=_is_axes)


def like_params(tree: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that embeds parameter-shaped subtrees (e.g. optimizer state): a leaf whose dict-key
  path ends with a parameter's path and has its shape gets that parameter's sharding; others are replicated."""
  by_path = {}
  for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))] = sh
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for i in range(len(keys)):
      sh = by_path.get(keys[i:])
      if sh is not None and len(sh.spec) <= len(getattr(leaf, "shape", ())):
        return sh
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, rules: Rules = TRAIN_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, T, ...] batch: batch over the batch rule's axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Rules = TRAIN_RULES) -> dict[str, jax.Array]:
  """Assemble each process's local rows into global arrays sharded over the batch axes (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v) for k, v in local.items()}


def initialize_distributed() -> None:
  """Start multi-host JAX when launched on several processes (TPU pod slice, Slurm / multi-node GPU).

  On TPU pods and Slurm, `jax.distributed.initialize()` discovers the coordinator by itself. Elsewhere set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
  Single-process runs (no such environment) do nothing.
  """
  env = os.environ
  multi = ("JAX_COORDINATOR_ADDRESS" in env or "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
           or "TPU_WORKER_HOSTNAMES" in env and "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if not multi:
    return
  kw = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
              num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  try:  # cross-process collectives on the CPU backend (tests, CPU clusters); no effect on GPU / TPU
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass
  jax.distributed.initialize(**kw)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def put(tree: Any, shardings: Any) -> Any:
  """Place host values (the same full value on every process) onto shardings; multi-host safe.

  `jax.device_put` only reaches this process's devices; for a sharding that spans other processes each
  process contributes its own shards of the value (`jax.make_array_from_callback`).
  """
  def one(x, sh):
    if sh.is_fully_addressable:
      return jax.device_put(x, sh)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = one(jax.random.key_data(x), NamedSharding(sh.mesh, P(*sh.spec, None)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)
