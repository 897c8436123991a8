"""Seconds-long benchmark run on the tiny preset: keeps scripts/bench.py from rotting (CI)."""

import pathlib
import runpy

import ml_collections

_cpu = runpy.run_path(str(pathlib.Path(__file__).with_name("bench_cpu.py")))

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32)


def get_config() -> ml_collections.ConfigDict:
  c = _cpu["get_config"]()
  c.repeats = 1
  c.forward_repeats = 1
  c.prompt_length = 8
  c.model_order = ("tiny",)
  c.models = ml_collections.ConfigDict()
  c.models["tiny"] = dict(source="random", base="tiny", overrides=TINY)
  c.ar = dict(models=("tiny",), batch_sizes=(1,), max_new_tokens=8)
  c.diffusion = dict(models=("tiny",), batch_sizes=(2,), max_new_tokens=16, block_length=8,
                     thresholds=(0.9,))
  c.spec = dict(models=("tiny",), batch_sizes=(1,), max_new_tokens=8, block_length=8,
                threshold=0.0, lora_rank=8)
  # The roofline section's code path, on the CPU at the tiny size (with --gpu_shapes).
  c.roofline = _cpu["roofline_config"]()
  c.roofline.presets = ("tiny",)
  c.roofline.overrides = TINY
  c.roofline.dtype = "float32"
  c.roofline.batch_sizes = (1,)
  c.roofline.context = 16
  c.roofline.block_length = 8
  c.roofline.repeats = 1
  c.roofline.copy_mib = 1
  c.roofline.allow_cpu = True
  return c
