"""THE launcher: `python -m l2jax.launch experiments/<file>.py[:ARG] [--set a.b=VALUE ...] [--run-dir DIR]`.

Imports the experiment file, calls its `get_config(ARG)`, applies `--set` overrides (typed from the config's
dataclass fields; every number is range-checked when the config is built), checks the run directory, takes its
lock, resolves experiment references (running missing dependencies first), runs the config's stage, and writes
the resolved config to RUN_DIR/config.json once the stage has accepted the directory.

The run directory (default `$L2JAX_RUNS/<file stem>-<ARG>`, L2JAX_RUNS defaulting to "runs"):
  - is new, empty, or an l2jax run directory of the same stage and name; anything else (a model directory, a
    file, another experiment's run) is refused and left untouched;
  - is locked by one launch at a time (RUN_DIR/run.lock holds the holder's pid and host); a lock whose
    process is dead on this host is stale and taken over; a second launch exits 1 naming the holder;
  - gets config.json only after the stage accepted it (a refused resume leaves the old config.json);
  - loses the hidden `.*.tmp-*` litter of killed writers at the start of every launch.
Experiment references: any string config field (also inside tuples) of the form `path/to/file.py[:ARG]` naming
an existing file is replaced by that experiment's `$L2JAX_RUNS/<stem>-<ARG>/final`; when final/ is missing the
experiment runs first, in this process, through `launch` (its own lock and references; cycles are an error);
`--no-deps` makes a missing final/ an error. `--print-config` prints the config as written, references
unresolved, and runs nothing; config.json holds the resolved paths.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from l2jax import config as c

RUNS_ENV = "L2JAX_RUNS"
LOCK = "run.lock"


class LaunchError(RuntimeError):
  """The run cannot start (bad run directory, lock held, dependency failed); the message is one line."""


class RunDirLocked(LaunchError):
  """Another live launch holds the run directory's lock."""


# ----------------------------------------------------------------------------------------------- experiments

def runs_root() -> Path:
  """Where default run directories live: $L2JAX_RUNS, default "runs" (relative to the working directory)."""
  return Path(os.environ.get(RUNS_ENV) or "runs")


def split_spec(spec: str) -> tuple[Path, str | None]:
  """('path/to/exp.py', ARG or None) of 'path/to/exp.py[:ARG]'."""
  path, _, arg = spec.partition(":")
  return Path(path), (arg or None)


def experiment_name(spec: str) -> str:
  """'<file stem>-<ARG>' (or '<file stem>'): the default run directory's name."""
  p, arg = split_spec(spec)
  return p.stem + (f"-{arg}" if arg else "")


def default_run_dir(spec: str) -> Path:
  return runs_root() / experiment_name(spec)


def is_reference(value: Any) -> bool:
  """True when `value` is an experiment reference: 'path/to/file.py[:ARG]' naming an existing file."""
  if not isinstance(value, str) or not value:
    return False
  p, _ = split_spec(value)
  return p.suffix == ".py" and p.is_file()


def load_experiment(spec: str):
  """(config, experiment name) from 'path/to/exp.py[:ARG]'."""
  p, arg = split_spec(spec)
  if p.is_dir() or (p.exists() and p.suffix != ".py"):
    raise c.ConfigError(f"{p}: not an experiment file (expected path/to/file.py[:ARG] defining get_config)")
  if not p.is_file():
    raise FileNotFoundError(f"{p}: experiment file not found")
  mod_spec = importlib.util.spec_from_file_location(f"l2jax_experiment_{p.stem}", p)
  if mod_spec is None or mod_spec.loader is None:
    raise c.ConfigError(f"{p}: not an experiment file (expected path/to/file.py[:ARG] defining get_config)")
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise c.ConfigError(f"{p}:{e.lineno}: {e.msg}") from None
  if not hasattr(module, "get_config"):
    raise AttributeError(f"{p}: defines no get_config(arg)")
  return module.get_config(arg), experiment_name(spec)


# ----------------------------------------------------------------------------------------------- run directory

def check_run_dir(run_dir: Path, cfg: Any) -> None:
  """Refuse (LaunchError) anything but a new or empty directory or an l2jax run directory of this stage and name."""
  if run_dir.exists() and not run_dir.is_dir():
    raise LaunchError(f"{run_dir}: --run-dir is a file, expected a directory")
  if not run_dir.is_dir():
    return
  names = sorted(n for n in os.listdir(run_dir) if n != LOCK and not _is_litter(n))
  if not names:
    return
  saved = None
  cfg_file = run_dir / "config.json"
  if cfg_file.is_file():
    try:
      saved = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError):
      saved = None
  if not (isinstance(saved, dict) and "stage" in saved) and not (run_dir / "checkpoints").is_dir():
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise LaunchError(f"{run_dir}: not an l2jax run directory (no run config.json; it holds {shown}); refusing to "
                      f"write into it: use a new or empty --run-dir")
  if isinstance(saved, dict) and "stage" in saved:
    stage, name = getattr(type(cfg), "stage", None), getattr(cfg, "name", None)
    if saved.get("stage") != stage or saved.get("name", name) != name:
      raise LaunchError(f"{run_dir}: holds the run {saved.get('name')!r} of stage {saved.get('stage')!r}, not "
                        f"{name!r} of stage {stage!r}: use a new --run-dir")


