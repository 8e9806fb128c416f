"""THE launcher: `python -m l2jax.launch experiments/<file>.py[:ARG] [--set a.b=VALUE ...] [--run-dir DIR]`.

Imports the experiment file, calls its `get_config(ARG)`, applies `--set` overrides (typed from the config's
dataclass fields), writes the resolved config to the run directory and runs the config's stage.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from l2jax import config as c


def load_experiment(spec: str):
  """(config, experiment name) from 'path/to/exp.py[:ARG]'."""
  path, _, arg = spec.partition(":")
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p}: experiment file not found")
  mod_spec = importlib.util.spec_from_file_location(f"l2jax_experiment_{p.stem}", p)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{p}: defines no get_config(arg)")
  return module.get_config(arg or None), p.stem + (f"-{arg}" if arg else "")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.launch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("experiment", help="experiments/<file>.py[:ARG]")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  ap.add_argument("--run-dir", default=None, help="run directory (default runs/<experiment>-<arg>)")
  ap.add_argument("--check-sharding", action="store_true",
                  help="run a few steps on the configured mesh and on one device and compare gradients")
  ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = ap.parse_args(argv)
  try:
    cfg, name = load_experiment(args.experiment)
    cfg = c.apply_overrides(cfg, args.set)
  except (c.ConfigError, FileNotFoundError, AttributeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(c.to_json(cfg))
    return 0
  run_dir = Path(args.run_dir or f"runs/{name}")
  created = not run_dir.exists()
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / "config.json").write_text(c.to_json(cfg) + "\n")
  stage = importlib.import_module(f"l2jax.stages.{type(cfg).stage}")
  try:
    if args.check_sharding:
      stage.run(cfg, run_dir, check_sharding=True)
    else:
      result = stage.run(cfg, run_dir)
      if getattr(result, "status", "") == "preempted":
        return 0
  except KeyboardInterrupt:
    return 130
  except Exception as e:  # clear one-line error, non-zero exit; tracebacks with L2JAX_TRACEBACK=1
    if created:
      _remove_if_nothing_saved(run_dir)
    import os
    if os.environ.get("L2JAX_TRACEBACK"):
      raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  return 0


def _remove_if_nothing_saved(run_dir: Path) -> None:
  """A run that failed before its first checkpoint leaves no run directory behind (it made it)."""
  import shutil
  ckpts = run_dir / "checkpoints"
  if not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())) and not (run_dir / "final").exists():
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
