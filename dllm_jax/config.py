"""Model configuration: one frozen dataclass, read from an HF `config.json` or taken from a preset.

Every value is checked by `_check_fields` when the dataclass is built; `from_hf_config` runs the
same check on the values it read, so that a bad `config.json` is a one-line ValueError naming its
field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, NoReturn

ATTENTION_IMPLS = ("xla", "pallas", "triton", "cudnn", "auto")
ROPE_TYPES = ("default", "yarn")
# The training objectives of dllm_jax/training/objective.py (its PARADIGMS).
DLM_PARADIGMS = ("block_diff", "bidirectional", "autoregressive", "draft")
# Token ids and positions are int32 arrays on device.
INT32_MAX = 2**31 - 1
# The loader lists every layer's tensor names before it compares them with the files, so an absurd
# layer count would exhaust memory instead of failing on a missing tensor. Published decoders have a
# few hundred layers at most.
MAX_LAYERS = 4096

# Our field -> its `config.json` name, where they differ. The RoPE fields live in the
# `rope_parameters` object (transformers 5; `rope_scaling` in older files, and `rope_theta` may sit
# at the top level); `from_hf_config` names the place it actually read.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_type": "rope_parameters.rope_type",
    "rope_theta": "rope_parameters.rope_theta",
    "rope_factor": "rope_parameters.factor",
    "original_max_position_embeddings": "rope_parameters.original_max_position_embeddings",
    "beta_fast": "rope_parameters.beta_fast",
    "beta_slow": "rope_parameters.beta_slow",
    "mscale": "rope_parameters.mscale",
    "mscale_all_dim": "rope_parameters.mscale_all_dim",
    "rope_attention_factor": "rope_parameters.attention_factor",
    "rope_truncate": "rope_parameters.truncate",
    "llama_4_scaling_beta": "rope_parameters.llama_4_scaling_beta",
    "eos_token_ids": "eos_token_id",  # an int or a list in config.json
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of an NLD (Ministral-3-shaped) or Llama-family decoder.

  `HF_NAMES` gives the HF `config.json` name of each field where it differs.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int  # explicit in NLD configs: NOT hidden_size // num_heads for 3B/14B
  rms_norm_eps: float = 1e-5
  # RoPE: "default" (plain) or "yarn".
  rope_type: str = "default"
  rope_theta: float = 10000.0  # 14B: 1e9
  rope_factor: float | None = None  # used exactly as stored (3B-Base: 0.25)
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  rope_attention_factor: float | None = None  # derived when None
  rope_truncate: bool = True
  # Llama-4 position-dependent query scale; None disables it (plain Llama/Mistral).
  llama_4_scaling_beta: float | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)  # empty: no EOS
  pad_token_id: int | None = None
  mask_token_id: int | None = None  # NLD: 100; None for plain AR checkpoints
  block_size: int = 32  # NLD diffusion block length
  dlm_paradigm: str = "bidirectional"
  ar_loss_weight: float = 1.0
  dlm_loss_weight: float | None = None
  # "auto": XLA on CPU; on a GPU the fastest kernel measured for the device and attention call
  # (dllm_jax/attention.py resolve_impl), XLA wherever no kernel takes the call.
  attention_impl: str = "auto"

  def __post_init__(self):
    _check_fields(vars(self))
    # Integral/real values of other types (numpy scalars from GGUF metadata, JSON ints for floats)
    # become plain int/float, so equal configs hash alike.
    for field, kind in _KINDS.items():
      value = getattr(self, field)
      if value is not None:
        object.__setattr__(self, field, kind(value))
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def eos_token_id(self) -> int | None:
    return self.eos_token_ids[0] if self.eos_token_ids else None

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """Builds a config from an HF `config.json` dict (NLD, Ministral3, Mistral or Llama).

    Values are taken as stored, never coerced: "12" or 12.0 where an integer belongs is refused
    (a quoted number marks a broken file, and guessing could build the wrong architecture). Bad
    values raise a one-line ValueError naming the `config.json` field (our name for `overrides`).
    """
    if not isinstance(hf, dict):
      raise ValueError(f"an HF config must be a JSON object, not {type(hf).__name__}")
    try:
      kw, hf_names = _read_hf_fields(hf)
    except KeyError as e:
      raise ValueError(f"missing required field {e.args[0]!r}") from None
    kw.update(overrides)
    _check_fields({**_DEFAULTS, **kw},
                 lambda field: field if field in overrides else hf_names.get(field, field))
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


def _read_hf_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
  """`config.json` -> (ModelConfig keyword arguments, our field -> the `config.json` name read).

  Raises KeyError with the `config.json` name of a missing required field.
  """
  prefix = ""
  if "text_config" in hf and "hidden_size" not in hf:
    if not isinstance(hf["text_config"], dict):
      raise ValueError(f"text_config={hf['text_config']!r}: must be an object")
    hf, prefix = hf["text_config"], "text_config."
  # transformers 5 nests RoPE in `rope_parameters`; older files use `rope_scaling` + top-level theta.
  rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  rope = hf.get(rope_key) or {}
  if not isinstance(rope, dict):
    raise ValueError(f"{prefix}{rope_key}={rope!r}: must be an object")
  names = {field: prefix + hf_name.replace("rope_parameters.", f"{rope_key}.")
           for field, hf_name in HF_NAMES.items()}
  if "rope_type" not in rope and "type" in rope:
    names["rope_type"] = f"{prefix}{rope_key}.type"
  if "rope_theta" not in rope:
    names["rope_theta"] = f"{prefix}rope_theta"

  def required(key: str) -> Any:
    if key not in hf:
      raise KeyError(prefix + key)
    return hf[key]

  rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
  hidden_size, num_heads = required("hidden_size"), required("num_attention_heads")
  head_dim = hf.get("head_dim")
  # Derived only from valid sizes; otherwise _check_fields names the bad size before head_dim.
  if head_dim is None and _is_int(hidden_size) and _is_int(num_heads) and num_heads > 0:
    head_dim = hidden_size // num_heads
  num_kv_heads = hf.get("num_key_value_heads")
  eos = hf.get("eos_token_id", 2)
  eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  tied = hf.get("tie_word_embeddings")
  mask_id = hf.get("mask_token_id")
  if _is_int(mask_id) and mask_id < 0:  # the NLD config class default (-1) means "unset"
    mask_id = None
  kw = dict(
      vocab_size=required("vocab_size"),
      hidden_size=hidden_size,
      intermediate_size=required("intermediate_size"),
      num_layers=required("num_hidden_layers"),
      num_heads=num_heads,
      num_kv_heads=num_heads if num_kv_heads is None else num_kv_heads,
      head_dim=head_dim,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
      rope_type=rope_type,
      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
      rope_factor=rope.get("factor"),
      original_max_position_embeddings=rope.get("original_max_position_embeddings"),
      beta_fast=rope.get("beta_fast") or 32.0,  # as transformers: 0 or null means the default
      beta_slow=rope.get("beta_slow") or 1.0,
      mscale=rope.get("mscale"),
      mscale_all_dim=rope.get("mscale_all_dim"),
      rope_attention_factor=rope.get("attention_factor"),
      rope_truncate=rope.get("truncate", True),
      llama_4_scaling_beta=rope.get("llama_4_scaling_beta"),
      max_position_embeddings=hf.get("max_position_embeddings", 4096),
      tie_word_embeddings=False if tied is None else tied,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_ids=eos_ids,
      pad_token_id=hf.get("pad_token_id"),
      mask_token_id=mask_id,
      block_size=hf.get("block_size", 32),
      dlm_paradigm=hf.get("dlm_paradigm", "bidirectional"),
      ar_loss_weight=1.0 if hf.get("ar_loss_weight") is None else hf["ar_loss_weight"],
      dlm_loss_weight=hf.get("dlm_loss_weight"),
  )
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError("attention/MLP biases are not supported (NLD and Llama-family have none)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  return kw, names


# --- validation -----------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  try:
    return math.isfinite(float(value))
  except OverflowError:  # an integer beyond the float range
    return False


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)
             if f.default is not dataclasses.MISSING}
_OPTIONAL = {"rope_factor", "original_max_position_embeddings", "mscale", "mscale_all_dim",
             "rope_attention_factor", "llama_4_scaling_beta", "bos_token_id", "pad_token_id",
             "mask_token_id", "dlm_loss_weight"}
# Positive integers: field -> (upper bound, why) or None.
_POSITIVE_INTS: dict[str, tuple[int, str] | None] = {
    "vocab_size": (INT32_MAX, "token ids are int32"),
    "hidden_size": None, "intermediate_size": None,
    "num_layers": (MAX_LAYERS, "no decoder is this deep"),
    "num_heads": None, "num_kv_heads": None, "head_dim": None,
    "original_max_position_embeddings": None,
    "max_position_embeddings": (INT32_MAX, "positions are int32"),
    "block_size": None,
}
# Finite numbers: field -> (lower bound, whether the bound itself is allowed), None: any.
_NUMBERS: dict[str, tuple[float, bool] | None] = {
    "rms_norm_eps": (0.0, False),
    # RoPE's frequencies fall geometrically with base theta; YaRN divides by ln(theta).
    "rope_theta": (1.0, False),
    "rope_factor": (0.0, False),
    "beta_fast": (0.0, False), "beta_slow": (0.0, False),  # YaRN takes their logarithm
    "mscale": None, "mscale_all_dim": None,
    "rope_attention_factor": (0.0, False),
    "llama_4_scaling_beta": None,
    # A negative weight would shrink the loss normaliser towards zero.
    "ar_loss_weight": (0.0, True), "dlm_loss_weight": (0.0, True),
}
_BOOLS = ("rope_truncate", "tie_word_embeddings")
_TOKEN_IDS = ("bos_token_id", "pad_token_id", "mask_token_id")
_CHOICES = {"rope_type": ROPE_TYPES, "dlm_paradigm": DLM_PARADIGMS,
            "attention_impl": ATTENTION_IMPLS}
# The Python type each numeric field is stored as.
_KINDS = {**{f: int for f in (*_POSITIVE_INTS, *_TOKEN_IDS)}, **{f: float for f in _NUMBERS}}


def _check_fields(values: Mapping[str, Any],
                 name: Callable[[str], str] = lambda field: field) -> None:
  """Raises a one-line ValueError for the first bad value (in field order) of a ModelConfig.

  `values` maps every field to its value; `name` gives the name to report a field under.
  """
  def fail(field: str, reason: str, *culprit: Any) -> NoReturn:
    value = culprit[0] if culprit else values[field]
    raise ValueError(f"{name(field)}={value!r}: {reason}")

  for f in dataclasses.fields(ModelConfig):
    field, value = f.name, values[f.name]
    if value is None and field in _OPTIONAL:
      continue
    if field in _POSITIVE_INTS:
      if not _is_int(value) or value < 1:
        fail(field, "must be a positive integer")
      limit = _POSITIVE_INTS[field]
      if limit is not None and value > limit[0]:
        fail(field, f"must be at most {limit[0]} ({limit[1]})")
    elif field in _NUMBERS:
      if not _is_finite_number(value):
        fail(field, "must be a finite number")
      bound = _NUMBERS[field]
      if bound is not None and (value < bound[0] or (value == bound[0] and not bound[1])):
        fail(field, f"must be {'>=' if bound[1] else '>'} {bound[0]:g}")
    elif field in _BOOLS:
      if not isinstance(value, bool):
        fail(field, "must be true or false")
    elif field in _CHOICES:
      if not isinstance(value, str) or value not in _CHOICES[field]:
        fail(field, f"must be one of {', '.join(_CHOICES[field])}")
    elif field in _TOKEN_IDS or field == "eos_token_ids":
      vocab = values["vocab_size"]
      in_vocab = f"a token id in [0, {name('vocab_size')}={vocab})"
      if field in _TOKEN_IDS:
        if not _is_int(value) or not 0 <= value < vocab:
          fail(field, f"must be {in_vocab}")
      elif not isinstance(value, tuple):
        fail(field, "must be a tuple of token ids")
      else:
        for i in value:  # reported alone: config.json may hold an int or a list
          if not _is_int(i) or not 0 <= i < vocab:
            fail(field, f"must be {in_vocab}", i)
  if values["num_heads"] % values["num_kv_heads"]:
    fail("num_kv_heads", f"must divide {name('num_heads')}={values['num_heads']}")
  if values["head_dim"] % 2:
    fail("head_dim", "must be even (RoPE rotates pairs of dimensions)")
  if values["original_max_position_embeddings"] is None:
    if values["rope_type"] == "yarn":
      fail("original_max_position_embeddings", "yarn RoPE needs it")
    if values["llama_4_scaling_beta"] is not None:
      fail("original_max_position_embeddings", f"{name('llama_4_scaling_beta')} needs it")


# --- presets (docs/model.md §1.2 / §1.3) ----------------------------------------------------------

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
