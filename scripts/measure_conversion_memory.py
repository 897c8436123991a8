"""Peak host memory and time of checkpoint conversion versus the checkpoint's size.

  python scripts/measure_conversion_memory.py --size-gb=2 --dtype=bfloat16 [--workdir=/tmp/x]
  python scripts/measure_conversion_memory.py --size-gb=4 --quantize=int8

Writes a synthetic NLD-layout HF directory of about `--size-gb` (random weights, a draft LoRA of
rank 128, written tensor by tensor), then runs each phase in a fresh process and reads that
process's peak RSS (VmHWM):
  baseline   import jax + dllm_jax, nothing loaded
  load-hf    load_pretrained(HF dir) on one device (the CPU: the result lives in host memory)
  convert    load_pretrained + save_converted (what scripts/convert_checkpoint.py does)
  restore    load_pretrained(converted orbax dir)
Streaming holds if load-hf and convert peak near baseline + params, i.e. not twice the checkpoint.
With --quantize=int8 (or fp8) the load-hf and convert phases quantize every linear kernel as it
streams in and the converted directory stores the quantized values, so the params, and with them
the peak, should come to about half the bf16 checkpoint plus the same bounded buffers.
Prints a markdown table for docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PHASES = ("baseline", "load-hf", "convert", "restore")
NP_DTYPES = {"bfloat16": "bfloat16", "float32": "float32"}


def synthetic_config(size_gb: float, dtype: str):
  """An NLD-shaped config (hidden 2048, vocab 65536) with as many layers as fit `size_gb`."""
  from dllm_jax.config import preset  # pylint: disable=g-import-not-at-top
  itemsize = 2 if dtype == "bfloat16" else 4
  cfg = preset("nld-3b").replace(vocab_size=65536, hidden_size=2048, intermediate_size=8192,
                                 num_heads=16, num_kv_heads=4, head_dim=128, num_layers=1)
  d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * 128, cfg.num_kv_heads * 128
  per_layer = (2 * d * q + 2 * d * kv + 3 * d * f + 2 * d) * itemsize
  fixed = (2 * cfg.vocab_size * d + d) * itemsize
  return cfg.replace(num_layers=max(1, round((size_gb * 1e9 - fixed) / per_layer)))


def write_synthetic(out: Path, cfg, dtype: str, lora_rank: int = 128) -> int:
  """An HF directory with random weights; returns the bytes of model.safetensors."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from dllm_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from dllm_jax import safetensors_io  # pylint: disable=g-import-not-at-top
  from dllm_jax.model import abstract_model, LoRAConfig  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
  out.mkdir(parents=True)
  (out / "config.json").write_text(json.dumps(cfg.to_hf_config()))
  rng = np.random.default_rng(0)

  def entries(expected, state, dt):
    for key, (rule, layer) in expected.items():
      shape = ckpt._hf_shape(state, rule, layer)  # pylint: disable=protected-access
      yield key, dt, shape, lambda shape=shape: (
          0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dt)

  lora = LoRAConfig(lora_rank, 4 * lora_rank)
  _, state = nnx.split(abstract_model(cfg, lora=lora))
  safetensors_io.write_safetensors(out / safetensors_io.WEIGHTS_NAME,
                                   entries(ckpt.expected_hf_keys(cfg), state, np_dtype))
  lora_dir = out / ckpt.LORA_DIR
  lora_dir.mkdir()
  safetensors_io.write_safetensors(
      lora_dir / ckpt.ADAPTER_WEIGHTS,
      entries(ckpt.expected_lora_keys(cfg, lora), state, np.dtype(np.float32)))
  (lora_dir / ckpt.ADAPTER_CONFIG).write_text(json.dumps(ckpt.adapter_config(lora)))
  return (out / safetensors_io.WEIGHTS_NAME).stat().st_size


def run_phase(phase: str, hf: Path, conv: Path, dtype: str, quantize: str | None = None) -> dict:
  """Runs inside the child process: one phase, then reports time and peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dllm_jax.checkpoint import load_pretrained, save_converted  # pylint: disable=g-import-not-at-top
  jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  t0 = time.perf_counter()
  pre = None
  if phase in ("load-hf", "convert"):
    pre = load_pretrained(hf, dtype=jdtype, quantize=quantize)
  if phase == "convert":
    save_converted(pre, conv)
  if phase == "restore":
    pre = load_pretrained(conv, dtype=jdtype)
  if pre is not None:
    jax.block_until_ready(jax.tree.leaves(pre.model))
  seconds = time.perf_counter() - t0
  return {"phase": phase, "seconds": seconds, "peak_rss": peak_rss()}


def peak_rss() -> int:
  """This process's peak resident set (VmHWM) in bytes. Unlike getrusage's ru_maxrss, VmHWM starts
  afresh at exec, so it does not include the parent's pages that the forked child began with."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size-gb", type=float, default=2.0)
  p.add_argument("--dtype", choices=sorted(NP_DTYPES), default="bfloat16")
  p.add_argument("--workdir", default=None,
                 help="where to write (default: a temp dir, removed); kept, and its synthetic "
                      "checkpoint reused by later runs with the same --workdir")
  p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                 help="quantize the linear kernels while loading (and store them quantized)")
  p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # child-process mode
  args = p.parse_args()
  if args.phase:
    print(json.dumps(run_phase(args.phase, Path(args.workdir) / "hf", Path(args.workdir) / "conv",
                               args.dtype, args.quantize)))
    return
  work = Path(args.workdir or tempfile.mkdtemp(prefix="dllm-ckpt-mem-"))
  try:
    cfg = synthetic_config(args.size_gb, args.dtype)
    t0 = time.perf_counter()
    if (work / "hf").is_dir():  # a --workdir kept from an earlier run with the same sizes
      size = (work / "hf" / "model.safetensors").stat().st_size
      cfg = cfg.replace(num_layers=json.loads((work / "hf" / "config.json").read_text())[
          "num_hidden_layers"])
    else:
      size = write_synthetic(work / "hf", cfg, args.dtype)
    shutil.rmtree(work / "conv", ignore_errors=True)  # the convert phase writes it afresh
    print(f"synthetic checkpoint: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}, {args.dtype}: model.safetensors {size / 1e9:.2f} GB "
          f"(written in {time.perf_counter() - t0:.0f} s); quantize: {args.quantize}", flush=True)
    rows = []
    for phase in PHASES:
      extra = [f"--quantize={args.quantize}"] if args.quantize else []
      proc = subprocess.run([sys.executable, __file__, f"--phase={phase}", f"--workdir={work}",
                             f"--dtype={args.dtype}", *extra], capture_output=True, text=True,
                            check=True)
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss"]
    print(f"\n| phase | time (s) | peak RSS (GB) | peak - baseline (GB) | (peak - baseline) / "
          f"checkpoint |\n|---|---|---|---|---|")
    for r in rows:
      extra = r["peak_rss"] - base
      print(f"| {r['phase']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
            f"{extra / 1e9:.2f} | {extra / size:.2f} |")
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
