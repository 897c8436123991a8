"""Builds tiny NLD-format HF checkpoints from a transformers Ministral3ForCausalLM.

The writer here is the reference safetensors library (via torch), independent of the reader under
test; the tensors, the PEFT adapter keys and the config follow docs/model.md §2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers

from dllm_jax.config import ModelConfig


def ministral3(cfg: ModelConfig, seed: int = 0) -> transformers.Ministral3ForCausalLM:
  """A random fp32 Ministral3ForCausalLM with the dims, RoPE and Llama-4 scaling of `cfg`."""
  hf = cfg.to_hf_config()
  config = transformers.Ministral3Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings, rope_parameters=hf["rope_parameters"],
      tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=cfg.eos_token_id, pad_token_id=None)
  torch.manual_seed(seed)
  model = transformers.Ministral3ForCausalLM(config).eval()
  with torch.no_grad():  # non-trivial norm scales, so a swapped norm tensor would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


def nld_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
  """The HF state dict renamed to NLD keys (docs/model.md §2.2): model.* -> encoder.*, lm_head ->
  diffusion_head."""
  out = {}
  for key, value in model.state_dict().items():
    key = key.replace("model.", "encoder.", 1) if key.startswith("model.") else key
    key = "diffusion_head.weight" if key == "lm_head.weight" else key
    out[key] = value.detach().to(dtype).contiguous()
  return out


def nld_config_json(cfg: ModelConfig) -> dict:
  return {**cfg.to_hf_config(), "architectures": ["NemotronLabsDiffusionModel"],
          "model_type": "nemotron_labs_diffusion", "dtype": "bfloat16"}


def save_tensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
  """model.safetensors, or `shards` files plus model.safetensors.index.json."""
  if shards == 1:
    safetensors.torch.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return
  keys = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: tensors[k] for k in keys[s::shards]}
    safetensors.torch.save_file(part, out_dir / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in part})
  total = sum(t.numel() * t.element_size() for t in tensors.values())
  (out_dir / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
  """PEFT target -> (layer submodule, in width, out width) of the Ministral-3 projections."""
  d, q, kv, f = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                 cfg.intermediate_size)
  return {"q_proj": ("self_attn", d, q), "k_proj": ("self_attn", d, kv),
          "v_proj": ("self_attn", d, kv), "o_proj": ("self_attn", q, d),
          "gate_proj": ("mlp", d, f), "up_proj": ("mlp", d, f), "down_proj": ("mlp", f, d)}


def lora_tensors(cfg: ModelConfig, rank: int, seed: int = 1,
                 targets: tuple[str, ...] = ("o_proj",)) -> dict[str, torch.Tensor]:
  """PEFT-named fp32 factors (docs/model.md §2.3): lora_A [r, in], lora_B [out, r], both
  non-zero."""
  g = torch.Generator().manual_seed(seed)
  shapes = projection_shapes(cfg)
  out = {}
  for i in range(cfg.num_layers):
    for target in targets:
      module, d_in, d_out = shapes[target]
      base = f"base_model.model.encoder.layers.{i}.{module}.{target}"
      out[f"{base}.lora_A.weight"] = 0.05 * torch.randn(rank, d_in, generator=g)
      out[f"{base}.lora_B.weight"] = 0.05 * torch.randn(d_out, rank, generator=g)
  return out


def adapter_config(rank: int, alpha: float, targets: tuple[str, ...] = ("o_proj",),
                   **overrides) -> dict:
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
          "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
          "use_dora": False, "fan_in_fan_out": False, "inference_mode": True, **overrides}


def write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
  lora_dir = out_dir / "linear_spec_lora"
  lora_dir.mkdir(exist_ok=True)
  (lora_dir / "adapter_config.json").write_text(json.dumps(config))
  safetensors.torch.save_file(tensors, lora_dir / "adapter_model.safetensors")


def write_nld_checkpoint(out_dir: Path, cfg: ModelConfig, model: torch.nn.Module, *,
                         dtype: torch.dtype = torch.float32, shards: int = 1,
                         lora: tuple[int, float] | None = None,
                         lora_targets: tuple[str, ...] = ("o_proj",)) -> Path:
  """An NLD-layout HF directory: config.json, weights, tokenizer_config.json, optional adapter."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(nld_config_json(cfg)))
  (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
  save_tensors(out_dir, nld_state_dict(model, dtype), shards)
  if lora is not None:
    rank, alpha = lora
    write_adapter(out_dir, lora_tensors(cfg, rank, targets=lora_targets),
                  adapter_config(rank, alpha, lora_targets))
  return out_dir


def torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()
