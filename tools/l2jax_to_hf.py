#!/usr/bin/env python
"""Export an l2jax model directory as a Hugging Face LlamaForCausalLM directory (safetensors + config.json).

  python tools/l2jax_to_hf.py CKPT_DIR HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
The result loads with transformers.LlamaForCausalLM.from_pretrained(HF_DIR).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="l2jax model directory (params/, config.json, tokenizer.model)")
  p.add_argument("hf_dir", metavar="HF_DIR", help="output directory (must not exist or be empty)")
  p.add_argument("--dtype", choices=DTYPES, help="safetensors dtype (default: the stored parameter dtype)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="split into model-0000K-of-0000N.safetensors + index above this size (default 5GB)")
  a = p.parse_args(argv)
  from l2jax.convert import ConversionError
  from l2jax.convert.hf import l2jax_to_hf
  try:
    out = l2jax_to_hf(a.ckpt_dir, a.hf_dir, dtype=a.dtype, max_shard_size=a.max_shard_size)
  except (ConversionError, OSError, ValueError) as e:  # OSError: unreadable input, full or read-only output
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
