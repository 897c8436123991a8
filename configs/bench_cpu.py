"""Decoding benchmark on a CPU: the JAX engine against PyTorch on the same fp32 weights.

  python scripts/bench.py --config=configs/bench_cpu.py --json=bench_cpu.json

Sized to finish in about three minutes on two quiet cores. Random weights give near-uniform
logits, so diffusion commits one token per denoising step at τ = 0.9 and speculation accepts about
one token per round: the worst case for tokens per forward, and the same work on both sides.
"""

import ml_collections

# An NLD-shaped model of ~100M parameters: the 3B's structure (explicit head_dim with
# heads*head_dim != hidden, GQA 4:1, YaRN, Llama-4 query scale, untied head), scaled down.
NLD_100M = dict(vocab_size=32768, hidden_size=768, intermediate_size=2304, num_layers=8,
                num_heads=8, num_kv_heads=2, head_dim=64)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.threads = 0  # 0: every CPU this process may use (XLA:CPU's pool size); torch gets the same
  c.dtype = "auto"  # float32 on CPU, bfloat16 on GPU, for both frameworks
  c.attention_impl = ""  # "": the model config's default (xla); or pallas, triton, cudnn, auto
  c.warmup = 1  # unrecorded calls first (they compile)
  c.repeats = 3  # medians over these
  c.forward_repeats = 5  # isolated single-forward timings
  c.prompt_length = 64
  c.torch_baseline = True
  # weight-only quantized copies of each model, run beside it (JAX only): "int8", "fp8"
  c.quantize = ()

  c.model_order = ("nld-100m", "smollm2")
  c.models = ml_collections.ConfigDict()
  c.models["nld-100m"] = dict(source="random", base="nld-3b", overrides=NLD_100M)
  # source: "random" (an NLD preset `base` with `overrides`), "smollm2" or a .gguf file.
  c.models["smollm2"] = dict(source="smollm2", base="", overrides={})  # SmolLM2-135M (GGUF)

  c.ar = dict(models=("nld-100m", "smollm2"), batch_sizes=(1,), max_new_tokens=128)
  c.diffusion = dict(models=("nld-100m",), batch_sizes=(1,), max_new_tokens=64, block_length=32,
                     thresholds=(0.9, 0.0))
  c.spec = dict(models=("nld-100m",), batch_sizes=(1,), max_new_tokens=32, block_length=32,
                threshold=0.0, lora_rank=128)
  # One B(B+1)-token forward per round (72 tokens at B = 8): compute-bound on a CPU.
  c.quadratic = dict(models=("nld-100m",), batch_sizes=(1,), max_new_tokens=32, block_length=8)

  # llama.cpp on copies of a GGUF model's file (AR, batch 1), alternating with the JAX engine:
  # F32 (the same fp32 values) and Q8_0 as a reference. Needs the [bench] extra; skipped without.
  # dir: where the copies are written once ("": ~/.cache/dllm_jax/llama_cpp).
  c.llama_cpp = dict(quants=("F32", "Q8_0"), dir="")

  c.roofline = roofline_config()
  return c


def roofline_config() -> ml_collections.ConfigDict:
  """The --gpu_shapes section: NLD 3B/8B shapes, random bf16 weights, per-forward timings."""
  return ml_collections.ConfigDict(dict(
      presets=("nld-3b", "nld-8b"), overrides={}, dtype="bfloat16", batch_sizes=(1, 8),
      context=1024, block_length=32, repeats=20, copy_mib=2048, torch=True,
      allow_cpu=False, forwards=("ar", "denoise", "commit")))
