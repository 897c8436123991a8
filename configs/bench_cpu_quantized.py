"""The CPU benchmark's AR and block-diffusion cases with int8 and fp8 copies of each model beside
the float32 one, in one run (docs/quantization.md, docs/benchmarks.md):

  python scripts/bench.py --config=configs/bench_cpu_quantized.py --json=bench_cpu_quantized.json
"""

import pathlib
import runpy

import ml_collections

_cpu = runpy.run_path(str(pathlib.Path(__file__).with_name("bench_cpu.py")))


def get_config() -> ml_collections.ConfigDict:
  c = _cpu["get_config"]()
  c.quantize = ("int8", "fp8")
  c.ar = dict(models=("nld-100m", "smollm2"), batch_sizes=(1,), max_new_tokens=64)
  c.diffusion = dict(models=("nld-100m",), batch_sizes=(1,), max_new_tokens=64, block_length=32,
                     thresholds=(0.9,))
  c.spec = dict(models=(), batch_sizes=(1,), max_new_tokens=32, block_length=32, threshold=0.0,
                lora_rank=128)
  return c
