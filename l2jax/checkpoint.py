"""Checkpoints: the l2jax model directory (DESIGN.md section 2) and training checkpoints with resume.

A model directory holds:
  params/         Orbax PyTree checkpoint of the parameter dict (as `llama.split` returns it)
  config.json     the LlamaConfig
  tokenizer.model the SentencePiece model
  [head.json]     optional, scalar-head metadata for reward / value models
It is written into a temporary sibling and renamed into place, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from l2jax.data.tokenizer import CHAT_FORMAT_FILE
from l2jax.model.config import LlamaConfig

PARAMS = "params"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
  """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds."""
  final = Path(final).absolute()
  if final.exists() and any(final.iterdir()):
    raise FileExistsError(f"{final}: output directory exists and is not empty; remove it or choose another")
  final.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_tmp(final)
  tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-p{os.getpid()}-", dir=final.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final directory gets the usual mode
  try:
    yield tmp
    if final.exists():
      final.rmdir()
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def remove_stale_tmp(final: str | Path) -> list[Path]:
  """Remove `.<name>.tmp-*` siblings of `final` left by killed writers: those of a dead process on this host
  (the name carries the writer's pid, `.<name>.tmp-p<PID>-...`) and older ones without a pid."""
  final = Path(final).absolute()
  gone = []
  if not final.parent.is_dir():
    return gone
  for p in final.parent.glob(f".{final.name}.tmp-*"):
    tag = p.name[len(f".{final.name}.tmp-"):]
    pid = tag[1:].split("-", 1)[0] if tag.startswith("p") else ""
    if pid.isdigit() and pid_alive(int(pid)):
      continue
    if p.is_dir():
      shutil.rmtree(p, ignore_errors=True)
    else:
      p.unlink(missing_ok=True)
    gone.append(p)
  return gone


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (stale temp directories and locks are those of dead ones)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def save_params(path: str | Path, params: Any) -> None:
  """Write a parameter pytree (jax or numpy arrays) as an Orbax checkpoint at `path` (must not exist).

  A leaf may also be a zero-argument callable returning the array (a lazy leaf). A tree of nested dicts
  with lazy leaves is written streaming: each leaf is produced, written and dropped before the next is
  produced (Orbax partial saves, merged at the end), so writing needs memory for about the largest leaf,
  not the whole tree. The result reads back exactly like a plain save; on failure nothing is left at `path`.
  """
  import orbax.checkpoint as ocp
  path = Path(path).absolute()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if any(callable(v) for _, v in leaves):
    streamable = all(isinstance(k, jax.tree_util.DictKey) for kp, _ in leaves for k in kp)
    if streamable and jax.process_count() == 1 and _partial_save_api() is not None:
      _save_params_streaming(path, leaves)
      return
    params = jax.tree.map(lambda v: v() if callable(v) else v, params)  # fallback: all leaves at once
  ocp.PyTreeCheckpointer().save(path, params)


def _partial_save_api():
  """Orbax's v1 API (`orbax.checkpoint.experimental.v1`) if it has partial saves, else None (older Orbax)."""
  try:
    from orbax.checkpoint.experimental import v1
    ok = callable(v1.partial.save) and callable(v1.partial.finalize) and \
        hasattr(v1.Context().array.saving, "use_zarr3")
  except (ImportError, AttributeError):
    return None
  return v1 if ok else None


def _save_params_streaming(path: Path, leaves: list) -> None:
  """Write [(dict key path, array or lazy leaf)] one leaf at a time as the PyTree checkpoint `path`.

  Each leaf goes out in its own Orbax partial save into a staging directory beside `path`; `finalize` merges
  them (metadata and OCDBT manifests) into one checkpoint, whose PyTree directory is renamed to `path`.
  The arrays are stored as `PyTreeCheckpointer` stores them (OCDBT, zarr v2, zstd), so restoring is unchanged.
  """
  import ctypes
  import json
  import time
  import uuid

  import orbax.checkpoint as ocp
  v1 = _partial_save_api()
  if path.exists():
    raise FileExistsError(f"{path}: already exists")
  path.parent.mkdir(parents=True, exist_ok=True)
  # No leading dot: Orbax does not find the partial saves of a hidden directory when it finalizes.
  stage = path.parent / f"{path.name}.tmp-stream-{uuid.uuid4().hex[:8]}"
  try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    trim = None
  init_ns = time.time_ns()
  ctx = v1.Context()
  ctx.array.saving.use_zarr3 = False  # PyTreeCheckpointer's array format (zarr v2 + zstd in OCDBT)
  try:
    with ctx:
      for keypath, leaf in leaves:
        value = leaf() if callable(leaf) else leaf
        item: Any = value
        for k in reversed(keypath):
          item = {k.key: item}
        v1.partial.save(stage, item)
        del value, item
        if trim is not None:
          trim(0)  # hand the freed write buffers back to the OS before producing the next leaf
      v1.partial.finalize(stage)
    trees = [d for d in stage.iterdir() if (d / "_METADATA").is_file()]
    if len(trees) != 1:
      raise RuntimeError(f"{stage}: expected one PyTree directory after Orbax's partial-save finalize, "
                         f"found {[d.name for d in trees]}")
    os.replace(trees[0], path)
    # What PyTreeCheckpointer writes beside the arrays (its step metadata and commit marker).
    handler = ocp.PyTreeCheckpointHandler
    (path / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": f"{handler.__module__}.{handler.__qualname__}", "metrics": {}, "performance_metrics": {},
        "init_timestamp_nsecs": init_ns, "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": {}}))
    (path / "commit_success.txt").write_text(f"Checkpoint commit was successful to {path}")
  except BaseException:
    shutil.rmtree(path, ignore_errors=True)
    raise
  finally:
    for d in path.parent.glob(f"{stage.name}*"):  # the staging directory and Orbax's .partial_save siblings
      shutil.rmtree(d, ignore_errors=True)


