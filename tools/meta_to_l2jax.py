#!/usr/bin/env python
"""Convert a Meta Llama 2 checkpoint (consolidated.NN.pth + params.json) into an l2jax model directory.

  python tools/meta_to_l2jax.py META_DIR CKPT_DIR [--tokenizer PATH] [--dtype bfloat16] [--max-seq-len 4096]
Needs torch (pip install 'l2jax[torch]'); shards are read with torch.load(weights_only=True, mmap=True).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("meta_dir", metavar="META_DIR", help="params.json + consolidated.00.pth [... .NN.pth]")
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="output l2jax model directory (must not exist or be empty)")
  p.add_argument("--tokenizer", help="tokenizer.model to include (default: META_DIR/ or its parent's tokenizer.model)")
  p.add_argument("--dtype", choices=DTYPES, help="stored parameter dtype (default: the checkpoint's)")
  p.add_argument("--compute-dtype", choices=DTYPES,
                 help="config dtype for activations (default: the stored parameter dtype, so a float32 "
                      "checkpoint reproduces its float32 reference)")
  p.add_argument("--max-seq-len", type=int, default=4096, help="context length (not in params.json; Llama 2: 4096)")
  a = p.parse_args(argv)
  from l2jax.convert import ConversionError
  from l2jax.convert.meta import meta_to_l2jax
  try:
    out = meta_to_l2jax(a.meta_dir, a.ckpt_dir, tokenizer=a.tokenizer, dtype=a.dtype,
                        compute_dtype=a.compute_dtype, max_seq_len=a.max_seq_len)
  except (ConversionError, OSError) as e:  # OSError: unreadable input, full or read-only output
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
