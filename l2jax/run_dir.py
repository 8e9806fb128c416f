"""The run directory's guarantees (DESIGN.md section 2): what a launch may write into, lock, clean, and remove.

A run directory:
  - is new, empty, or an l2jax run directory of the same stage and name; anything else (a model directory, a
    file, another experiment's run) is refused and left untouched (`check_run_dir`);
  - is locked by one launch at a time (RUN_DIR/run.lock holds the holder's pid and host); a lock whose process is
    dead on this host is stale and taken over; a second launch gets RunDirLocked naming the holder (`RunLock`);
  - loses the hidden `.*.tmp-*` litter of killed writers at the start of every launch (`remove_litter`);
  - holds config.json from the moment a stage accepts it: at once when it holds no earlier run (so a run killed
    before its first checkpoint, e.g. while rejection sampling writes its shards, is recognised and resumed),
    else when the stage accepts the earlier run (a refused resume leaves the old config.json);
  - is never removed once it holds anything a stage wrote: on a failure or Ctrl-C, a directory this launch created
    is removed only when it holds nothing but run.lock, config.json and litter (`RunDir`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Callable

LOCK = "run.lock"
CONFIG = "config.json"


class LaunchError(RuntimeError):
  """The run cannot start (bad run directory, lock held, dependency failed); the message is one line."""


class RunDirLocked(LaunchError):
  """Another live launch holds the run directory's lock."""


def is_litter(name: str) -> bool:
  return name.startswith(".") and ".tmp-" in name


def stage_outputs(run_dir: Path) -> list[str]:
  """Names in `run_dir` a stage wrote: everything but run.lock, config.json and litter (sorted)."""
  if not run_dir.is_dir():
    return []
  return sorted(n for n in os.listdir(run_dir) if n not in (LOCK, CONFIG) and not is_litter(n))


def _saved_config(run_dir: Path) -> dict | None:
  try:
    saved = json.loads((run_dir / CONFIG).read_text())
  except (OSError, ValueError, UnicodeDecodeError):
    return None
  return saved if isinstance(saved, dict) and "stage" in saved else None


def check_run_dir(run_dir: Path, cfg: Any) -> None:
  """Refuse (LaunchError) anything but a new or empty directory or an l2jax run directory of this stage and name."""
  if run_dir.exists() and not run_dir.is_dir():
    raise LaunchError(f"{run_dir}: --run-dir is a file, expected a directory")
  names = stage_outputs(run_dir)
  if not names:
    return   # new, empty, or only the config.json of a run that wrote nothing
  saved = _saved_config(run_dir)
  if saved is None and not (run_dir / "checkpoints").is_dir():
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise LaunchError(f"{run_dir}: not an l2jax run directory (no run config.json; it holds {shown}); refusing to "
                      f"write into it: use a new or empty --run-dir")
  if saved is not None:
    stage, name = getattr(type(cfg), "stage", None), getattr(cfg, "name", None)
    if saved.get("stage") != stage or saved.get("name", name) != name:
      raise LaunchError(f"{run_dir}: holds the run {saved.get('name')!r} of stage {saved.get('stage')!r}, not "
                        f"{name!r} of stage {stage!r}: use a new --run-dir")


def remove_litter(run_dir: Path) -> list[str]:
  """Remove hidden `.*.tmp-*` entries (temporary directories of writers killed mid-write) from the run dir."""
  gone = []
  for p in sorted(run_dir.iterdir()) if run_dir.is_dir() else ():
    if not is_litter(p.name):
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
          if self._stale_taken_over():
            continue
      raise RunDirLocked(f"{self.path}: could not take the lock")
    finally:
      tmp.unlink(missing_ok=True)

  def _stale_taken_over(self) -> bool:
    """After a failed link: True when the lock is gone or was stale (removed); raises when it is held."""
    h = self.holder()
    if h is None:
      return True   # released meanwhile
    same_host, pid = h.get("host") == self.me["host"], h.get("pid")
    if same_host and isinstance(pid, int) and pid == self.me["pid"]:
      raise RunDirLocked(f"{self.path.parent}: already in use by this process (an experiment reference "
                         f"cycle or a nested launch of the same run directory)")
    if same_host and isinstance(pid, int) and not _pid_alive(pid):
      print(f"{self.path}: taking over the stale lock of dead process {pid}", file=sys.stderr)
      self.path.unlink(missing_ok=True)
      return True
    raise RunDirLocked(f"{self.path.parent}: locked by process {pid} on host {h.get('host')!r} ({self.path}); "
                       f"wait for it to finish, or remove {self.path} if that process is gone")

  def release(self) -> None:
    if self.held and self.holder() == self.me:
      self.path.unlink(missing_ok=True)
    self.held = False


def process_id() -> int:
  """This process's index in a multi-host launch (before jax.distributed starts); 0 when single-process."""
  for k in ("JAX_PROCESS_ID", "SLURM_PROCID"):
    if os.environ.get(k, "").isdigit():
      return int(os.environ[k])
  return 0


class RunDir:
  """One launch's hold on its run directory (a context manager): checked, created, locked and cleaned of litter
  on entry; config.json per the acceptance rule; on a failure (Ctrl-C included) removed only when this launch
  created it and it holds nothing a stage wrote; the lock released on exit. Process 0 alone writes."""

  def __init__(self, path: Path, cfg: Any):
    self.path, self.cfg = Path(path), cfg
    self.lead = process_id() == 0
    self.lock = RunLock(self.path)
    self.created = False
    self.fresh = False

  def __enter__(self) -> "RunDir":
    check_run_dir(self.path, self.cfg)
    self.created = not self.path.exists()
    try:
      if self.lead:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        remove_litter(self.path)
      self.fresh = not stage_outputs(self.path)
    except BaseException:
      self.__exit__(*sys.exc_info())
      raise
    return self

  def write_config_on_accept(self, text: Callable[[], str]) -> None:
    """config.json = text(): now when the directory holds no earlier run, else once the stage accepts it."""
    from l2jax import checkpoint as ckpt_lib

    def write() -> None:
      if self.lead:
        tmp = self.path / f".{CONFIG}.tmp-{os.getpid()}"
        tmp.write_text(text() + "\n")
        os.replace(tmp, self.path / CONFIG)

    if self.fresh:
      write()
    else:
      ckpt_lib.on_run_dir_accepted(self.path, write)

  def accepted(self) -> None:
    """The stage finished: it accepted the directory (for stages that never opened checkpoints)."""
    from l2jax import checkpoint as ckpt_lib
    ckpt_lib.run_dir_accepted(self.path)

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is not None:
        from l2jax import checkpoint as ckpt_lib
        ckpt_lib.forget_run_dir(self.path)
        if self.created and self.lead and self.path.is_dir() and not stage_outputs(self.path):
          shutil.rmtree(self.path, ignore_errors=True)
    finally:
      self.lock.release()
