#!/usr/bin/env python
"""Convert a llama2.c legacy (version 0) .bin model and its SentencePiece tokenizer into an l2jax model directory.

  python tools/llama2c_to_l2jax.py MODEL.bin TOKENIZER.model CKPT_DIR [--dtype float32]
e.g. python tools/llama2c_to_l2jax.py data/stories260K/stories260K.bin data/stories260K/tok512.model runs/stories260k
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("model_bin", metavar="MODEL.bin", help="llama2.c legacy export (7-int header, float32 weights)")
  p.add_argument("tokenizer", metavar="TOKENIZER.model", help="its SentencePiece model (e.g. tok512.model)")
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="output l2jax model directory (must not exist or be empty)")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored parameter dtype (file is float32)")
  p.add_argument("--compute-dtype", choices=DTYPES,
                 help="config dtype for activations (default: the stored parameter dtype, so a float32 "
                      "checkpoint reproduces its float32 reference)")
  a = p.parse_args(argv)
  from l2jax.convert import ConversionError
  from l2jax.convert.llama2c import llama2c_to_l2jax
  try:
    out = llama2c_to_l2jax(a.model_bin, a.tokenizer, a.ckpt_dir, dtype=a.dtype, compute_dtype=a.compute_dtype)
  except (ConversionError, OSError) as e:  # OSError: unreadable input, full or read-only output
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
