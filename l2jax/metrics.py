"""Metrics: JSONL and TensorBoard writers, and model-FLOPs utilisation."""
from __future__ import annotations

import json
import math
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


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to run_dir/metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, run_dir: str | Path, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = Path(run_dir) / "metrics.jsonl"
    self.tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
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
