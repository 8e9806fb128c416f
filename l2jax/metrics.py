"""Metrics: JSONL and TensorBoard writers, and model-FLOPs utilisation."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

# Dense bf16 peak FLOP/s per chip (datasheets). MFU is reported only for these.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Datasheet bf16 peak of `device` (default: the first), None if unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int | None = None) -> float | None:
  """Model FLOPs utilisation: achieved training FLOP/s over the devices' bf16 peak."""
  peak = peak_flops_per_device()
  if peak is None:
    return None
  return tokens_per_s * flops_per_token / (peak * (n_devices or jax.device_count()))


def _scalar(v: Any) -> Any:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return f if math.isfinite(f) else str(f)


def trim_after(path: str | Path, step: int) -> int:
  """Drop the lines of `path` (a metrics.jsonl) with "step" > `step`, and torn or unreadable lines; returns how
  many went. A run resumed from checkpoint `step` redoes the later steps, whose lines a kill between a step's
  metrics line and its checkpoint left behind; without this they would appear twice."""
  path = Path(path)
  if not path.is_file():
    return 0
  lines = path.read_text(errors="replace").splitlines()
  keep = [l for l in lines if l.strip() and _step_of(l) <= step]
  if len(keep) == len(lines):
    return 0
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text("".join(l + "\n" for l in keep))
  os.replace(tmp, path)
  return len(lines) - len(keep)


def _step_of(line: str) -> float:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return math.inf


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to run_dir/metrics.jsonl and scalars to TensorBoard (process 0 only).

  resume_step: the step the run (re)starts from; lines of later steps are dropped first (`trim_after`)."""

  def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = Path(run_dir) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if resume_step is not None:
        trim_after(self.path, resume_step)
      self.file = open(self.path, "a")
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
          self.tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    self.file.write(json.dumps(row) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, float):
          self.tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      if self.tb is not None:
        self.tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
