"""Ahead-of-time compilation for TPU slices, with no TPU: does each program of a stage fit, before renting a pod?

  python -m l2jax.launch experiments/pretrain.py:7b --aot v5p-128 [--slices 2] [--run-dir DIR]
  python -m l2jax.aot experiments/pretrain.py:7b v5p-128 [--slices 2] [--set k=v ...]

The real TPU compiler (libtpu, from the `tpu` extra) compiles every jitted program of the stage for the named
Cloud TPU accelerator type, from abstract parameters (`jax.ShapeDtypeStruct`s that carry the stage's shardings):
no checkpoint is loaded, no data is read, nothing is allocated on a device. `compiled.memory_analysis()` gives the
per-chip arguments, outputs, aliased (donated) bytes and temporaries; the optimized HLO gives the collectives.
MaxText's train_compile.py does the same for its trainer; this covers every l2jax stage (`l2jax.aot_programs`).

Accelerator names are Cloud TPU accelerator types: `v4-N` and `v5p-N` count TensorCores (N / 2 chips, one
megacore device per chip), `v5e-N` / `v5litepod-N` and `v6e-N` count chips. Per-chip HBM: v4 32 GiB, v5e 16 GiB,
v5p 95 GiB, v6e 32 GiB. `--slices N` compiles for N such slices joined by the data-center network; the mesh's
`dcn` axis is then N (data parallelism across slices).

Peak per chip = arguments + outputs - aliased + temporaries (what the program itself needs at once); live =
peak + resident, where resident is what other programs of the stage keep in HBM meanwhile (the optimizer state
during the evaluation pass; PPO's frozen models and training state during generation). A program whose live
bytes exceed the chip's HBM is a failure: exit 1, naming the program, its bytes, the HBM and the knobs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from l2jax.config import ConfigError

GiB = 1024 ** 3
# generation -> (cores counted per chip in the accelerator name, topology dimensions, HBM GiB per chip,
#                libtpu chip config)
GENERATIONS = {"v4": (2, 3, 32, "megacore"), "v5p": (2, 3, 95, "default"), "v5e": (1, 2, 16, "default"),
               "v6e": (1, 2, 32, "default")}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
TOPOLOGIES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class AotError(ConfigError):
  """A bad accelerator name or an experiment that cannot be compiled; one line (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A Cloud TPU slice type: `name` (as given), generation, chips, topology ("v5p:4x4x4"), HBM per chip."""
  name: str
  generation: str
  chips: int
  topology: str
  hbm_bytes: int
  chip_config: str

  @property
  def hbm_gib(self) -> float:
    return self.hbm_bytes / GiB


def known_names() -> str:
  return ("v4-N, v5p-N (N TensorCores: 8, 16, 32, ..., 2 per chip), v5e-N / v5litepod-N, v6e-N (N chips: "
          f"{', '.join(map(str, TOPOLOGIES_2D))}); e.g. v4-32, v5e-256, v5litepod-256, v5p-128, v6e-64")


def _topology_3d(chips: int) -> tuple[int, int, int] | None:
  """The slice shape of a 3-D torus generation (v4, v5p): from 2x2x1, double the smallest dimension."""
  dims = [2, 2, 1]
  while dims[0] * dims[1] * dims[2] < chips:
    i = min(range(3), key=lambda k: (dims[k], -k))
    dims[i] *= 2
  return tuple(dims) if dims[0] * dims[1] * dims[2] == chips else None


def parse_accelerator(name: str) -> Accelerator:
  """Accelerator of a Cloud TPU accelerator type name; AotError listing the known names otherwise."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v5lite|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise AotError(f"unknown TPU accelerator {name!r}; known: {known_names()}")
  gen = ALIASES.get(m.group(1), m.group(1))
  per_chip, ndim, hbm, chip_config = GENERATIONS[gen]
  n = int(m.group(2))
  chips = n // per_chip
  shape = TOPOLOGIES_2D.get(chips) if ndim == 2 else (_topology_3d(chips) if chips >= 4 else None)
  if n % per_chip or shape is None:
    raise AotError(f"unknown TPU accelerator {name!r} (no {gen} slice of {n} "
                   f"{'TensorCores' if per_chip == 2 else 'chips'}); known: {known_names()}")
  return Accelerator(name, gen, chips, f"{gen}:{'x'.join(map(str, shape))}", hbm * GiB, chip_config)


def quiet_libtpu(acc: Accelerator | None = None) -> None:
  """Keep libtpu from probing for a TPU host at start-up (its environment, set before a backend starts), and
  trace on the CPU backend: the programs are compiled for the topology's devices, not run."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", acc.name if acc else "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # compiling only: several compiles may run at once
  import jax
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_enable_compilation_cache", False)   # no client here to load cached TPU executables


def topology_devices(acc: Accelerator, slices: int = 1) -> list:
  """The devices of `slices` slices of `acc`, from the TPU compiler's topology description (no TPU needed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise AotError("--aot needs the TPU compiler: pip install -e '.[tpu]' (jax[tpu] brings libtpu)") from None
  from jax.experimental import topologies
  bounds = (1, 1, 1) if acc.chips == 1 else (2, 2, 1)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=acc.topology, chip_config_name=acc.chip_config,
                                      chips_per_host_bounds=bounds, num_slices=slices)
  return list(desc.devices)


