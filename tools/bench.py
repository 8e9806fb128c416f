"""Benchmarks (not tests): l2jax against HF transformers (PyTorch) on the same config, in the same run.

  python tools/bench.py train   --preset P --seq S --batch B [--steps N]
  python tools/bench.py forward --preset P --seq S --batch B
  python tools/bench.py decode  --preset P --batch B --prompt-len L --new N
  python tools/bench.py ppo     --preset P --batch B --new N     (vs TRL PPOTrainer; pip install -e ".[bench]")
  python tools/bench.py reward  --preset P --batch B --seq S     (vs TRL RewardTrainer, margin column)
  python tools/bench.py gold    --run RUN_DIR [--proxy N] [--iters K] (vs TRL PPOTrainer: gold reward at
                                matched KL and per minute on experiments/overoptimization.py's run)
  python tools/bench.py grpo    --run RUN_DIR [--trl-python PY] [--repeats R] (vs TRL GRPOTrainer, newest TRL in
                                its own venv: time per iteration and gold at matched KL on the same run)

Each prints a small table with both figures and their ratio (and MFU / the hardware floor on a GPU).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

COMMANDS = {"train": "bench_train", "forward": "bench_forward", "decode": "bench_decode", "ppo": "bench_ppo",
            "reward": "bench_reward", "gold": "bench_gold",
            "grpo": "bench_grpo"}


def main(argv: list[str]) -> int:
  if not argv or argv[0] not in COMMANDS:
    print(__doc__, file=sys.stderr)
    return 2
  return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