def restore_params(path: str | Path, target: Any | None = None) -> Any:
  """Read a parameter pytree. `target`: ShapeDtypeStructs (optionally with `sharding=`) to restore onto."""
  import orbax.checkpoint as ocp
  path = Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no parameter checkpoint here")
  ckptr = ocp.PyTreeCheckpointer()
  if target is None:  # host numpy arrays in the stored dtypes, independent of the saving topology
    meta = ckptr.metadata(path).item_metadata
    meta = meta.tree if hasattr(meta, "tree") else meta
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None), dtype=s.dtype, global_shape=s.shape)
      if getattr(s, "sharding", None) is not None else ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype),
      target)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))


def save_model_dir(out_dir: str | Path, cfg: LlamaConfig, params: Any, tokenizer: str | Path | None,
                   extra_files: dict[str, str] | None = None) -> Path:
  """Write an l2jax model directory: params/, config.json, tokenizer.model (and its chat_format file, when the
  tokenizer has one: l2jax.data.tokenizer) (+ extra text files).

  One process: everything goes into a temporary sibling renamed into place (atomic). Several processes
  (multi-host, params sharded over all of them): every process must call this; Orbax writes params/
  collectively (atomic itself), then process 0 writes config.json last, so a directory without
  config.json is never taken for a complete checkpoint.
  """
  if tokenizer is not None and not Path(tokenizer).is_file():
    raise FileNotFoundError(f"{tokenizer}: tokenizer model not found")

  def write_small(d: Path) -> None:
    if tokenizer is not None:
      shutil.copyfile(tokenizer, d / TOKENIZER)
      fmt = Path(tokenizer).with_name(CHAT_FORMAT_FILE)   # the model's chat format travels with its tokenizer
      if fmt.is_file():
        shutil.copyfile(fmt, d / CHAT_FORMAT_FILE)
    for name, text in (extra_files or {}).items():
      (d / name).write_text(text)
    cfg.save(d / CONFIG)

  if jax.process_count() > 1:
    out = Path(out_dir).absolute()
    save_params(out / PARAMS, params)
    if jax.process_index() == 0:
      write_small(out)
    return out
  with atomic_dir(out_dir) as tmp:
    save_params(tmp / PARAMS, params)
    write_small(tmp)
  return Path(out_dir)


def check_model_dir(ckpt_dir: str | Path) -> Path:
  """Raise a clear error unless `ckpt_dir` looks like an l2jax model directory."""
  d = Path(ckpt_dir)
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: checkpoint directory not found")
  missing = [n for n in (CONFIG, PARAMS) if not (d / n).exists()]
  if missing:
    raise FileNotFoundError(f"{d}: not an l2jax checkpoint directory (missing {', '.join(missing)}); "
                            f"expected {PARAMS}/, {CONFIG} and {TOKENIZER}")
  return d


def load_model_dir(ckpt_dir: str | Path, **overrides) -> tuple[LlamaConfig, Any]:
  """(config, params as numpy) from an l2jax model directory; `overrides` replace config fields (e.g. dtype)."""
  d = check_model_dir(ckpt_dir)
  cfg = LlamaConfig.load(d / CONFIG)
  if overrides:
    cfg = cfg.replace(**overrides)
  from l2jax.model import llama
  want = llama.split(llama.abstract(cfg))[1]
  got = restore_params(d / PARAMS)
  check_tree(want, got, where=str(d / PARAMS))
  return cfg, got