# ----------------------------------------------------------------------------------------------- compile

@dataclasses.dataclass
class Program:
  """One jitted program of a stage: `fn` (jax.jit with the stage's shardings) and abstract `args`
  (ShapeDtypeStructs with shardings); traced under `rules` on `mesh`."""
  name: str
  fn: Callable
  args: tuple
  mesh: Any
  rules: Any
  note: str = ""
  resident: int = 0   # per-chip bytes that stay live in HBM while this program runs but are not its arguments


def chip_bytes(tree: Any) -> int:
  """Per-chip bytes of a tree of ShapeDtypeStructs carrying shardings (the largest shard of each leaf)."""
  import numpy as np
  total = 0
  for x in __import__("jax").tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|c64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8}


def _shape_bytes(text: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dt]
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in optimized HLO text. An async pair (op-start / op-done)
  counts once, with the bytes of its result; an op inside a while body (the scan over layers) counts once,
  though it runs once per iteration."""
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(",
                  line)
    if not m:
      continue
    result = m.group(1)
    if m.group(3) and result.startswith("("):   # async start: (operands..., result) -- keep the result
      parts = re.findall(r"[a-z0-9]+\[[0-9,]*\]", result)
      result = parts[-1] if parts else result
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += _shape_bytes(result)
  return out


def compile_program(p: Program) -> dict[str, Any]:
  """Lower and compile `p`; its per-chip memory (bytes), compile seconds and collectives."""
  from l2jax import sharding as shd
  t0 = time.perf_counter()
  with shd.use_rules(p.mesh, p.rules):
    lowered = p.fn.lower(*p.args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 -- the TPU compiler refuses a program that cannot fit in HBM
    return _refused(p, e, time.perf_counter() - t0)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  peak = args + outs - alias + temp
  return {"program": p.name, "arguments": args, "outputs": outs, "aliased": alias, "temporaries": temp,
          "peak": peak, "resident": p.resident, "live": peak + p.resident, "compile_s": round(seconds, 2),
          "collectives": collectives(hlo := compiled.as_text()), "note": p.note,
          "tpu_kernels": hlo.count('custom_call_target="tpu_custom_call"')}


_UNIT = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _refused(p: Program, e: Exception, seconds: float) -> dict[str, Any]:
  """The row of a program the TPU compiler refused as too big (RESOURCE_EXHAUSTED: "the total memory required for
  HLO temporaries (31.71G) exceeds available HBM (15.75G)"); any other compile error propagates."""
  msg = str(e)
  m = re.search(r"required for (.+?) \(([0-9.]+)([KMGT])\) exceeds available \w+ \(([0-9.]+)([KMGT])\)", msg)
  if "RESOURCE_EXHAUSTED" not in msg or not m:
    raise e
  need = int(float(m.group(2)) * _UNIT[m.group(3)])
  return {"program": p.name, "arguments": 0, "outputs": 0, "aliased": 0, "temporaries": need, "peak": need,
          "resident": p.resident, "live": need + p.resident,
          "compile_s": round(seconds, 2), "collectives": {op: {"count": 0, "bytes": 0} for op in COLLECTIVES},
          "note": f"refused by the compiler: {m.group(1)} need {m.group(2)}{m.group(3)}iB "
                  f"> {m.group(4)}{m.group(5)}iB available", "refused": True}


def format_table(rows: list[dict], acc: Accelerator) -> str:
  gib = lambda b: f"{b / GiB:.2f}"
  head = (f"{'program':<14} {'args':>7} {'outputs':>7} {'temps':>7} {'peak':>7} {'+resident':>9} {'live GiB':>8} "
          f"{'HBM':>4} {'fits':>4} {'compile s':>9}  collectives (count / MiB; a scan body counted once)")
  lines = [head, "-" * len(head)]
  for r in rows:
    coll = ", ".join(f"{op} {v['count']}/{v['bytes'] / 2 ** 20:.1f}" for op, v in r["collectives"].items()
                     if v["count"])
    fits = r["live"] <= acc.hbm_bytes and not r.get("refused")
    lines.append(f"{r['program']:<14} {gib(r['arguments']):>7} {gib(r['outputs']):>7} {gib(r['temporaries']):>7} "
                 f"{gib(r['peak']):>7} {gib(r['resident']):>9} {gib(r['live']):>8} {acc.hbm_gib:>4.0f} "
                 f"{'yes' if fits else 'NO':>4} {r['compile_s']:>9.1f}  "
                 f"{r['note'] if r.get('refused') else coll or '-'}")
  return "\n".join(lines)


KNOBS = ("a smaller micro_batch (gradient accumulation), model.remat=full, a larger mesh.tensor, or a bigger "
         "slice")


def run(cfg: Any, spec: str, accelerator: str, slices: int = 1, run_dir: str | Path | None = None,
        out=sys.stdout) -> int:
  """Compile every program of the stage config `cfg` for `slices` x `accelerator`; print the table, write
  RUN_DIR/aot.json when run_dir is given; 0 when every program fits, 1 otherwise (one line per misfit)."""
  acc = parse_accelerator(accelerator)
  if slices < 1:
    raise AotError(f"--slices {slices}: expected >= 1")
  quiet_libtpu(acc)
  from l2jax import aot_programs
  devices = topology_devices(acc, slices)
  cfg = aot_programs.for_slices(cfg, slices)
  programs = aot_programs.programs(cfg, devices)
  mesh = programs[0].mesh
  print(f"{spec}: {slices} x {acc.name} ({acc.topology}, {acc.chips * slices} chips, {acc.hbm_gib:.0f} GiB HBM "
        f"each), mesh {dict(mesh.shape)}", file=out)
  rows = []
  for p in programs:
    rows.append(compile_program(p))
    print(f"  compiled {p.name} in {rows[-1]['compile_s']:.1f} s", file=sys.stderr)
  print(format_table(rows, acc), file=out)
  report = {"experiment": spec, "accelerator": acc.name, "topology": acc.topology, "slices": slices,
            "chips": acc.chips * slices, "hbm_bytes": acc.hbm_bytes, "mesh": dict(mesh.shape), "programs": rows}
  if run_dir is not None:
    path = Path(run_dir) / "aot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".aot.json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}", file=out)
  bad = [r for r in rows if r.get("refused") or r["live"] > acc.hbm_bytes]
  for r in bad:
    at_least = "at least " if r.get("refused") else ""
    print(f"error: {r['program']} does not fit on {acc.name}: peak {at_least}{r['live'] / GiB:.2f} GiB per chip > "
          f"{acc.hbm_gib:.0f} GiB HBM; try {KNOBS}", file=sys.stderr)
  return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m l2jax.aot", description=__doc__.split("\n")[0])
  ap.add_argument("experiment", help="experiments/<file>.py[:ARG]")
  ap.add_argument("accelerator", help="Cloud TPU accelerator type, e.g. v5p-128, v5e-256, v4-32, v6e-64")
  ap.add_argument("--slices", type=int, default=1)
  ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--run-dir", default=None, help="write RUN_DIR/aot.json")
  a = ap.parse_args(argv)
  from l2jax import config as c
  from l2jax.launch import load_experiment
  try:
    cfg = c.apply_overrides(load_experiment(a.experiment)[0], a.sets)
    return run(cfg, a.experiment, a.accelerator, a.slices, a.run_dir)
  except (AotError, c.ConfigError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
