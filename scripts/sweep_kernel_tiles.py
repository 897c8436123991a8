"""Times the attention kernels over a grid of tile sizes on one GPU, to choose their defaults.

  python scripts/sweep_kernel_tiles.py --out "$OUT/sweep"          # verify + prefix, S=32k, B=1,8
  python scripts/sweep_kernel_tiles.py --patterns decode --keys 8192 --batches 1

Each (shape, kernel, BlockSizes) is checked against the fp32 reference and timed exactly as
scripts/bench_attention.py does (same inputs, same L2-defeating buffer rotation, medians); a tiling
that does not fit (shared memory, shape constraints) becomes a row with its error. The table is
sorted per shape by time and the fraction of the measured copy bandwidth is printed, so the best
tiling per shape class can be copied into the kernel's `BlockSizes` defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # pylint: disable=g-import-not-at-top,wrong-import-position
from dllm_jax.atomic_files import write_text_atomic  # pylint: disable=wrong-import-position


def pallas_grid():
  from dllm_jax.kernels import flash_attention_mgpu as m  # pylint: disable=g-import-not-at-top
  for rows, kv, stages in itertools.product((64, 128), (64, 128), (2, 3, 4)):
    yield m.BlockSizes(block_rows=rows, block_kv=kv, stages=stages), m.flash_attention


def triton_grid():
  from dllm_jax.kernels import decode_attention_triton as t  # pylint: disable=g-import-not-at-top
  for rows, kv, warps in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
    yield (t.BlockSizes(block_rows=rows, block_kv=kv, num_warps=warps), t.decode_attention)


GRIDS = {"pallas": pallas_grid, "triton": triton_grid}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", nargs="*", default=list(GRIDS), choices=list(GRIDS))
  p.add_argument("--patterns", nargs="*", default=["verify", "prefix"],
                 choices=["verify", "prefix", "decode"])
  p.add_argument("--keys", nargs="*", type=int, default=[32768], help="cached keys S")
  p.add_argument("--batches", nargs="*", type=int, default=[1, 8])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", type=pathlib.Path, help="folder for sweep.json and sweep.md")
  args = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("sweep_kernel_tiles.py needs a CUDA GPU (the kernels are timed compiled)",
          file=sys.stderr)
    return 2
  dtype = jnp.bfloat16
  _, peak_bw = ba.measured_peaks(False, dtype)
  print(f"device {jax.devices()[0].device_kind}, measured copy bandwidth {peak_bw / 1e9:.0f} GB/s")
  rows = []
  for name, s, b in itertools.product(args.patterns, args.keys, args.batches):
    shape = ba.Shape(name, b, 1 if name == "decode" else 32, s, 32, 8, 128)
    kv_bytes = 2 * b * s * 8 * 128 * 2
    q, kvs, kw = ba.make_inputs(shape, dtype, max(1, math.ceil(4 * ba.L2_BYTES / kv_bytes)))
    for kernel in args.kernels:
      for bs, fn in GRIDS[kernel]():
        row = dict(pattern=name, batch=b, keys=s, kernel=kernel, **dataclasses.asdict(bs))
        call = functools.partial(fn, mask=shape.mask, block_sizes=bs)
        try:
          row["max_err"] = ba.check(call, shape, q, *kvs[0], kw)
          sec = ba.time_call(call, q, kvs, kw, reps=args.reps, iters=args.iters)
          row.update(us=sec * 1e6, pct_bw=100 * shape.bytes(2) / sec / peak_bw)
        except Exception as e:  # pylint: disable=broad-except  (one row, not the whole sweep)
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
          args.out.mkdir(parents=True, exist_ok=True)
          write_text_atomic(args.out / "sweep.json", json.dumps(rows, indent=1))
  lines = ["| pattern | B | S | kernel | tiling | µs | %BW | max err |", "|---" * 8 + "|"]
  key = lambda r: (r["pattern"], r["batch"], r["keys"], r.get("us", math.inf))
  for r in sorted(rows, key=key):
    tiling = ",".join(f"{k}={v}" for k, v in r.items() if k in (
        "block_rows", "block_kv", "stages", "num_warps"))
    tail = (f"{r['us']:.1f} | {r['pct_bw']:.0f}% | {r['max_err']:.1e}" if "us" in r
            else f"{r['error']} | |")
    lines.append(f"| {r['pattern']} | {r['batch']} | {r['keys']} | {r['kernel']} | {tiling} | "
                 f"{tail} |")
  print("\n".join(lines))
  if args.out:
    write_text_atomic(args.out / "sweep.md", "\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
