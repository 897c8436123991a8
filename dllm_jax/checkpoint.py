"""HF safetensors <-> dllm_jax params: one declarative key table drives loading and export.

NLD checkpoints name tensors `encoder.*` + `diffusion_head.weight`; Llama/Mistral checkpoints use
`model.*` + `lm_head.weight` (absent when embeddings are tied). Both map onto the same module tree.
PyTorch Linear weights are [out, in]; our kernels are [in, out], so projections are transposed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.config import ModelConfig
from dllm_jax.model import LoRAConfig, NLDModel, abstract_model


@dataclasses.dataclass(frozen=True)
class KeyRule:
  hf: str  # HF key with `{prefix}` and, for layer tensors, `{i}`
  path: tuple[str, ...]  # path in the nnx state
  transpose: bool
  per_layer: bool


KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("{prefix}.embed_tokens.weight", ("encoder", "embed_tokens", "embedding"), False, False),
    KeyRule("{prefix}.norm.weight", ("encoder", "norm", "weight"), False, False),
    *(KeyRule(f"{{prefix}}.layers.{{i}}.{name}.weight",
              ("encoder", "layers", *name.split("."), "kernel" if tr else "weight"), tr, True)
      for name, tr in (
          ("input_layernorm", False),
          ("self_attn.q_proj", True),
          ("self_attn.k_proj", True),
          ("self_attn.v_proj", True),
          ("self_attn.o_proj", True),
          ("post_attention_layernorm", False),
          ("mlp.gate_proj", True),
          ("mlp.up_proj", True),
          ("mlp.down_proj", True),
      )),
)
HEAD_PATH = ("diffusion_head", "kernel")
NAMING = {  # checkpoint family -> (encoder prefix, head key)
    "nld": ("encoder", "diffusion_head.weight"),
    "llama": ("model", "lm_head.weight"),
}


def detect_naming(keys: Iterable[str]) -> str:
  keys = set(keys)
  if "encoder.embed_tokens.weight" in keys:
    return "nld"
  if "model.embed_tokens.weight" in keys:
    return "llama"
  raise ValueError("checkpoint has neither 'encoder.embed_tokens.weight' (NLD) nor "
                   "'model.embed_tokens.weight' (Llama/Mistral)")


def expected_hf_keys(cfg: ModelConfig, naming: str = "nld") -> dict[str, tuple[KeyRule, int | None]]:
  """Every HF key the checkpoint must contain -> (rule, layer index)."""
  prefix, head_key = NAMING[naming]
  out: dict[str, tuple[KeyRule, int | None]] = {}
  for rule in KEY_TABLE:
    if rule.per_layer:
      for i in range(cfg.num_layers):
        out[rule.hf.format(prefix=prefix, i=i)] = (rule, i)
    else:
      out[rule.hf.format(prefix=prefix)] = (rule, None)
  if not cfg.tie_word_embeddings:
    out[head_key] = (KeyRule(head_key, HEAD_PATH, True, False), None)
  return out


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def model_from_tensors(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray], keys: Iterable[str],
                       *, dtype=jnp.float32, param_dtype=None, lora: LoRAConfig | None = None
                       ) -> NLDModel:
  """Builds an NLDModel from HF-named tensors fetched one at a time by `get_tensor(key)`.

  Per-layer tensors are written into preallocated stacked host buffers, so at most one checkpoint
  tensor is held besides the result.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  keys = list(keys)
  naming = detect_naming(keys)
  expected = expected_hf_keys(cfg, naming)
  unexpected = sorted(set(keys) - set(expected))
  missing = sorted(set(expected) - set(keys))
  if missing:
    raise ValueError(f"checkpoint is missing key {missing[0]!r} ({len(missing)} missing in all)")
  if unexpected:
    raise ValueError(f"checkpoint has unexpected key {unexpected[0]!r} "
                     f"({len(unexpected)} unexpected in all)")
  model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora)
  graphdef, state = nnx.split(model)
  host: dict[tuple[str, ...], np.ndarray] = {}
  for key, (rule, layer) in expected.items():
    target = _get_path(state, rule.path)
    want = target.value.shape if layer is None else target.value.shape[1:]
    x = np.asarray(get_tensor(key))
    x = x.T if rule.transpose else x
    if tuple(x.shape) != tuple(want):
      raise ValueError(f"tensor {key!r} has shape {tuple(x.shape[::-1] if rule.transpose else x.shape)},"
                       f" expected {tuple(want[::-1] if rule.transpose else want)}")
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    if layer is None:
      host[rule.path] = x.astype(np_dtype)
    else:
      buf = host.get(rule.path)
      if buf is None:
        buf = host[rule.path] = np.empty(target.value.shape, np_dtype)
      buf[layer] = x
  for path, arr in host.items():
    _get_path(state, path).value = jnp.asarray(arr)
  # LoRA factors are not in the base checkpoint: zeros make the adapter an exact identity.
  state = jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, state)
  return nnx.merge(graphdef, state)


def model_from_state_dict(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], **kw) -> NLDModel:
  """Convenience wrapper over an in-memory {HF key: array} mapping."""
  return model_from_tensors(cfg, tensors.__getitem__, tensors.keys(), **kw)
