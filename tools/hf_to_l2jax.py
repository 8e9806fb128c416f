#!/usr/bin/env python
"""Convert a Hugging Face Llama checkpoint (safetensors, single or sharded) into an l2jax model directory.

  python tools/hf_to_l2jax.py HF_DIR CKPT_DIR [--tokenizer PATH] [--dtype bfloat16] [--compute-dtype DTYPE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("hf_dir", metavar="HF_DIR", help="config.json + model.safetensors (or shards + index json)")
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="output l2jax model directory (must not exist or be empty)")
  p.add_argument("--tokenizer", help="SentencePiece tokenizer.model to include (default: HF_DIR/tokenizer.model)")
  p.add_argument("--dtype", choices=DTYPES, help="stored parameter dtype (default: the checkpoint's)")
  p.add_argument("--compute-dtype", choices=DTYPES,
                 help="config dtype for activations (default: the stored parameter dtype, so a float32 "
                      "checkpoint reproduces its float32 reference)")
  a = p.parse_args(argv)
  from l2jax.convert import ConversionError
  from l2jax.convert.hf import hf_to_l2jax
  try:
    out = hf_to_l2jax(a.hf_dir, a.ckpt_dir, tokenizer=a.tokenizer, dtype=a.dtype, compute_dtype=a.compute_dtype)
  except (ConversionError, OSError) as e:  # OSError: unreadable input, full or read-only output
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
