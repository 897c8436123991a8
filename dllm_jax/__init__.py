"""dllm_jax: Nemotron-Labs-Diffusion language models in JAX.

The names below are imported on first use: `import dllm_jax` (or one of its light modules, such as
dllm_jax.config and dllm_jax.decode.settings, which the scripts use to check their flags) does not
start JAX until a name that needs it is touched.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_EXPORTS = {
    "Pretrained": "checkpoint", "export_hf": "checkpoint", "load_pretrained": "checkpoint",
    "PRESETS": "config", "ModelConfig": "config", "preset": "config",
    "AR": "decode.settings", "Diffusion": "decode.settings", "Quadratic": "decode.settings",
    "Spec": "decode.settings", "settings_for": "decode.settings",
    "GenerateResult": "decode.common", "generate": "decode.engine",
    "KVCache": "kv_cache",
    "Loaded": "loader", "load": "loader",
    "LoRAConfig": "model", "NLDModel": "model", "abstract_model": "model", "forward": "model",
    "make_mesh": "sharding", "shard_model": "sharding",
    "TextTokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'dllm_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"dllm_jax.{_EXPORTS[name]}"), name)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