def _is_litter(name: str) -> bool:
  return name.startswith(".") and ".tmp-" in name


def remove_litter(run_dir: Path) -> list[str]:
  """Remove hidden `.*.tmp-*` entries (temporary directories of writers killed mid-write) from the run dir."""
  gone = []
  for p in sorted(run_dir.iterdir()) if run_dir.is_dir() else ():
    if not _is_litter(p.name):
      continue
    if p.is_dir() and not p.is_symlink():
      shutil.rmtree(p, ignore_errors=True)
    else:
      p.unlink(missing_ok=True)
    gone.append(p.name)
  if gone:
    print(f"removed leftovers of an interrupted run in {run_dir}: {', '.join(gone)}", file=sys.stderr)
  return gone


def _pid_alive(pid: int) -> bool:
  from l2jax.checkpoint import pid_alive   # jax is imported with it: not at launcher import time
  return pid_alive(pid)


class RunLock:
  """An exclusive lock file RUN_DIR/run.lock holding {"pid", "host"}; stale (dead pid, same host) locks are
  taken over. Created with a hard link of a complete temporary file, so a lock file is never half-written."""

  def __init__(self, run_dir: Path):
    self.path = Path(run_dir) / LOCK
    self.me = {"pid": os.getpid(), "host": socket.gethostname()}
    self.held = False

  def holder(self) -> dict | None:
    try:
      h = json.loads(self.path.read_text())
      return h if isinstance(h, dict) else {}
    except FileNotFoundError:
      return None
    except (ValueError, OSError, UnicodeDecodeError):
      return {}

  def acquire(self) -> "RunLock":
    tmp = self.path.with_name(f".{LOCK}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(self.me) + "\n")
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          self.held = True
          return self
        except FileExistsError:
          h = self.holder()
          if h is None:
            continue  # released meanwhile
          same_host = h.get("host") == self.me["host"]
          pid = h.get("pid")
          if same_host and isinstance(pid, int) and pid == self.me["pid"]:
            raise RunDirLocked(f"{self.path.parent}: already in use by this process (an experiment reference "
                               f"cycle or a nested launch of the same run directory)")
          if same_host and isinstance(pid, int) and not _pid_alive(pid):
            print(f"{self.path}: taking over the stale lock of dead process {pid}", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            continue
          raise RunDirLocked(f"{self.path.parent}: locked by process {pid} on host {h.get('host')!r} ({self.path}); "
                             f"wait for it to finish, or remove {self.path} if that process is gone")
      raise RunDirLocked(f"{self.path}: could not take the lock")
    finally:
      tmp.unlink(missing_ok=True)

  def release(self) -> None:
    if self.held and self.holder() == self.me:
      self.path.unlink(missing_ok=True)
    self.held = False


def _process_id() -> int:
  """This process's index in a multi-host launch (before jax.distributed starts); 0 when single-process."""
  for k in ("JAX_PROCESS_ID", "SLURM_PROCID"):
    if os.environ.get(k, "").isdigit():
      return int(os.environ[k])
  return 0


# ----------------------------------------------------------------------------------------------- references

def resolve_references(cfg: Any, *, no_deps: bool = False, _stack: tuple = ()) -> Any:
  """A copy of `cfg` with every experiment reference replaced by its run's final/ (running it first if missing)."""
  changes = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      new = resolve_references(v, no_deps=no_deps, _stack=_stack)
    elif isinstance(v, tuple):
      new = tuple(resolve_reference(x, no_deps=no_deps, _stack=_stack) if is_reference(x) else x for x in v)
    elif is_reference(v):
      new = resolve_reference(v, no_deps=no_deps, _stack=_stack)
    else:
      continue
    if new != v:
      changes[f.name] = new
  return dataclasses.replace(cfg, **changes) if changes else cfg


def _key(spec: str) -> tuple[str, str | None]:
  p, arg = split_spec(spec)
  return str(p.resolve()), arg


def resolve_reference(spec: str, *, no_deps: bool = False, _stack: tuple = ()) -> str:
  """`spec`'s run final/ directory as a string; runs the experiment first when final/ is incomplete."""
  if _key(spec) in [k for k, _ in _stack]:
    chain = " -> ".join([s for _, s in _stack] + [spec])
    raise c.ConfigError(f"experiment reference cycle: {chain}")
  final = default_run_dir(spec) / "final"
  if (final / "config.json").is_file():
    print(f"using {final} for {spec}", file=sys.stderr)
    return str(final)
  if no_deps:
    raise LaunchError(f"{spec}: {final} does not exist and --no-deps forbids running it; run "
                      f"`python -m l2jax.launch {spec}` first")
  print(f"running {spec} first (its final/ {final} is missing)", file=sys.stderr)
  try:
    launch(spec, no_deps=no_deps, _stack=_stack)
  except (KeyboardInterrupt, c.ConfigError):   # a cycle or a bad config: reported as it is
    raise
  except Exception as e:
    raise LaunchError(f"dependency {spec} failed: {_one_line(e)}") from e
  if not (final / "config.json").is_file():
    raise LaunchError(f"dependency {spec} ended without writing {final} (preempted?); run it again")
  print(f"using {final} for {spec}", file=sys.stderr)
  return str(final)


# ----------------------------------------------------------------------------------------------- launch

def _one_line(e: BaseException) -> str:
  """The error as printed: its message (with its type unless it is a ConfigError or LaunchError)."""
  msg = str(e).strip()
  return msg if isinstance(e, (c.ConfigError, LaunchError)) and msg else f"{type(e).__name__}: {msg}"


def launch(spec: str, sets: list[str] | tuple = (), run_dir: str | Path | None = None, *, no_deps: bool = False,
           check_sharding: bool = False, _stack: tuple = ()):
  """Run experiment `spec` ('path/to/exp.py[:ARG]') into `run_dir` (default $L2JAX_RUNS/<stem>-<ARG>).

  Returns the stage's result. Raises c.ConfigError (bad config / overrides / reference cycle), LaunchError
  (refused run directory, held lock, failed dependency) or the stage's own error; on a failure before the
  first checkpoint, a run directory this call created is removed.
  """
  try:
    cfg, _ = load_experiment(spec)
    cfg = c.apply_overrides(cfg, list(sets))
  except c.ConfigError:
    raise
  except (ValueError, TypeError, AttributeError, FileNotFoundError) as e:  # get_config's own complaints
    raise c.ConfigError(f"{spec}: {e}" if str(split_spec(spec)[0]) not in str(e) else str(e)) from None
  stack = _stack + ((_key(spec), spec),)
  run_dir = Path(run_dir) if run_dir is not None else default_run_dir(spec)
  check_run_dir(run_dir, cfg)
  lead = _process_id() == 0
  created = not run_dir.exists()
  lock = RunLock(run_dir)
  from l2jax import checkpoint as ckpt_lib
  try:
    if lead:
      run_dir.mkdir(parents=True, exist_ok=True)
      lock.acquire()
      remove_litter(run_dir)
    cfg = resolve_references(cfg, no_deps=no_deps, _stack=stack)

    def write_config():
      if lead:
        (run_dir / "config.json").write_text(c.to_json(cfg) + "\n")

    ckpt_lib.on_run_dir_accepted(run_dir, write_config)
    stage = importlib.import_module(f"l2jax.stages.{type(cfg).stage}")
    if check_sharding:
      result = stage.run(cfg, run_dir, check_sharding=True)
    else:
      result = stage.run(cfg, run_dir)
    ckpt_lib.run_dir_accepted(run_dir)  # a stage that never opened checkpoints accepted it by finishing
    return result
  except BaseException:
    ckpt_lib.forget_run_dir(run_dir)
    if created and lead:
      _remove_if_nothing_saved(run_dir)
    raise
  finally:
    lock.release()


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
  ap.add_argument("--print-config", action="store_true",
                  help="print the config (experiment references as written) and exit")
  args = ap.parse_args(argv)
  if args.print_config:
    try:
      cfg, _ = load_experiment(args.experiment)
      print(c.to_json(c.apply_overrides(cfg, args.set)))
      return 0
    except (c.ConfigError, FileNotFoundError, AttributeError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  try:
    result = launch(args.experiment, args.set, args.run_dir, no_deps=args.no_deps,
                    check_sharding=args.check_sharding)
  except KeyboardInterrupt:
    return 130
  except c.ConfigError as e:
    if os.environ.get("L2JAX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # clear one-line error, non-zero exit; tracebacks with L2JAX_TRACEBACK=1
    if os.environ.get("L2JAX_TRACEBACK"):
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  return 0


def _remove_if_nothing_saved(run_dir: Path) -> None:
  """A run that failed before its first checkpoint leaves no run directory behind (it made it)."""
  ckpts = run_dir / "checkpoints"
  if not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())) and not (run_dir / "final").exists():
    if any((p / "final").exists() or (p / "checkpoints").is_dir() for p in run_dir.iterdir() if p.is_dir()):
      return  # a composed run (experiments/rlhf.py) keeps the stages it finished in its sub-run directories
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
