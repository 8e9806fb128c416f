"""Ctrl-C for the launcher: the first stops the run with one line (its directory kept, a rerun resumes), a later
one exits at once, and the process always ends with exit status 130, never killed by the signal."""
from __future__ import annotations

import os
import signal
import sys


def stop_on_ctrl_c() -> None:
  """First SIGINT: one line, then KeyboardInterrupt (the run stops, its directory kept); any later: exit now."""
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    return   # ignored (a background job) or handled by an embedding program

  def handler(signum, frame):
    if handler.hit:
      os._exit(130)   # cleanup already under way: stop without a traceback from wherever it was
    handler.hit = True
    print("\ninterrupted (Ctrl-C): stopping; rerun the same command to resume", file=sys.stderr, flush=True)
    raise KeyboardInterrupt
  handler.hit = False
  signal.signal(signal.SIGINT, handler)


def exit_with(rc: int) -> None:
  """Exit with `rc`. After a Ctrl-C, the exit handlers run while a further Ctrl-C still means "exit 130 now", and
  the process then leaves without the interpreter's finalization: that resets SIGINT to its default action, so a
  Ctrl-C pressed during it (XLA's threads take a while to wind down) would kill the process by signal instead."""
  if rc == 130:
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  sys.exit(rc)
