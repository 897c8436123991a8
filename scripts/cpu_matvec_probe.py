"""Does XLA:CPU put a second core to work on batch-1 decoding? Times one program of SmolLM2-shaped
MLP matrix-vector products (30 layers, 576 -> 2x1536 -> 576, fp32, ~320 MB of weights, so the
step is bound by memory like a real decode step) written four ways, in one process:

  one dot          gate/up as one 576 x 3072 product, down as one 1536 x 576 product
  column halves    each product as two independent dots over halves of its output columns
  row halves       each product as two dots over halves of its input rows, summed
  2 devices (TP)   the MLP sharded over two host CPU devices (Megatron column/row split with
                   shard_map, one all-reduce per layer), which XLA runs on separate threads

python scripts/cpu_matvec_probe.py [--repeats=20] [--layers=30]
taskset -c 0 python scripts/cpu_matvec_probe.py   # the same with one core

Prints a table of median milliseconds per step, the weight bytes read per second and each
variant's speed relative to "one dot". docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Two host devices for the tensor-parallel row; set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

HIDDEN, INTER = 576, 1536


def _mlp(x, w_gu, w_d):
  gu = x @ w_gu
  g, u = gu[..., :w_gu.shape[1] // 2], gu[..., w_gu.shape[1] // 2:]
  return x + (jax.nn.silu(g) * u) @ w_d


def one_dot(x, w_gu, w_d):
  for i in range(w_gu.shape[0]):
    x = _mlp(x, w_gu[i], w_d[i])
  return x


def column_halves(x, w_gu, w_d):
  for i in range(w_gu.shape[0]):
    # Gate and up columns interleaved by half so each half-product yields its own gate and up.
    h = INTER // 2
    a = x @ jnp.concatenate([w_gu[i, :, :h], w_gu[i, :, INTER:INTER + h]], axis=1)
    b = x @ jnp.concatenate([w_gu[i, :, h:INTER], w_gu[i, :, INTER + h:]], axis=1)
    act = jnp.concatenate([jax.nn.silu(a[..., :h]) * a[..., h:],
                           jax.nn.silu(b[..., :h]) * b[..., h:]], axis=-1)
    x = x + jnp.concatenate([act @ w_d[i, :, :HIDDEN // 2], act @ w_d[i, :, HIDDEN // 2:]],
                            axis=-1)
  return x


def row_halves(x, w_gu, w_d):
  for i in range(w_gu.shape[0]):
    hh, hi = HIDDEN // 2, INTER // 2
    gu = x[..., :hh] @ w_gu[i, :hh] + x[..., hh:] @ w_gu[i, hh:]
    act = jax.nn.silu(gu[..., :INTER]) * gu[..., INTER:]
    x = x + act[..., :hi] @ w_d[i, :hi] + act[..., hi:] @ w_d[i, hi:]
  return x


def tensor_parallel(mesh):
  def body(x, w_gu, w_d):
    # Per device: its halves of the gate and up columns, its rows of down, then one all-reduce.
    for i in range(w_gu.shape[0]):
      gu = x @ w_gu[i]
      h = gu.shape[-1] // 2
      x = x + jax.lax.psum((jax.nn.silu(gu[..., :h]) * gu[..., h:]) @ w_d[i], "model")
    return x
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(P(), P(None, None, "model"), P(None, "model", None)),
                       out_specs=P())


def _tp_gate_up(w_gu):
  # Reorders gate/up columns to [gate_0 | up_0 | gate_1 | up_1] so a column split over two
  # devices hands each one matching halves of gate and up.
  h = INTER // 2
  return jnp.concatenate([w_gu[..., :h], w_gu[..., INTER:INTER + h],
                          w_gu[..., h:INTER], w_gu[..., INTER + h:]], axis=-1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  if args.layers < 1 or args.repeats < 1:
    p.error("--layers and --repeats must be >= 1")

  rng = np.random.default_rng(0)
  w_gu = jnp.asarray(rng.standard_normal((args.layers, HIDDEN, 2 * INTER), np.float32) * 0.02)
  w_d = jnp.asarray(rng.standard_normal((args.layers, INTER, HIDDEN), np.float32) * 0.02)
  x = jnp.asarray(rng.standard_normal((1, HIDDEN), np.float32))
  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
  tp_args = (jax.device_put(x, NamedSharding(mesh, P())),
             jax.device_put(_tp_gate_up(w_gu), NamedSharding(mesh, P(None, None, "model"))),
             jax.device_put(w_d, NamedSharding(mesh, P(None, "model", None))))
  variants = [("one dot", jax.jit(one_dot), (x, w_gu, w_d)),
              ("column halves", jax.jit(column_halves), (x, w_gu, w_d)),
              ("row halves", jax.jit(row_halves), (x, w_gu, w_d)),
              ("2 devices (TP)", jax.jit(tensor_parallel(mesh)), tp_args)]

  reference = np.asarray(variants[0][1](*variants[0][2]))
  for name, fn, a in variants[1:]:
    # The variants compute the same function; a wrong split must not be timed as a speed-up.
    np.testing.assert_allclose(np.asarray(fn(*a)), reference, rtol=2e-4, atol=2e-4,
                               err_msg=name)

  times = {name: [] for name, _, _ in variants}
  for _ in range(args.repeats):
    # Interleaved so that load changes on a shared machine hit every variant alike.
    for name, fn, a in variants:
      start = time.perf_counter()
      fn(*a).block_until_ready()
      times[name].append(time.perf_counter() - start)

  weight_bytes = (w_gu.size + w_d.size) * 4
  base = statistics.median(times["one dot"])
  print(f"cpu_count={os.cpu_count()} affinity={len(os.sched_getaffinity(0))} "
        f"layers={args.layers} weights={weight_bytes / 1e6:.0f} MB repeats={args.repeats}")
  print("| variant | ms / step (median) | GB/s | vs one dot |")
  print("|---|---:|---:|---:|")
  for name, _, _ in variants:
    t = statistics.median(times[name])
    print(f"| {name} | {t * 1e3:.2f} | {weight_bytes / t / 1e9:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
  main()
