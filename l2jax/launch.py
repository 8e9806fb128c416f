"""THE launcher: `python -m l2jax.launch experiments/<file>.py[:ARG] [--set a.b=VALUE ...] [--run-dir DIR]`.

Loads the experiment's `get_config(ARG)` and applies `--set` overrides (typed from the config's dataclass fields,
every number range-checked); checks every experiment reference and path, also those of the dependencies that
would run, before anything runs (l2jax/experiment_refs.py); takes the run directory (default
`$L2JAX_RUNS/<file stem>-<ARG>`, L2JAX_RUNS defaulting to "runs") with the guarantees of l2jax/run_dir.py (refuses
non-run directories, one launch at a time, litter removed, config.json from the moment the stage accepts the
directory, never removes anything a stage wrote); replaces each reference by its run's final/ (running missing
dependencies first, in this process; `--no-deps` makes that an error); runs the config's stage.
`--print-config` prints the config as written, references unresolved; config.json holds the resolved paths.
`--aot ACCELERATOR [--slices N]` compiles the stage's programs for a TPU slice instead of running (l2jax/aot.py).
Errors are one line (exit 2 for a bad config or reference, 1 otherwise; L2JAX_TRACEBACK=1 shows tracebacks). The
first Ctrl-C stops the run (exit 130) with one line; another one exits at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from l2jax import config as c
from l2jax.experiment_refs import (RUNS_ENV, check_references, default_run_dir, experiment_name,  # noqa: F401
                                   is_reference, load_config, load_experiment, one_line, runs_root, split_spec)
from l2jax.experiment_refs import _key
from l2jax.experiment_refs import resolve_references as _resolve
from l2jax.interrupt import exit_with as _exit  # noqa: F401
from l2jax.interrupt import stop_on_ctrl_c
from l2jax.run_dir import LOCK, LaunchError, RunDir, RunDirLocked, RunLock, check_run_dir, remove_litter  # noqa: F401


def launch(spec: str, sets: list[str] | tuple = (), run_dir: str | Path | None = None, *, no_deps: bool = False,
           check_sharding: bool = False, _stack: tuple = ()):
  """Run experiment `spec` ('path/to/exp.py[:ARG]') into `run_dir` (default $L2JAX_RUNS/<stem>-<ARG>).

  Returns the stage's result. Raises c.ConfigError (bad config / overrides / reference or path, reference
  cycle), LaunchError (refused run directory, held lock, failed dependency) or the stage's own error.
  """
  cfg = load_config(spec, sets)
  check_references(cfg, spec, _stack, paths=not check_sharding)
  stack = _stack + ((_key(spec), spec),)
  run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec)
  with RunDir(run_dir, cfg) as rd:
    cfg = _resolve(cfg, launch, no_deps=no_deps, stack=stack)
    rd.write_config_on_accept(lambda: c.to_json(cfg))
    stage = importlib.import_module(f"l2jax.stages.{type(cfg).stage}")
    result = stage.run(cfg, run_dir, **({"check_sharding": True} if check_sharding else {}))
    rd.accepted()
    return result


def resolve_references(cfg, *, no_deps: bool = False, _stack: tuple = ()):
  """A copy of `cfg` with every experiment reference replaced by its run's final/ (running it first if missing)."""
  return _resolve(cfg, launch, no_deps=no_deps, stack=_stack)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.launch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("experiment", help="experiments/<file>.py[:ARG]")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  ap.add_argument("--run-dir", default=None, help=f"run directory (default ${RUNS_ENV}/<experiment>-<arg>, "
                                                  f"{RUNS_ENV} defaulting to runs)")
  ap.add_argument("--no-deps", action="store_true",
                  help="a referenced experiment whose final/ is missing is an error instead of being run first")
  ap.add_argument("--check-sharding", action="store_true",
                  help="run a few steps on the configured mesh and on one device and compare gradients")
  ap.add_argument("--aot", metavar="ACCELERATOR", default=None,
                  help="compile every program of the stage for a Cloud TPU slice (e.g. v5p-128) with the TPU compiler "
                       "and print its per-chip memory; loads and writes nothing (aot.json with --run-dir); l2jax/aot.py")
  ap.add_argument("--slices", type=int, default=1, help="with --aot: compile for this many slices (multi-slice)")
  ap.add_argument("--print-config", action="store_true",
                  help="print the config (experiment references as written) and exit")
  args = ap.parse_args(argv)
  traceback = bool(os.environ.get("L2JAX_TRACEBACK"))
  try:
    if args.print_config:
      print(c.to_json(load_config(args.experiment, args.set)))
      return 0
    if args.aot:
      from l2jax import aot
      cfg = load_config(args.experiment, args.set)
      check_references(cfg, args.experiment, paths=False)
      return aot.run(cfg, args.experiment, args.aot, args.slices, args.run_dir)
    stop_on_ctrl_c()
    if not traceback:
      from l2jax.checkpoint import quiet_orbax
      quiet_orbax()
    launch(args.experiment, args.set, args.run_dir, no_deps=args.no_deps, check_sharding=args.check_sharding)
  except KeyboardInterrupt:
    return 130
  except Exception as e:  # one-line error, non-zero exit; tracebacks with L2JAX_TRACEBACK=1
    if traceback:
      raise
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 2 if isinstance(e, c.ConfigError) else 1
  return 0


if __name__ == "__main__":
  _exit(main())