def check_tree(want: Any, got: Any, where: str) -> None:
  """Compare key sets and shapes of two parameter trees; raise naming the first mismatching key."""
  w = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want)}
  g = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
  if set(w) != set(g):
    raise ValueError(f"{where}: parameter keys differ from the config's model: "
                     f"missing {sorted(set(w) - set(g))}, unexpected {sorted(set(g) - set(w))}")
  for k in w:
    if tuple(w[k].shape) != tuple(np.shape(g[k])):
      raise ValueError(f"{where}: parameter {k}: expected shape {tuple(w[k].shape)}, found {tuple(np.shape(g[k]))}")


def quiet_orbax() -> None:
  """Keep Orbax's background noise off a command-line run's terminal, where the caller reports the error in one
  line: Orbax's own log records below CRITICAL (a failed save logs every failing thread's traceback before the
  error reaches us), asyncio's "Task exception was never retrieved" for Orbax's restore tasks, and the "Event loop is closed" RuntimeErrors that TensorStore's callbacks raise, as
  unraisable exceptions, into the asyncio loop Orbax has already closed after a restore that failed (the fallback
  past a corrupt checkpoint). Idempotent; everything else still reaches the previous hooks."""
  import logging
  for name, flt in (("absl", _OrbaxRecords), ("asyncio", _OrbaxTaskErrors)):
    log = logging.getLogger(name)
    if not any(getattr(f, "_l2jax", False) for f in log.filters):
      log.addFilter(flt())
  if getattr(sys.unraisablehook, "_l2jax", False):
    return
  previous = sys.unraisablehook

  def hook(u):
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    previous(u)
  hook._l2jax = True
  sys.unraisablehook = hook


class _OrbaxRecords:
  """logging filter: drops records logged from Orbax's modules below CRITICAL."""
  _l2jax = True

  def filter(self, record) -> bool:
    import logging
    return record.levelno >= logging.CRITICAL or f"{os.sep}orbax{os.sep}" not in record.pathname


class _OrbaxTaskErrors:
  """logging filter for asyncio: drops "Task exception was never retrieved" of Orbax's own tasks (a restore that
  failed on a corrupt checkpoint, or a save that hit a full disk, leaves its sibling tasks' errors unread; the
  caller reports the failure in one line)."""
  _l2jax = True

  def filter(self, record) -> bool:
    msg = record.getMessage()
    if "Task exception was never retrieved" not in msg:
      return True
    where = msg
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:   # the coroutine's repr names its file only sometimes; its traceback always does
      where += tb.tb_frame.f_code.co_filename
      tb = tb.tb_next
    return f"{os.sep}orbax{os.sep}" not in where


class RunMismatch(ValueError):
  """The run directory holds checkpoints of a different experiment."""


class CheckpointError(RuntimeError):
  """No checkpoint of the run directory restores; the message names the checkpoint and the file."""


# The launcher writes RUN_DIR/config.json only once the stage has accepted the run directory: when a
# TrainCheckpointer found no checkpoints, or its newest usable one has this run's identity.
_ON_ACCEPT: dict[str, Callable[[], None]] = {}


def on_run_dir_accepted(run_dir: str | Path, fn: Callable[[], None]) -> None:
  """Call `fn()` once, when a stage accepts `run_dir` (see TrainCheckpointer.restore_latest / check_identity)."""
  _ON_ACCEPT[str(Path(run_dir).absolute())] = fn


def run_dir_accepted(run_dir: str | Path) -> None:
  """The stage accepts `run_dir`: run (once) what `on_run_dir_accepted` registered for it."""
  fn = _ON_ACCEPT.pop(str(Path(run_dir).absolute()), None)
  if fn is not None:
    fn()


def forget_run_dir(run_dir: str | Path) -> None:
  _ON_ACCEPT.pop(str(Path(run_dir).absolute()), None)


# Files every complete training checkpoint step holds (Orbax Composite of state / data / meta).
_STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data/metadata", "meta/metadata")
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "meta/metadata")


def step_problem(step_dir: Path) -> str | None:
  """Why the checkpoint step directory `step_dir` is incomplete ("FILE: problem"), or None if its files look whole."""
  for name in _STEP_FILES:
    f = step_dir / name
    if not f.is_file():
      return f"{f}: missing"
    if f.stat().st_size == 0:
      return f"{f}: empty"
  for name in _JSON_FILES:
    f = step_dir / name
    try:
      json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
      return f"{f}: truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
  return None


def _restore_error(e: BaseException) -> str:
  """One line for a failed restore: the array and file TensorStore names when it does, else the message."""
  import re
  x: BaseException | None = e
  while x is not None:
    m = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": ([^"\'\\]{0,160})', repr(x))
    if m:
      return f"array {m.group(1)} in {m.group(2)}: {m.group(3).strip()}"
    x = x.__cause__ or x.__context__
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:200]}"


