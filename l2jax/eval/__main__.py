"""`python -m l2jax.eval compare ...`: the evaluation commands (see l2jax/eval/compare.py)."""
from __future__ import annotations

import sys

COMMANDS = {"compare": "l2jax.eval.compare"}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in COMMANDS:
    print(f"usage: python -m l2jax.eval {{{','.join(COMMANDS)}}} ... (-h for help)", file=sys.stderr)
    return 2
  import importlib
  return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
