"""Converts an HF NLD (or Llama-family) directory into an orbax directory that loads onto any mesh.

  python scripts/convert_checkpoint.py --hf=Nemotron-Labs-Diffusion-8B --out=nld-8b-orbax
  python -c "import dllm_jax; dllm_jax.load('nld-8b-orbax')"
  python scripts/convert_checkpoint.py --hf=Nemotron-Labs-Diffusion-14B --out=nld-14b-int8 --quantize=int8

Tensors stream one at a time from the safetensors files (progress bar per tensor) into the params,
which orbax then writes. With --quantize, every linear kernel is quantized (int8 or fp8 with
per-output-channel scales, docs/quantization.md) as it streams in, so the model never exists in
bf16 as a whole, and the directory stores the quantized values and their scales. The output appears
only when complete; bad input and storage failures (a full disk, a concurrent conversion to the
same --out) exit with code 2 and a one-line message, leaving nothing behind. Tensors holding NaN or
Inf are refused unless --allow_nonfinite.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import sys
import time

import jax.numpy as jnp

from dllm_jax.checkpoint import CheckpointError, load_pretrained, save_converted
from dllm_jax.model import param_count

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
  p.add_argument("--out", required=True, help="output directory (must not exist)")
  p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                 help="stored parameter dtype (the draft LoRA always stays float32)")
  p.add_argument("--no-lora", action="store_true", help="skip linear_spec_lora/ even if present")
  p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                 help="store the linear kernels quantized (weight-only, per-output-channel "
                      "scales); embedding, norms and the draft LoRA keep their dtypes")
  p.add_argument("--allow_nonfinite", action="store_true",
                 help="convert tensors holding NaN or Inf instead of refusing them")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if Path(args.out).exists():  # fail before the (long) load, not after it
    print(f"error: {args.out}: already exists (remove it first)", file=sys.stderr)
    return 2
  # orbax logs each failed write with a traceback; the failure is reported below in one line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  t0 = time.perf_counter()
  try:
    pre = load_pretrained(args.hf, dtype=DTYPES[args.dtype], lora=not args.no_lora, progress=True,
                          allow_nonfinite=args.allow_nonfinite, quantize=args.quantize)
    t1 = time.perf_counter()
    out = save_converted(pre, args.out)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  t2 = time.perf_counter()
  lora = f", draft LoRA r={pre.lora.rank} alpha={pre.lora.alpha:g}" if pre.lora else ""
  kind = f"{args.quantize} linear kernels, {args.dtype} others" if args.quantize else args.dtype
  print(f"wrote {out} ({param_count(pre.config) / 1e9:.3f} B params, {kind}{lora}); "
        f"load {t1 - t0:.1f} s, save {t2 - t1:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
