"""Checks and times every attention implementation on NLD's attention shapes.

GPU (the real benchmark; 32 q heads / 8 kv heads / head_dim 128, bf16):
  python scripts/bench_attention.py --out "$OUT/bench"
CPU (tiny shapes, kernels in interpret mode; keeps the script from rotting):
  python scripts/bench_attention.py --smoke

For each shape (prefill 4k/16k causal; a 32-query block, verify-causal and prefix, against 1k/8k/32k
cached keys; single-token decode against 8k/32k; batch 1 and 8) and each implementation
(dispatcher: xla, pallas, triton, cudnn; baselines: jax.nn.dot_product_attention with
implementation "xla" and "cudnn"), the script
  * checks the output against the fp32 XLA reference on random normal inputs (never zeros), on the
    last <= 64 queries of batch row 0, where the reference stays small;
  * times it: median over repetitions of the wall time of many back-to-back calls, each call
    cycling through enough distinct K/V buffers (>= 4x the 50 MB L2) that HBM, not L2, is timed;
  * prints µs, TFLOP/s, GB/s (K/V visible to the call + Q + O) and the fraction of the device's
    measured peaks (a bf16 matmul for FLOP/s, a large elementwise copy for HBM bandwidth).
The last line gives the fastest correct dispatcher impl per shape class, in the format of
`kernels/attention_choices.MEASURED`. The exit status is 1 if any output misses the error bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import attention as attn_lib
from dllm_jax.atomic_files import write_text_atomic
from dllm_jax.kernels import attention_choices

DISPATCH_IMPLS = ("xla", "pallas", "triton", "cudnn")
BASELINES = ("jax.nn-xla", "jax.nn-cudnn")
L2_BYTES = 50 * 2**20


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str  # prefill | verify | prefix | decode
  batch: int
  queries: int  # T
  keys: int  # cache slots S (prefill: S = T)
  heads: int
  kv_heads: int
  head_dim: int

  @property
  def mask(self) -> str:
    return "prefix" if self.name == "prefix" else "causal"

  @property
  def visible_keys(self) -> float:
    """Mean keys a query sees (the work actually required)."""
    if self.name == "prefill":
      return (self.keys + 1) / 2
    if self.name == "prefix":
      return self.keys  # keys - T cached slots + the T block keys
    return self.keys - (self.queries - 1) / 2

  def flops(self) -> float:
    return 4.0 * self.batch * self.heads * self.queries * self.visible_keys * self.head_dim

  def bytes(self, itemsize: int) -> float:
    kv = 2 * self.batch * self.keys * self.kv_heads * self.head_dim
    qo = 2 * self.batch * self.queries * self.heads * self.head_dim
    return float(kv + qo) * itemsize


def shapes(smoke: bool) -> list[Shape]:
  if smoke:
    h, g, d = 4, 2, 32
    return [Shape("prefill", 1, 64, 64, h, g, d), Shape("verify", 2, 32, 128, h, g, d),
            Shape("prefix", 2, 32, 128, h, g, d), Shape("decode", 2, 1, 128, h, g, d)]
  h, g, d = 32, 8, 128
  out = []
  for b in (1, 8):
    out += [Shape("prefill", b, s, s, h, g, d) for s in (4096, 16384)]
    out += [Shape(p, b, 32, s, h, g, d) for p in ("verify", "prefix") for s in (1024, 8192, 32768)]
    out += [Shape("decode", b, 1, s, h, g, d) for s in (8192, 32768)]
  return out


def make_inputs(shape: Shape, dtype, n_buf: int, seed: int = 0):
  """q, list of (k, v) buffers and the mask keywords; lengths fill the cache (the largest case)."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
  b, t, s = shape.batch, shape.queries, shape.keys
  q = normal(b, t, shape.heads, shape.head_dim)
  kvs = [(normal(b, s, shape.kv_heads, shape.head_dim), normal(b, s, shape.kv_heads,
                                                                shape.head_dim))
         for _ in range(n_buf)]
  if shape.name == "prefill":
    kw = {}
  elif shape.name == "prefix":
    kw = {"kv_len": jnp.full((b,), s - t, jnp.int32),
          "block_k": normal(b, t, shape.kv_heads, shape.head_dim),
          "block_v": normal(b, t, shape.kv_heads, shape.head_dim)}
  else:
    kw = {"q_offset": jnp.full((b,), s - t, jnp.int32)}
  return q, kvs, kw


