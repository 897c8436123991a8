"""Decoding benchmark on a CUDA GPU: bf16, batch 1 and 8, plus the 3B/8B roofline section.

  python scripts/bench.py --config=configs/bench_gpu.py --gpu_shapes --json=bench_gpu.json

Needs the [gpu] extra (jax[cuda12]) and a CUDA torch; JAX allocates on demand so that transformers
can share the device in the same run.
"""

import pathlib
import runpy

import ml_collections

_cpu = runpy.run_path(str(pathlib.Path(__file__).with_name("bench_cpu.py")))


def get_config() -> ml_collections.ConfigDict:
  c = _cpu["get_config"]()
  c.repeats = 5
  c.forward_repeats = 20
  c.ar = dict(models=("nld-100m", "smollm2"), batch_sizes=(1, 8), max_new_tokens=256)
  c.diffusion = dict(models=("nld-100m",), batch_sizes=(1, 8), max_new_tokens=256,
                     block_length=32, thresholds=(0.9, 0.0))
  # The PyTorch loop is batch-1 only, as the reference: batch 8 reports the JAX engine alone.
  c.spec = dict(models=("nld-100m",), batch_sizes=(1, 8), max_new_tokens=256, block_length=32,
                threshold=0.0, lora_rank=128)
  c.quadratic = dict(models=("nld-100m",), batch_sizes=(1, 8), max_new_tokens=256,
                     block_length=16)
  return c
