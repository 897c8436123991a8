"""dllm_jax: Nemotron-Labs-Diffusion language models in JAX."""

from dllm_jax.config import ModelConfig, PRESETS, preset
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import LoRAConfig, NLDModel, abstract_model, forward

__all__ = ["ModelConfig", "PRESETS", "preset", "KVCache", "LoRAConfig", "NLDModel",
           "abstract_model", "forward"]
