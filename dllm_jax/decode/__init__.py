"""The NLD decoding modes: `generate(model, prompts, settings)` with the settings of one mode.

  AR()         autoregressive (docs/model.md §5.2)
  Diffusion()  block diffusion with a causal commit per block (docs/model.md §5.1)
  Spec()       linear self-speculation: diffusion draft, LoRA on; causal verify (docs/model.md §5.3)
  Quadratic()  quadratic self-speculation: one forward verifies the draft and drafts the next block
               for every acceptance length (docs/model.md §5.6)

The settings (dllm_jax.decode.settings) need no JAX; the compiled engine (dllm_jax.decode.engine:
generate, lower_programs, the per-mode step modules) is imported on first use, so that checking
settings, as the scripts do before anything else, stays fast.
"""

from __future__ import annotations

import importlib

from dllm_jax.decode.settings import (MAX_EOS, AR, DecodeSettings, Diffusion, Quadratic, Spec,
                                      settings_for)

__all__ = ["AR", "DecodeSettings", "Diffusion", "GenerateResult", "MAX_EOS", "MODES", "Quadratic",
           "Spec", "bucket_length", "cache_length", "generate", "lower_programs", "settings_for"]


def __getattr__(name: str):
  """Everything else is the engine's (imported now: it brings JAX)."""
  if name.startswith("__") or name == "engine":  # `engine` itself: the import system asks first
    raise AttributeError(f"module 'dllm_jax.decode' has no attribute {name!r}")
  return getattr(importlib.import_module("dllm_jax.decode.engine"), name)