def _write_error(e: BaseException) -> str:
  """One line for a failed checkpoint write: the operating system's reason when Orbax / TensorStore give one."""
  import re
  x: BaseException | None = e
  while x is not None:
    if isinstance(x, OSError) and x.strerror:
      return f"{x.strerror} (errno {x.errno})" + (f": {x.filename}" if x.filename else "")
    m = re.search(r"Failed to write [^:]*: ([^\[\]\"']+?)\s*(?:\[os_error_code='?(\d+)'?\])?\s*$",
                  str(x).splitlines()[0] if str(x) else "")
    if m:
      return m.group(1) + (f" (errno {m.group(2)})" if m.group(2) else "")
    x = x.__cause__ or x.__context__
  msg = " ".join(str(e).split())
  return f"{type(e).__name__}: {msg[:200]}"


class TrainCheckpointer:
  """Orbax training checkpoints under run_dir/checkpoints: state pytree + data-iterator state + metadata.

  Each save is a step directory written by Orbax into a temporary name and renamed when complete, so a run
  killed at any moment (SIGKILL included) resumes from the newest complete step. `identity` (stage, name,
  model) is stored with every step; resuming with a different identity is an error, not a silent mix.
  """

  def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True, identity: dict | None = None):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.dir = (Path(run_dir) / "checkpoints").absolute()
    self.identity = identity or {}
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    self.mngr = ocp.CheckpointManager(self.dir, options=opts)
    self._unfinished: int | None = None   # the last step saved, until a wait() has seen it written

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def check_identity(self, step: int) -> None:
    """Raise RunMismatch unless checkpoint `step` was saved by this experiment; on success the run directory
    is accepted (`on_run_dir_accepted`)."""
    meta = self.mngr.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]
    saved = meta.get("identity", {})
    diff = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
    if diff:
      details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.identity.get(k)!r}" for k in diff)
      raise RunMismatch(f"{self.dir}: holds checkpoints of another experiment ({details}). "
                        f"Use a new --run-dir, or remove the old checkpoints.")
    run_dir_accepted(self.dir.parent)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Any] | None:
    """(step, state, data_state) of the newest checkpoint that restores completely, or None without any.

    A newer checkpoint that does not restore (a missing or truncated file) is skipped with a message naming it
    and the reason, and moved to RUN_DIR/corrupt-checkpoints/<step> so that training can write that step again.
    If none restores, CheckpointError names the newest one and its bad file. A checkpoint of another
    experiment raises RunMismatch (never skipped). Accepts the run directory when it returns.
    """
    steps = sorted(self.mngr.all_steps(), reverse=True)
    skipped: list[tuple[int, str]] = []
    for s in steps:
      problem = step_problem(self.dir / str(s))
      if problem is None:
        try:
          self.check_identity(s)
          state, data_state = self.restore(s, abstract_state)
        except RunMismatch:
          raise
        except Exception as e:  # Orbax / tensorstore: a truncated array file, a damaged manifest, ...
          problem = f"{self.dir / str(s)}: does not restore ({_restore_error(e)})"
      if problem is not None:
        print(f"skipping checkpoint {self.dir / str(s)}: {problem}", file=sys.stderr)
        skipped.append((s, problem))
        continue
      if skipped:
        aside = self.dir.parent / "corrupt-checkpoints"
        aside.mkdir(exist_ok=True)
        for b, _ in skipped:
          dest = aside / str(b)
          if dest.exists():
            shutil.rmtree(dest)
          os.replace(self.dir / str(b), dest)
        self.mngr.reload()
        print(f"resuming from checkpoint {self.dir / str(s)}; moved the {len(skipped)} newer checkpoint(s) that "
              f"do not restore to {aside}", file=sys.stderr)
      return s, state, data_state
    if skipped:
      s, problem = skipped[0]
      raise CheckpointError(f"no checkpoint in {self.dir} restores; the newest, step {s}: {problem}")
    run_dir_accepted(self.dir.parent)
    return None

  def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
    """Save `step` (in the background when async); a failed write (of this step or of the previous one still in
    flight) raises CheckpointError with the reason in one line (e.g. "File too large (errno 27)")."""
    ocp = self.ocp
    run_dir_accepted(self.dir.parent)
    meta = {"step": int(step), "identity": self.identity}
    steps = " or ".join(str(s) for s in sorted({self._unfinished, int(step)} - {None}))
    saved = self._writing(steps, self.mngr.save, int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
        force=force)
    self._unfinished = int(step) if saved else self._unfinished
    return saved

  def _writing(self, steps: str, fn: Callable, *args, **kw):
    try:
      return fn(*args, **kw)
    except Exception as e:
      raise CheckpointError(f"{self.dir}: writing checkpoint {steps or '?'} failed: {_write_error(e)}") from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state, data_state) of `step`; `abstract_state`: ShapeDtypeStructs with `sharding=` to restore onto."""
    ocp = self.ocp
    out = self.mngr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self._writing(str(self._unfinished or ""), self.mngr.wait_until_finished)
    self._unfinished = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.mngr.close()
