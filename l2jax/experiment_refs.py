"""Experiments and experiment references (DESIGN.md section 5): 'path/to/exp.py[:ARG]' names the config that the
file's `get_config(ARG)` returns, and the default run directory `$L2JAX_RUNS/<file stem>-<ARG>`.

A reference is any string config field (also inside tuples) of that form naming an existing file; it stands for
that experiment's `final/` and is replaced by it (`resolve_references`), the experiment running first (through
the launcher, with its own lock and references) when final/ is missing.

Before anything runs or is written, `check_references` walks the config and, recursively, the config of every
dependency that would run: a reference-shaped value (`x.py[:ARG]`) whose file is missing, a local path that does
not exist (a value with a '/' whose first component exists here, after an optional `FORMAT:` prefix such as
`hh-safety:`; globs must match a file) or a reference cycle is a one-line ConfigError naming the chain of
experiments, the key and the file. So `ppo.py:test --set policy=experiments/nope.py:test` fails at once instead of
after SFT and both reward models have trained.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from l2jax import config as c
from l2jax.run_dir import LaunchError

RUNS_ENV = "L2JAX_RUNS"
_REF_SHAPE = re.compile(r"^[^\s:=]+\.py(:[^\s:/=]*)?$")
_FORMAT = re.compile(r"^[A-Za-z][\w-]*:(?!//)")   # the "FORMAT:" of a data source spec ("hh-safety:data/...")


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


def load_config(spec: str, sets=()) -> Any:
  """The config of `spec` with `--set` overrides; every complaint (get_config's own included) a ConfigError."""
  try:
    return c.apply_overrides(load_experiment(spec)[0], list(sets))
  except c.ConfigError:
    raise
  except (ValueError, TypeError, AttributeError, FileNotFoundError) as e:
    raise c.ConfigError(f"{spec}: {e}" if str(split_spec(spec)[0]) not in str(e) else str(e)) from None


# ----------------------------------------------------------------------------------------------- checks

def _strings(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
  """(dotted key, value) of every string field of `cfg`, tuple elements included."""
  for f in dataclasses.fields(cfg):
    v, key = getattr(cfg, f.name), prefix + f.name
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      yield from _strings(v, key + ".")
    elif isinstance(v, str):
      yield key, v
    elif isinstance(v, tuple):
      yield from ((key, x) for x in v if isinstance(x, str))


def path_problem(value: str) -> str | None:
  """Why `value` names no file when it is a local path ('<path>: no such file or directory'), else None.

  A path: no whitespace, a '/' after an optional `FORMAT:` prefix, and a first component that exists here (so a
  dataset name like 'c4/en:3.0.1' or a prompt text is no path); a glob must match something."""
  if not value or any(ch.isspace() for ch in value) or _REF_SHAPE.match(value):
    return None
  m = _FORMAT.match(value)
  path = value[m.end():] if m else value
  if "/" not in path.strip("/"):
    return None
  first = path.split("/")[1 if path.startswith("/") else 0]
  if not first or not Path(("/" if path.startswith("/") else "") + first).exists():
    return None
  if glob.has_magic(path):
    return None if glob.glob(path) else f"{path}: no file matches"
  return None if Path(path).exists() else f"{path}: no such file or directory"


def _key(spec: str) -> tuple[str, str | None]:
  p, arg = split_spec(spec)
  return str(p.resolve()), arg


def _cycle(stack: tuple, spec: str) -> None:
  if _key(spec) in [k for k, _ in stack]:
    raise c.ConfigError(f"experiment reference cycle: {' -> '.join([s for _, s in stack] + [spec])}")


def check_references(cfg: Any, spec: str, stack: tuple = (), paths: bool = True) -> None:
  """Raise ConfigError (one line: the chain of experiments, the key, the file) for a missing experiment file,
  a missing path (unless `paths` is False: memory plans and ahead-of-time compiles read no files) or a
  reference cycle in `cfg` (the config of `spec`) or in any dependency that would run."""
  here = stack + ((_key(spec), spec),)
  where = " -> ".join(s for _, s in here[:-1]) + (f" -> {spec}: " if len(here) > 1 else "")
  for key, value in _strings(cfg):
    if is_reference(value):
      _cycle(here, value)
      if (default_run_dir(value) / "final" / "config.json").is_file():
        continue   # done: it will not run
      try:
        dep = load_config(value)
      except c.ConfigError as e:
        raise c.ConfigError(f"{where}{key}={value}: {e}") from None
      check_references(dep, value, here, paths)
    elif _REF_SHAPE.match(value):
      raise c.ConfigError(f"{where}{key}={value}: experiment file {split_spec(value)[0]} not found")
    elif paths and (problem := path_problem(value)) is not None:
      raise c.ConfigError(f"{where}{key}: {problem}")


# ----------------------------------------------------------------------------------------------- resolution

def one_line(e: BaseException) -> str:
  """The error as printed: its message (with its type unless it is a ConfigError or LaunchError)."""
  msg = str(e).strip()
  return msg if isinstance(e, (c.ConfigError, LaunchError)) and msg else f"{type(e).__name__}: {msg}"


def resolve_references(cfg: Any, launch: Callable, *, no_deps: bool = False, stack: tuple = ()) -> Any:
  """A copy of `cfg` with every experiment reference replaced by its run's final/ (`launch(spec, no_deps=,
  _stack=)` runs it first when missing)."""
  def one(v):
    return resolve_reference(v, launch, no_deps=no_deps, stack=stack) if is_reference(v) else v

  changes = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      new = resolve_references(v, launch, no_deps=no_deps, stack=stack)
    elif isinstance(v, tuple):
      new = tuple(one(x) for x in v)
    else:
      new = one(v)
    if new != v:
      changes[f.name] = new
  return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_reference(spec: str, launch: Callable, *, no_deps: bool = False, stack: tuple = ()) -> str:
  """`spec`'s run final/ directory as a string; runs the experiment first when final/ is incomplete."""
  _cycle(stack, spec)
  final = default_run_dir(spec) / "final"
  if not (final / "config.json").is_file():
    if no_deps:
      raise LaunchError(f"{spec}: {final} does not exist and --no-deps forbids running it; run "
                        f"`python -m l2jax.launch {spec}` first")
    print(f"running {spec} first (its final/ {final} is missing)", file=sys.stderr)
    try:
      launch(spec, no_deps=no_deps, _stack=stack)
    except (KeyboardInterrupt, c.ConfigError):   # a cycle or a bad config: reported as it is
      raise
    except Exception as e:
      raise LaunchError(f"dependency {spec} failed: {one_line(e)}") from e
    if not (final / "config.json").is_file():
      raise LaunchError(f"dependency {spec} ended without writing {final} (preempted?); run it again")
  print(f"using {final} for {spec}", file=sys.stderr)
  return str(final)
