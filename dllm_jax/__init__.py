"""dllm_jax: Nemotron-Labs-Diffusion language models in JAX."""

from dllm_jax.checkpoint import Pretrained, export_hf, load_pretrained
from dllm_jax.config import PRESETS, ModelConfig, preset
from dllm_jax.decode import (AR, Diffusion, GenerateResult, Quadratic, Spec, generate,
                             settings_for)
from dllm_jax.kv_cache import KVCache
from dllm_jax.loader import Loaded, load
from dllm_jax.model import LoRAConfig, NLDModel, abstract_model, forward
from dllm_jax.sharding import make_mesh, shard_model
from dllm_jax.tokenizer import TextTokenizer

__all__ = [
    "AR", "Diffusion", "GenerateResult", "KVCache", "LoRAConfig", "Loaded", "ModelConfig",
    "NLDModel", "PRESETS", "Pretrained", "Quadratic", "Spec", "TextTokenizer", "abstract_model",
    "export_hf", "forward", "generate", "load", "load_pretrained", "make_mesh", "preset", "settings_for",
    "shard_model",
]
