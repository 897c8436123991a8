"""Model configuration: one frozen dataclass, read from an HF `config.json` or taken from a preset."""

from __future__ import annotations

import dataclasses
from typing import Any

ATTENTION_IMPLS = ("xla", "pallas", "triton", "cudnn", "auto")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an NLD (Ministral-3-shaped) or Llama-family decoder.

  Field comments give the HF `config.json` name where it differs.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int  # num_hidden_layers
  num_heads: int  # num_attention_heads
  num_kv_heads: int  # num_key_value_heads
  head_dim: int  # explicit in NLD configs: NOT hidden_size // num_heads for 3B/14B
  rms_norm_eps: float = 1e-5
  # RoPE. `rope_type` is "default" (plain) or "yarn"; HF nests these in `rope_parameters`.
  rope_type: str = "default"
  rope_theta: float = 10000.0  # rope_parameters.rope_theta (14B: 1e9)
  rope_factor: float | None = None  # rope_parameters.factor, used exactly as stored (3B-Base: 0.25)
  original_max_position_embeddings: int | None = None  # rope_parameters.original_max_position_embeddings
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  rope_attention_factor: float | None = None  # rope_parameters.attention_factor (derived when None)
  rope_truncate: bool = True  # rope_parameters.truncate
  # Llama-4 position-dependent query scale; None disables it (plain Llama/Mistral).
  llama_4_scaling_beta: float | None = None  # rope_parameters.llama_4_scaling_beta
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)  # eos_token_id (int or list)
  pad_token_id: int | None = None
  mask_token_id: int | None = None  # NLD: 100; None for plain AR checkpoints
  block_size: int = 32  # NLD diffusion block length
  dlm_paradigm: str = "bidirectional"
  ar_loss_weight: float = 1.0
  dlm_loss_weight: float | None = None
  attention_impl: str = "xla"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rope_type not in ("default", "yarn"):
      raise ValueError(f"unsupported rope_type {self.rope_type!r} (supported: default, yarn)")
    if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
      raise ValueError("yarn RoPE needs original_max_position_embeddings")
    if self.llama_4_scaling_beta is not None and self.original_max_position_embeddings is None:
      raise ValueError("llama_4_scaling_beta needs original_max_position_embeddings")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def eos_token_id(self) -> int:
    return self.eos_token_ids[0]

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """Builds a config from an HF `config.json` dict (NLD, Ministral3, Mistral or Llama)."""
    try:
      return cls._from_hf_config(hf, overrides)
    except KeyError as e:
      raise ValueError(f"config.json is missing required field {e.args[0]!r}") from None

  @classmethod
  def _from_hf_config(cls, hf: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    hf = dict(hf)
    if "text_config" in hf and "hidden_size" not in hf:
      hf = dict(hf["text_config"])
    # transformers 5 nests RoPE in `rope_parameters`; older files use `rope_scaling` + top-level theta.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    eos = hf.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    mask_id = hf.get("mask_token_id")
    if mask_id is not None and mask_id < 0:  # the NLD config class default (-1) means "unset"
      mask_id = None
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_type=rope_type,
        rope_theta=float(theta),
        rope_factor=rope.get("factor"),
        original_max_position_embeddings=rope.get("original_max_position_embeddings"),
        beta_fast=rope.get("beta_fast") or 32.0,
        beta_slow=rope.get("beta_slow") or 1.0,
        mscale=rope.get("mscale"),
        mscale_all_dim=rope.get("mscale_all_dim"),
        rope_attention_factor=rope.get("attention_factor"),
        rope_truncate=rope.get("truncate", True),
        llama_4_scaling_beta=rope.get("llama_4_scaling_beta"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        mask_token_id=mask_id,
        block_size=hf.get("block_size", 32),
        dlm_paradigm=hf.get("dlm_paradigm", "bidirectional"),
        ar_loss_weight=hf.get("ar_loss_weight", 1.0) if hf.get("ar_loss_weight") is not None else 1.0,
        dlm_loss_weight=hf.get("dlm_loss_weight"),
    )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError("attention/MLP biases are not supported (NLD and Llama-family have none)")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """The inverse of `from_hf_config`, in the NLD `config.json` layout."""
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "yarn":
      rope.update(factor=self.rope_factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow,
                  mscale=self.mscale, mscale_all_dim=self.mscale_all_dim, truncate=self.rope_truncate)
      if self.rope_attention_factor is not None:
        rope["attention_factor"] = self.rope_attention_factor
    if self.original_max_position_embeddings is not None:
      rope["original_max_position_embeddings"] = self.original_max_position_embeddings
    if self.llama_4_scaling_beta is not None:
      rope["llama_4_scaling_beta"] = self.llama_4_scaling_beta
    eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
    out = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=eos, hidden_act="silu", attention_bias=False, mlp_bias=False,
        block_size=self.block_size, dlm_paradigm=self.dlm_paradigm,
        ar_loss_weight=self.ar_loss_weight, dlm_loss_weight=self.dlm_loss_weight,
    )
    if self.mask_token_id is not None:
      out["mask_token_id"] = self.mask_token_id
    if self.pad_token_id is not None:
      out["pad_token_id"] = self.pad_token_id
    return out


# --- presets (spec §1.2 / §1.3) -------------------------------------------------------------------

_NLD_COMMON = dict(
    vocab_size=131072, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_type="yarn", rope_theta=1.0e6, rope_factor=16.0, original_max_position_embeddings=16384,
    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1,
    max_position_embeddings=262144, tie_word_embeddings=False, bos_token_id=1,
    eos_token_ids=(11,), mask_token_id=100, block_size=32,
)
_SIZES = {
    "3b": dict(hidden_size=3072, num_layers=26, intermediate_size=9216),
    "8b": dict(hidden_size=4096, num_layers=34, intermediate_size=14336),
    "14b": dict(hidden_size=5120, num_layers=40, intermediate_size=16384, rope_theta=1.0e9),
}
# Base checkpoints: 3B-Base verified; 8B/14B-Base assumed to follow it (always prefer config.json).
_BASE = dict(max_position_embeddings=4096, rope_factor=0.25, eos_token_ids=(2,))

PRESETS: dict[str, ModelConfig] = {}
for _size, _dims in _SIZES.items():
  PRESETS[f"nld-{_size}"] = ModelConfig(**{**_NLD_COMMON, **_dims})
  PRESETS[f"nld-{_size}-base"] = ModelConfig(**{**_NLD_COMMON, **_dims, **_BASE})

# A test-size NLD: same structure (explicit head_dim != hidden/heads, YaRN, Llama-4 scale active
# past position 64), tiny sizes.
PRESETS["tiny"] = ModelConfig(**{
    **_NLD_COMMON, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
    "original_max_position_embeddings": 64, "max_position_embeddings": 1024,
    "mask_token_id": 100, "eos_token_ids": (11,),
})


def preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
