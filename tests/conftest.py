"""Shared fixtures: tiny random transformers reference models and their dllm_jax twins."""

import os

# Tests run on the CPU with deterministic fp32 unless a test opts into something else.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest


def ministral_rope(theta=1e6, factor=16.0, original_max=16, beta=0.1):
  return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
          "original_max_position_embeddings": original_max, "beta_fast": 32.0, "beta_slow": 1.0,
          "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": beta}


def make_torch_ministral(rope=None, *, vocab=128, hidden=48, layers=2, heads=4, kv_heads=2,
                         head_dim=16, intermediate=96, seed=0):
  """A tiny random transformers Ministral3ForCausalLM in fp32 (head_dim != hidden/heads)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.Ministral3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=head_dim, rope_parameters=rope or ministral_rope(), max_position_embeddings=4096,
      tie_word_embeddings=False, attn_implementation="sdpa")
  torch.manual_seed(seed)
  model = transformers.Ministral3ForCausalLM(hf_cfg).float().eval()
  # Default init leaves norms at 1; random norms make the parity test sensitive to their handling.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


def torch_state_dict(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture
def rng():
  return np.random.default_rng(0)
