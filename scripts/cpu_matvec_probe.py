"""How fast can XLA:CPU run batch-1 decoding's products? Times one program of SmolLM2-shaped MLP
matrix-vector products (30 layers, 576 -> 2x1536 -> 576, fp32, ~320 MB of weights, so the step is
bound by memory like a real decode step) written six ways, in one process: does a second core get
to work, and what do int8 kernels buy?

  one dot          gate/up as one 576 x 3072 product, down as one 1536 x 576 product
  column halves    each product as two independent dots over halves of its output columns
  row halves       each product as two dots over halves of its input rows, summed
  2 devices (TP)   the MLP sharded over two host CPU devices (Megatron column/row split with
                   shard_map, one all-reduce per layer), which XLA runs on separate threads
  int8 weights     the same products with int8 kernels and per-output-channel scales
                   (dllm_jax.quantize), multiplied as the library's `quantize="int8"` forward does
                   it (dllm_jax.quantize.quantized_matmul: kernel converted to float32, then the dot)
  int8 x int8      the int8 kernels times activations quantized to int8 per row on the fly
                   (absmax / 127), int32 accumulation, both scales applied to the output: the
                   arithmetic of llama.cpp's Q8_0 products, not something the library does

python scripts/cpu_matvec_probe.py [--repeats=20] [--layers=30]
taskset -c 0 python scripts/cpu_matvec_probe.py   # the same with one core

Prints a table of median milliseconds per step, each variant's weight bytes and the bytes read per
second, and each variant's speed relative to "one dot". docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import os
import time

# Two host devices for the tensor-parallel row; set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_utils as bu  # pylint: disable=g-import-not-at-top,wrong-import-position
from dllm_jax import quantize as qz  # pylint: disable=g-import-not-at-top,wrong-import-position

HIDDEN, INTER = 576, 1536


def _swiglu(gu):
  h = gu.shape[-1] // 2
  return jax.nn.silu(gu[..., :h]) * gu[..., h:]


# Each variant takes its weights already laid out as it needs them, one buffer per layer and
# piece (as the engine stores them), so no program slices or concatenates weights.

def one_dot(x, layers):
  for w_gu, w_d in layers:
    x = x + _swiglu(x @ w_gu) @ w_d
  return x


def column_halves(x, layers):
  for (gu_a, gu_b), (d_a, d_b) in layers:
    act = jnp.concatenate([_swiglu(x @ gu_a), _swiglu(x @ gu_b)], axis=-1)
    x = x + jnp.concatenate([act @ d_a, act @ d_b], axis=-1)
  return x


def row_halves(x, layers):
  hh, hi = HIDDEN // 2, INTER // 2
  for (gu_a, gu_b), (d_a, d_b) in layers:
    act = _swiglu(x[..., :hh] @ gu_a + x[..., hh:] @ gu_b)
    x = x + act[..., :hi] @ d_a + act[..., hi:] @ d_b
  return x


def tensor_parallel(mesh, n_layers):
  def body(x, layers):
    # Per device: its halves of the gate and up columns, its rows of down, one all-reduce.
    for w_gu, w_d in layers:
      x = x + jax.lax.psum(_swiglu(x @ w_gu) @ w_d, "model")
    return x
  specs = [(P(None, "model"), P("model", None))] * n_layers
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), specs), out_specs=P())


def int8_weights(x, layers):
  for (gu, gu_scale), (d, d_scale) in layers:
    act = _swiglu(qz.quantized_matmul(x, gu, gu_scale, jnp.float32))
    x = x + qz.quantized_matmul(act, d, d_scale, jnp.float32)
  return x


def _int8_product(x, values, scale):
  """x [1, in] float32 quantized per row to int8, times int8 `values` [in, out] in int32."""
  x_scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) / 127
  xq = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
  acc = jax.lax.dot(xq, values, preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * x_scale * scale


def int8_x_int8(x, layers):
  for (gu, gu_scale), (d, d_scale) in layers:
    x = x + _int8_product(_swiglu(_int8_product(x, gu, gu_scale)), d, d_scale)
  return x


def _layouts(w_gu, w_d):
  """The weights of every variant, from one layer's gate|up (HIDDEN x 2 INTER) and down."""
  h = INTER // 2
  gate, up = w_gu[:, :INTER], w_gu[:, INTER:]
  # Half i of the columns holds half i of gate and half i of up, so each half-product (and each
  # tensor-parallel device) yields its own SwiGLU input.
  halves = [np.concatenate([gate[:, :h], up[:, :h]], 1), np.concatenate([gate[:, h:], up[:, h:]], 1)]
  cols = ((halves[0], halves[1]), (w_d[:, :HIDDEN // 2], w_d[:, HIDDEN // 2:]))
  rows = ((w_gu[:HIDDEN // 2], w_gu[HIDDEN // 2:]), (w_d[:h], w_d[h:]))
  return (w_gu, w_d), cols, rows, (np.concatenate(halves, 1), w_d)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  if args.layers < 1 or args.repeats < 1:
    p.error("--layers and --repeats must be >= 1")

  rng = np.random.default_rng(0)
  per_layer = [_layouts(rng.standard_normal((HIDDEN, 2 * INTER), np.float32) * 0.02,
                        rng.standard_normal((INTER, HIDDEN), np.float32) * 0.02)
               for _ in range(args.layers)]
  x = jnp.asarray(rng.standard_normal((1, HIDDEN), np.float32))
  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
  col, row = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P("model", None))
  tp = [(jax.device_put(gu, col), jax.device_put(d, row)) for *_, (gu, d) in per_layer]
  layout = lambda k: jax.tree.map(jnp.asarray, [l[k] for l in per_layer])
  base = ("one dot", jax.jit(one_dot), (x, layout(0)))
  splits = [("column halves", jax.jit(column_halves), (x, layout(1))),
            ("row halves", jax.jit(row_halves), (x, layout(2))),
            ("2 devices (TP)", jax.jit(tensor_parallel(mesh, args.layers)),
             (jax.device_put(x, NamedSharding(mesh, P())), tp))]
  int8 = [tuple(qz.quantize_kernel(jnp.asarray(w), "int8") for w in l[0]) for l in per_layer]
  int8_variants = [("int8 weights", jax.jit(int8_weights), (x, int8)),
                   ("int8 x int8", jax.jit(int8_x_int8), (x, int8))]
  variants = [base, *splits, *int8_variants]

  reference = np.asarray(base[1](*base[2]))
  for name, fn, a in splits:
    # The variants compute the same function; a wrong split must not be timed as a speed-up.
    np.testing.assert_allclose(np.asarray(fn(*a)), reference, rtol=2e-4, atol=2e-4,
                               err_msg=name)
  # The int8 rows round the weights (and activations) to 8 bits: within a few percent of the
  # float32 result, where a wrong scale or layout is off by its whole size.
  for name, fn, a in int8_variants:
    err = np.max(np.abs(np.asarray(fn(*a)) - reference)) / np.max(np.abs(reference))
    assert err < 0.05, f"{name}: relative error {err:.3g} against float32"

  times = {name: [] for name, _, _ in variants}
  for _ in range(args.repeats):
    # Interleaved so that load changes on a shared machine hit every variant alike.
    for name, fn, a in variants:
      start = time.perf_counter()
      fn(*a).block_until_ready()
      times[name].append(time.perf_counter() - start)

  print(bu.run_header(layers=args.layers, repeats=args.repeats))
  base_s = bu.median(times["one dot"])
  rows = []
  for name, _, a in variants:
    weight_bytes = sum(w.nbytes for w in jax.tree.leaves(a[1]))
    t = bu.median(times[name])
    rows.append({"variant": name, "mb": weight_bytes / 1e6, "ms": 1e3 * t,
                 "gbps": weight_bytes / t / 1e9, "ratio": base_s / t})
  print(bu.format_table(rows, [("variant", "variant"), ("mb", "weights MB"),
                               ("ms", "ms / step (median)"), ("gbps", "GB/s"),
                               ("ratio", "vs one dot")]))


if __name__ == "__main__":
  main()