def jax_nn(q, k, v, *, shape: Shape, implementation: str, q_offset=None, kv_len=None,
           block_k=None, block_v=None):
  """The best jax.nn.dot_product_attention formulation of each pattern (is_causal is top-left)."""
  kw = dict(implementation=implementation)
  b, t = q.shape[:2]
  if shape.name == "prefill":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, **kw)
  if shape.name == "decode":
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=q_offset + 1, **kw)
  if shape.name == "prefix":
    k, v = jnp.concatenate([k, block_k], 1), jnp.concatenate([v, block_v], 1)
    m = jnp.concatenate([attn_lib.prefix_mask(kv_len, t, k.shape[1] - t),
                         jnp.ones((b, t, t), bool)], -1)
  else:
    m = attn_lib.causal_mask(q_offset, t, k.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], **kw)


def impl_fn(impl: str, shape: Shape):
  if impl in DISPATCH_IMPLS:
    return functools.partial(attn_lib.attention, mask=shape.mask, impl=impl)
  return functools.partial(jax_nn, shape=shape, implementation=impl.split("-")[1])


def check(fn, shape: Shape, q, k, v, kw) -> float:
  """Max abs error vs the fp32 reference over the last <= 64 queries of batch row 0."""
  out = np.asarray(jax.jit(fn)(q, k, v, **kw), np.float32)
  n = min(shape.queries, 64)
  sub = lambda x: None if x is None else jnp.asarray(x[:1], jnp.float32)
  ref_kw = {name: (x[:1] if x.dtype == jnp.int32 else sub(x)) for name, x in kw.items()}
  if shape.name in ("prefill", "verify", "decode"):
    base = ref_kw.get("q_offset", jnp.zeros((1,), jnp.int32))
    ref_kw["q_offset"] = base + (shape.queries - n)
    q_sub = sub(q)[:, shape.queries - n:]
    want = attn_lib.attention_reference(q_sub, sub(k), sub(v), mask="causal", **ref_kw)
  else:
    want = attn_lib.attention_reference(sub(q), sub(k), sub(v), mask="prefix", **ref_kw)
  return float(np.max(np.abs(out[:1, shape.queries - n:] - np.asarray(want))))


def time_call(fn, q, kvs, kw, reps: int, iters: int, warmup: int = 3) -> float:
  """Median seconds per attention call; one jitted call runs all K/V buffers back to back."""
  @jax.jit
  def many(q, kvs, kw):
    return [fn(q, k, v, **kw) for k, v in kvs]

  for _ in range(warmup):  # the first call compiles
    jax.block_until_ready(many(q, kvs, kw))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = many(q, kvs, kw)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / (iters * len(kvs)))
  return statistics.median(times)


def measured_peaks(smoke: bool, dtype) -> tuple[float, float]:
  """(matmul FLOP/s, HBM bytes/s) measured on this device with plain XLA ops."""
  n = 256 if smoke else 8192
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), dtype)
  t_mm = time_call(lambda q, k, v: q @ k, a, [(a, a)], {}, reps=3, iters=3 if smoke else 20)
  m = (2**20 if smoke else 2**30) // jnp.dtype(dtype).itemsize
  x = jnp.ones((m,), dtype) * 1.5
  t_bw = time_call(lambda q, k, v: k * 2, x, [(x, x)], {}, reps=3, iters=3 if smoke else 20)
  return 2.0 * n**3 / t_mm, 2.0 * m * jnp.dtype(dtype).itemsize / t_bw


def unavailable(impl: str, shape: Shape, dtype) -> str | None:
  """Why an impl cannot run here (None if it can); keeps one failure from ending the run."""
  on_gpu = jax.default_backend() == "gpu"
  if "cudnn" in impl and not on_gpu:
    return "needs cuDNN"
  if impl == "triton":
    if not on_gpu:
      return "needs CUDA"
    try:
      import jax_triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      return "jax_triton missing"
  xla_like = impl in ("xla", "jax.nn-xla")
  logits = shape.batch * shape.heads * shape.queries * shape.keys * 4
  if xla_like and logits > 8 * 2**30:
    return "logits > 8 GiB"
  return None


