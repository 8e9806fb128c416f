"""Recovery paths say what happened in one line and print no traceback (DESIGN.md section 8): falling back past a
corrupt newest checkpoint, a full disk (`ulimit -f`), and Ctrl-C pressed twice."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.vocab_size=512", "--set", "model.dim=32", "--set", "model.n_layers=2",
         "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.ffn_dim=64",
         "--set", "data.tokenizer=data/stories260K/tok512.model",
         "--set", "seq_len=32", "--set", "global_batch=8", "--set", "eval_every=0", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=1"]


def _cmd(run_dir, steps, every, *extra):
  return [sys.executable, "-m", "l2jax.launch", "experiments/pretrain.py:tiny", "--run-dir", str(run_dir), *SMALL,
          "--set", f"steps={steps}", "--set", f"ckpt.every={every}", *extra]


def _env(**kw):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **kw}
  env.pop("L2JAX_TRACEBACK", None)
  return env


def _launch(run_dir, steps, every, *extra, **popen):
  p = subprocess.run(_cmd(run_dir, steps, every, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=600, **popen)
  return p.returncode, p.stderr


@pytest.mark.slow
def test_fallback_past_corrupt_checkpoints_prints_one_notice_each_and_no_traceback(tmp_path):
  """Truncated arrays in the four newest checkpoints: each failed Orbax restore used to leave TensorStore callbacks
  raising "Event loop is closed" into the asyncio loop Orbax had closed (about 39 tracebacks a run here; each
  restore races, so four of them make the old noise certain)."""
  d = tmp_path / "run"
  keep = ["--set", "ckpt.keep=5", "--set", "log_every=1"]
  rc, err = _launch(d, 10, 2, *keep, "--set", "ckpt.async_save=false")
  assert rc == 0, err[-3000:]
  for s in (4, 6, 8, 10):
    for f in (d / f"checkpoints/{s}/state/d").iterdir():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  rc, err = _launch(d, 12, 2, *keep)
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  skipped = [l for l in err.splitlines() if "skipping checkpoint" in l]
  assert [l.split(":")[0] for l in skipped] == [f"skipping checkpoint {d}/checkpoints/{s}" for s in (10, 8, 6, 4)], err
  assert json.loads((d / "final" / "final_step.json").read_text())["step"] == 12


@pytest.mark.slow
def test_a_full_disk_is_one_line_error(tmp_path):
  """`ulimit -f 100` (100 KiB per file): the asynchronous checkpoint write fails; Orbax used to log every failing
  thread's traceback (4 to 22 here) before the error reached the launcher."""
  def limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 1024, resource.RLIM_INFINITY))

  env = _env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # its entries would hit the limit too
  p = subprocess.run(_cmd(tmp_path / "run", 4, 2, "--set", "ckpt.async_save=true"), cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600, preexec_fn=limit)
  assert p.returncode == 1, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and "ERROR:absl" not in p.stderr, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "writing checkpoint" in errors[0] and "File too large" in errors[0], p.stderr[-3000:]


def test_orbax_tasks_unread_errors_are_dropped_whoever_names_the_file():
  """asyncio's "Task exception was never retrieved" of an Orbax task is dropped whether the message or only the
  exception's traceback names Orbax's file (a failed save's write tasks); other tasks' are kept."""
  import logging
  from l2jax.checkpoint import _OrbaxTaskErrors
  keep = _OrbaxTaskErrors().filter
  record = lambda msg, exc=None: logging.LogRecord("asyncio", logging.ERROR, "x", 1, msg, None, exc)
  try:
    exec(compile("raise OSError(27, 'File too large')", f"{os.sep}site{os.sep}orbax{os.sep}write.py", "exec"))
  except OSError:
    orbax_exc = sys.exc_info()
  try:
    raise OSError(27, "File too large")
  except OSError:
    own_exc = sys.exc_info()
  never = "Task exception was never retrieved\nfuture: <Task finished name='Task-7' coro=<write()>>"
  assert not keep(record(never, orbax_exc))
  assert not keep(record(never + f" defined at {os.sep}x{os.sep}orbax{os.sep}a.py"))
  assert keep(record(never, own_exc)) and keep(record("another message", orbax_exc))


TWICE = textwrap.dedent("""
    import atexit, os, signal, sys, time
    from l2jax import launch as L
    def second_ctrl_c():   # pressed again while the interpreter shuts down
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(2)
    atexit.register(second_ctrl_c)
    def run(*a, **k):       # the first Ctrl-C, during the run
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
    L.launch = run
    L._exit(L.main(["experiments/pretrain.py:tiny"]))
    """)


def test_ctrl_c_twice_exits_130_with_one_line(tmp_path):
  p = subprocess.run([sys.executable, "-c", TWICE], cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), capture_output=True,
                     text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert p.returncode == 130, p.stderr
  assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
  assert [l for l in p.stderr.splitlines() if l.strip()] == [
      "interrupted (Ctrl-C): stopping; rerun the same command to resume"], p.stderr


@pytest.mark.slow
def test_ctrl_c_pressed_repeatedly_during_training(tmp_path):
  """A real run: SIGINT, then more every 20 ms until it is gone; exit 130, one line, and the run directory with
  its metrics survives for the rerun."""
  d = tmp_path / "run"
  p = subprocess.Popen(_cmd(d, 3000, 1000, "--set", "log_every=20"), cwd=ROOT, env=_env(), text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  t0 = time.time()
  while not ((d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_size) and time.time() - t0 < 300:
    time.sleep(0.1)
  for _ in range(100):
    if p.poll() is not None:
      break
    p.send_signal(signal.SIGINT)
    time.sleep(0.02)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  assert err.count("interrupted (Ctrl-C)") == 1 and (d / "config.json").is_file(), err[-3000:]
