"""Shared fixtures: tiny random transformers reference models and their dllm_jax twins."""

from __future__ import annotations

import os

# Tests run on the CPU with deterministic fp32 unless a test opts into something else.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of small programs and run each a few times: LLVM's optimisation of the
# generated CPU code is most of their compile time and buys nothing at these sizes. XLA's own
# (HLO) passes, which decide fusion and copies, still run. Subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# The PyTorch references run tiny models, where torch's worker threads only cost: one thread
# halves their CPU time on a 2-core machine (set before torch is first imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child on the CPU, with `devices` simulated host devices
  (fixed when jax starts, hence a child) added to the inherited XLA_FLAGS."""
  flags = os.environ.get("XLA_FLAGS", "")
  if devices is not None:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


@pytest.fixture
def rng():
  return np.random.default_rng(0)