def run(args, env: dict) -> list[dict]:
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  if args.smoke and jax.default_backend() != "gpu":
    os.environ[attn_lib.KERNEL_INTERPRET_ENV] = "1"  # the Pallas kernel in interpret mode
  peak_flops, peak_bw = measured_peaks(args.smoke, dtype)
  print(f"measured peaks: {peak_flops / 1e12:.1f} TFLOP/s matmul, {peak_bw / 1e9:.0f} GB/s copy")
  print(HEADER)
  impls = args.impls or DISPATCH_IMPLS + BASELINES
  rows = []
  for shape in shapes(args.smoke):
    if ((args.patterns and shape.name not in args.patterns)
        or (args.batches and shape.batch not in args.batches)):
      continue
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * shape.batch * shape.keys * shape.kv_heads * shape.head_dim * itemsize
    n_buf = 1 if args.smoke else int(min(16, max(1, math.ceil(4 * L2_BYTES / kv_bytes))))
    q, kvs, kw = make_inputs(shape, dtype, n_buf)
    for impl in impls:
      row = dict(dataclasses.asdict(shape), impl=impl)
      reason = unavailable(impl, shape, dtype)
      if reason is None:
        try:
          fn = impl_fn(impl, shape)
          row["max_err"] = check(fn, shape, q, *kvs[0], kw)
          sec = time_call(fn, q, kvs, kw, reps=args.reps, iters=args.iters,
                          warmup=1 if args.smoke else 3)
          row.update(us=sec * 1e6, tflops=shape.flops() / sec / 1e12,
                     gbps=shape.bytes(itemsize) / sec / 1e9)
          row.update(pct_bw=100 * row["gbps"] * 1e9 / peak_bw,
                     pct_flops=100 * row["tflops"] * 1e12 / peak_flops)
        except Exception as e:  # pylint: disable=broad-except  (one row, not the whole run)
          reason = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
      if reason is not None:
        row["skipped"] = reason
      rows.append(row)
      print(format_row(row), flush=True)
      if args.out:  # after every row, so a run cut short still leaves its table
        write_results(args.out, env, rows, winners(rows, tolerance(args)))
  return rows


HEADER = ("| pattern | B | T | S | impl | µs | TFLOP/s | GB/s | %peak BW | %peak FLOP "
          "| max err |\n" + "|---" * 11 + "|")


def format_row(r: dict) -> str:
  head = f"| {r['name']} | {r['batch']} | {r['queries']} | {r['keys']} | {r['impl']} |"
  if "skipped" in r:
    return head + f" {r['skipped']} | | | | | |"
  return head + (f" {r['us']:.1f} | {r['tflops']:.2f} | {r['gbps']:.0f} | {r['pct_bw']:.0f}% |"
                 f" {r['pct_flops']:.0f}% | {r['max_err']:.1e} |")


def winners(rows: list[dict], tol: float) -> dict[str, str]:
  """Fastest correct dispatcher impl per shape class, by total time over the class's shapes.

  Only impls that ran correctly on every shape of the class compete.
  """
  total: dict[str, dict[str, list[float]]] = {}
  for r in rows:
    if r["impl"] in DISPATCH_IMPLS:
      ok = "us" in r and r["max_err"] <= tol
      total.setdefault(r["name"], {}).setdefault(r["impl"], []).append(r["us"] if ok else math.inf)
  best = {}
  for cls, by_impl in total.items():
    sums = {impl: sum(times) for impl, times in by_impl.items()}
    impl = min(sums, key=sums.get)
    if math.isfinite(sums[impl]):
      best[cls] = impl
  return best


def tolerance(args) -> float:
  return 1e-4 if args.smoke else 3e-2


def write_results(out: pathlib.Path, env: dict, rows: list[dict], best: dict[str, str]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  write_text_atomic(out / "results.json",
                    json.dumps(dict(env=env, rows=rows, winners=best), indent=1))
  write_text_atomic(out / "results.md", "\n".join(
      [" ".join(f"{k}={v}" for k, v in env.items()), "", HEADER]
      + [format_row(r) for r in rows] + ["", f"winners: {best!r}"]) + "\n")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes (CPU: kernels in interpret mode)")
  p.add_argument("--impls", nargs="*", help=f"subset of {DISPATCH_IMPLS + BASELINES}")
  p.add_argument("--patterns", nargs="*", help="subset of prefill verify prefix decode")
  p.add_argument("--batches", nargs="*", type=int, help="subset of the batch sizes (1 8)")
  p.add_argument("--reps", type=int, default=None, help="timing repetitions (median reported)")
  p.add_argument("--iters", type=int, default=None, help="calls per repetition")
  p.add_argument("--out", type=pathlib.Path, help="folder for results.md and results.json")
  args = p.parse_args(argv)
  args.reps = args.reps or (1 if args.smoke else 7)
  args.iters = args.iters or (1 if args.smoke else 20)
  device = jax.devices()[0]
  env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
             device_kind=device.device_kind, platform=device.platform, jax=jax.__version__)
  print(" ".join(f"{k}={v}" for k, v in env.items()))
  rows = run(args, env)
  tol = tolerance(args)
  best = winners(rows, tol)
  print(f"\nfastest correct impl per shape class (kernels/attention_choices.MEASURED):\n"
        f"{device.device_kind!r}: {best!r},")
  bad = [r for r in rows if "max_err" in r and r["max_err"] > tol]
  if bad:
    print(f"{len(bad)} rows exceed the error bound {tol}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
