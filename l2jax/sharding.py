"""Mesh, logical-axis rules and placement: the one place where logical names meet mesh axes (DESIGN.md section 4).

Model code names what each dimension *is* ("batch", "embed", "q_heads", ...). The rules here map those
names onto the mesh axes ("data", "fsdp", "tensor"). `constrain` is a no-op unless a rule set is active
(`with use_rules(mesh, TRAIN_RULES): ...`), so the model runs unchanged on one device.

Warning (DESIGN.md section 4): with jax 0.10-0.12 the SPMD partitioner returns wrong gradients for a batch
sharded P(("data", "fsdp")) against weights P("fsdp", "tensor"); the batch must be P(("fsdp", "data")).
Use `python -m l2jax.launch EXP --check-sharding` to compare a mesh against one device.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Training: batch over (fsdp, data) -- this order, see the warning above; weights fully sharded over fsdp,
# heads / mlp / vocab over tensor.
TRAIN_RULES: Rules = (
    ("batch", ("fsdp", "data")),
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
    ("batch", ("fsdp", "data")),
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
