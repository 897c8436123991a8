"""Weight-only quantization of the linear layers: int8 or fp8 (e4m3) with per-output-channel scales.

Every `model.Linear` (q/k/v/o, gate/up/down and the untied `diffusion_head`) of a model built with
`quantize="int8"` or `"fp8"` stores its kernel [in, out] in that type plus a float32
`kernel_scale` [out]; the embedding, the norms, the draft LoRA factors, the activations and the KV
cache stay in their own dtypes (docs/quantization.md). The forward multiplies the activations by
the kernel converted to the compute dtype (exact for both types) with float32 accumulation and
applies the scale to the output, which for a per-output-channel scale is the same product as with
the dequantized kernel.

Quantization: absmax per output channel; int8 uses scale = absmax / 127.5 and round-half-to-even,
clipped to [-128, 127]; fp8 uses scale = absmax / 448 and the round-to-nearest cast to
float8_e4m3fn (Qwix's definitions; docs/quantization.md says why Qwix itself is not called).
Checkpoint loading (dllm_jax.checkpoint) quantizes each tensor on its device as it arrives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("int8", "fp8")
QTYPES = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
SCALE_NAME = "kernel_scale"  # the scale's name beside a quantized `kernel`
_BOUND = {"int8": 127.5, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # |w| / scale <= this
_TINY_SCALE = math.sqrt(float(jnp.finfo(jnp.float32).tiny))


def check_mode(quantize) -> str | None:
  """`quantize` as given (None, "int8" or "fp8"); anything else is a one-line ValueError."""
  if quantize is not None and quantize not in MODES:
    raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(MODES)} or None")
  return quantize


def mode_of(dtype) -> str:
  """The mode whose storage type is `dtype`."""
  for mode, qtype in QTYPES.items():
    if jnp.dtype(dtype) == qtype:
      return mode
  raise ValueError(f"{jnp.dtype(dtype).name} is not a quantized kernel type")


def quantize_kernel(w: jax.Array, mode: str, *, transposed: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """A kernel [in, out] (or its transpose [out, in], as checkpoints store it, with `transposed`)
  -> (values [in, out] in the mode's type, float32 scales [out]).

  One pass over `w` for the absmax and one elementwise pass producing the values: the float32
  quotient is never materialised (qwix.quantize keeps a float32 copy of the whole tensor).
  """
  channel = 0 if transposed else 1
  absmax = jnp.max(jnp.abs(w), axis=1 - channel).astype(jnp.float32)
  scale = absmax / _BOUND[mode]
  scale = jnp.where(scale < _TINY_SCALE, jnp.float32(1), scale)  # an all-zero channel
  w = w.T if transposed else w
  x = w.astype(jnp.float32) / scale[None, :]
  if mode == "int8":
    values = jnp.clip(jnp.round(x), -128, 127).astype(jnp.int8)
  else:
    values = jnp.clip(x, -_BOUND[mode], _BOUND[mode]).astype(QTYPES[mode])
  return values, scale


def dequantize_kernel(values: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 kernel that `values` and `scale` stand for."""
  return values.astype(jnp.float32) * scale.astype(jnp.float32)[None, :]


def quantized_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """x [..., in] @ the dequantized kernel, in `dtype` with float32 accumulation."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), values.astype(dtype),
                 preferred_element_type=jnp.float32)
  return (y * scale.astype(jnp.float32)).astype(dtype)
