r"""Compile time of the decoding programs at full model size, without allocating a weight.

  python scripts/bench_compile.py                        # nld-8b and nld-14b, all three modes
  python scripts/bench_compile.py --presets=tiny --modes=ar --json=out.json

The model is abstract (shapes only), so the 8B and 14B programs are lowered and compiled for the
host's backend (XLA:CPU here) on any machine; the numbers measure how compile time grows with the
per-layer program, not GPU compile time. Prints one row per (preset, mode, program): seconds to
lower, seconds to compile, and the compiled program's temporary memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from dllm_jax.atomic_files import write_text_atomic
from dllm_jax.config import preset
from dllm_jax.decode import lower_programs, settings_for
from dllm_jax.model import abstract_model

PROGRAMS = ("prefill", "decode")


def measure(name: str, mode: str, *, prompt: int, new_tokens: int, block: int, dtype: str
            ) -> list[dict]:
  cfg = preset(name)
  model = abstract_model(cfg, dtype=jnp.dtype(dtype))
  start = time.perf_counter()
  lowered = lower_programs(model, 1, prompt,
                           settings_for(mode, skip_other_modes=True, max_new_tokens=new_tokens,
                                        block_length=block))
  lower_s = time.perf_counter() - start
  rows = []
  for program in PROGRAMS:
    start = time.perf_counter()
    compiled = lowered[program].compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(dict(preset=name, layers=cfg.num_layers, mode=mode, program=program,
                     lower_s=round(lower_s, 2), compile_s=round(compile_s, 2),
                     temp_mb=round(temp / 2**20, 1)))
    print(rows[-1], file=sys.stderr, flush=True)
  return rows


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="nld-8b,nld-14b")
  parser.add_argument("--modes", default="ar,diffusion,spec")
  parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (one row)")
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--block", type=int, default=32)
  # XLA:CPU has no bf16 matmul: a bf16 program compiled for the CPU converts weights to fp32 (its
  # temporaries then hold fp32 copies), which the GPU program never does. fp32 is the CPU default.
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args(argv[1:])
  try:
    rows = [row for name in args.presets.split(",") for mode in args.modes.split(",")
            for row in measure(name, mode, prompt=args.prompt, new_tokens=args.new_tokens,
                               block=args.block, dtype=args.dtype)]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  header = list(rows[0])
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(str(row[k]) for k in header) + " |")
  print(f"backend {jax.default_backend()}, jax {jax.__version__}")
  if args.json:
    write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
