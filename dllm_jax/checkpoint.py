"""HF safetensors <-> dllm_jax params: one declarative key table drives loading and export.

NLD checkpoints name tensors `encoder.*` + `diffusion_head.weight`; Llama/Mistral checkpoints use
`model.*` + `lm_head.weight` (absent when embeddings are tied). Both map onto the same module tree.
PyTorch Linear weights are [out, in]; our kernels are [in, out], so projections are transposed.

Loading streams: every safetensors header is parsed and checked against the config's abstract
shapes before any tensor data is read, then tensors are read one at a time
(dllm_jax/safetensors_io.py) and written straight into their on-device (optionally sharded)
buffers. Host memory therefore holds at most one checkpoint tensor besides the result.

Three on-disk forms:
  * an HF directory: config.json + model.safetensors (or model.safetensors.index.json + shards),
    optionally `linear_spec_lora/` (the PEFT draft adapter, docs/model.md §2.3) and tokenizer files;
  * a converted directory (`save_converted`, scripts/convert_checkpoint.py): orbax params that
    restore onto any mesh, plus config.json and the tokenizer files;
  * `export_hf` writes an HF directory back (for PyTorch users of weights trained here).

This module is over 600 lines because `load_pretrained` reads HF and converted directories with
the same config, adapter and placement helpers: the converted form in a module of its own would
import this one and be imported by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax import quantize as quant_lib
from dllm_jax.atomic_files import atomic_dir
from dllm_jax.config import ModelConfig
from dllm_jax.errors import CheckpointError
from dllm_jax.model import LORA_TARGETS, LoRAConfig, NLDModel, abstract_model
from dllm_jax.safetensors_io import (NP_TO_ST, ST_FLOAT, ST_TO_HF_DTYPE, WEIGHTS_NAME, TensorInfo,
                                     TensorReader, has_nonfinite, index_checkpoint,
                                     read_safetensors_header, write_safetensors)

LORA_DIR = "linear_spec_lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONVERTED_MARKER = "dllm_jax_converted.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "generation_config.json")


# --- key table ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KeyRule:
  hf: str  # HF key with `{prefix}` and, for layer tensors, `{i}`
  path: tuple[str, ...]  # path in the nnx state; a layer tensor's starts ("encoder", "layers")
  transpose: bool
  per_layer: bool

  def param_path(self, layer: int | None) -> tuple[str | int, ...]:
    """The path of the parameter in the nnx state (layer i lives at encoder.layers[i])."""
    return self.path if layer is None else (*self.path[:2], layer, *self.path[2:])


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


def lora_rules(targets: Iterable[str]) -> tuple[KeyRule, ...]:
  """PEFT names of an adapter on `targets` (docs/model.md §2.3): lora_A [r, in] -> a = A.T [in, r]
  and lora_B [out, r] -> b = B.T [r, out], held by the adapted projection."""
  return tuple(
      KeyRule(f"base_model.model.{{prefix}}.layers.{{i}}.{LORA_TARGETS[t]}.{t}.lora_{ab}.weight",
              ("encoder", "layers", LORA_TARGETS[t], t, f"lora_{ab.lower()}"), True, True)
      for t in targets for ab in "AB")


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
  raise CheckpointError("checkpoint has neither 'encoder.embed_tokens.weight' (NLD) nor "
                        "'model.embed_tokens.weight' (Llama/Mistral)")


def _expand(rules: Iterable[KeyRule], cfg: ModelConfig, prefix: str
            ) -> dict[str, tuple[KeyRule, int | None]]:
  out: dict[str, tuple[KeyRule, int | None]] = {}
  for rule in rules:
    if rule.per_layer:
      for i in range(cfg.num_layers):
        out[rule.hf.format(prefix=prefix, i=i)] = (rule, i)
    else:
      out[rule.hf.format(prefix=prefix)] = (rule, None)
  return out


def expected_hf_keys(cfg: ModelConfig, naming: str = "nld") -> dict[str, tuple[KeyRule, int | None]]:
  """Every HF key the checkpoint must contain -> (rule, layer index)."""
  prefix, head_key = NAMING[naming]
  out = _expand(KEY_TABLE, cfg, prefix)
  if not cfg.tie_word_embeddings:
    out[head_key] = (KeyRule(head_key, HEAD_PATH, True, False), None)
  return out


def expected_lora_keys(cfg: ModelConfig, lora: LoRAConfig, naming: str = "nld"
                       ) -> dict[str, tuple[KeyRule, int | None]]:
  """Every PEFT key of an adapter on `lora.targets` -> (rule, layer index)."""
  return _expand(lora_rules(lora.targets), cfg, NAMING[naming][0])


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _hf_shape(state, rule: KeyRule, layer: int | None) -> tuple[int, ...]:
  """The shape the HF tensor must have, derived from the abstract model (no allocation)."""
  shape = tuple(_get_path(state, rule.param_path(layer)).value.shape)
  return shape[::-1] if rule.transpose else shape


def hf_tensor_shapes(cfg: ModelConfig, naming: str = "nld") -> dict[str, tuple[int, ...]]:
  """Every HF key of a checkpoint for `cfg` -> its PyTorch-layout shape (from the key table)."""
  state = nnx.state(abstract_model(cfg))
  return {key: _hf_shape(state, rule, layer)
          for key, (rule, layer) in expected_hf_keys(cfg, naming).items()}


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layer_count(found: Iterable[str], num_layers: int, where: str, claim: str) -> None:
  """The layers the names hold (largest `layers.{i}` index + 1) against the config's count, before
  any name is expanded from the config: an absurd count is one line, not a list to build.

  claim: how the config's count is named, e.g. "config.json has num_hidden_layers".
  """
  top = max(((int(m.group(1)), key) for key in found if (m := _LAYER_INDEX.search(key))),
            default=None)
  held = 0 if top is None else top[0] + 1
  if held != num_layers:
    info = found.get(top[1]) if top is not None and isinstance(found, Mapping) else None
    in_file = f" in {info.file.name}" if isinstance(info, TensorInfo) else ""
    largest = f" (largest index: {top[1]!r}{in_file})" if top is not None else ""
    raise CheckpointError(f"{where} holds {held} layers{largest}, but {claim}={num_layers}")


def _check_key_sets(found: Iterable[str], expected: Mapping[str, Any], where: str) -> None:
  found_keys = set(found)
  missing = sorted(set(expected) - found_keys)
  unexpected = sorted(found_keys - set(expected))
  if missing:
    raise CheckpointError(f"{where} is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
  if unexpected:
    info = found.get(unexpected[0]) if isinstance(found, Mapping) else None
    in_file = f" in {info.file.name}" if isinstance(info, TensorInfo) else ""
    raise CheckpointError(f"{where} has unexpected tensor {unexpected[0]!r}{in_file} "
                          f"({len(unexpected)} unexpected in all)")


# --- safetensors headers against the key table ------------------------------------------------------

def _check_headers(infos: Mapping[str, TensorInfo], expected: Mapping[str, tuple[KeyRule, int | None]],
                   state) -> None:
  """Shapes and dtypes from the headers against the abstract model, before any data is read."""
  _check_header_shapes(infos, expected, state, "config.json implies")


def _check_header_shapes(infos: Mapping[str, TensorInfo],
                         expected: Mapping[str, tuple[KeyRule, int | None]], state,
                         source: str) -> None:
  """One-line errors naming key, file and both shapes; `source` says where the expectation is from."""
  for key, (rule, layer) in expected.items():
    info, want = infos[key], _hf_shape(state, rule, layer)
    if info.shape != want:
      raise CheckpointError(f"tensor {key!r} in {info.file.name} has shape {info.shape}, but "
                            f"{source} {want}")
    if info.dtype not in ST_FLOAT:
      raise CheckpointError(f"tensor {key!r} in {info.file.name} has dtype {info.dtype}, "
                            f"expected one of {', '.join(ST_FLOAT)}")


# --- placement onto devices -------------------------------------------------------------------------

def _sharding_lookup(cfg: ModelConfig, state, mesh
                     ) -> Callable[[tuple[str, ...]], jax.sharding.Sharding]:
  """path -> target sharding: one device without a mesh, else dllm_jax.sharding's rules."""
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return lambda path: single
  from dllm_jax import sharding  # pylint: disable=g-import-not-at-top
  tree = sharding.param_shardings(state, mesh, sharding.mesh_rules(cfg, mesh))

  def lookup(path):
    leaf = _get_path(tree, path)
    return leaf.value if isinstance(leaf, nnx.Variable) else leaf
  return lookup


def _source_sharding(sharding: jax.sharding.Sharding, ndim: int,
                     transpose: bool) -> jax.sharding.Sharding:
  """Sharding of a tensor as read from the file, in the HF orientation (axes reversed when
  transposed), so the on-device transpose is local."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(*(spec[::-1] if transpose else spec)))


# Transposes and casts run on the device: XLA does them in parallel, whereas numpy's strided copy of
# a transposed bfloat16 (ml_dtypes) array runs element by element (~10 s per GB measured).

@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _convert_fn(sharding, dtype, transpose: bool):
  return jax.jit(lambda x: (x.T if transpose else x).astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _quantize_fn(shardings, mode: str, transpose: bool):
  """x -> (values, scales) of the kernel x.T (or x), each written onto its own sharding."""
  return jax.jit(lambda x: quant_lib.quantize_kernel(x, mode, transposed=transpose),
                 out_shardings=shardings)


def _scale_of(state, path: tuple) -> nnx.Variable | None:
  """The `kernel_scale` beside the kernel at `path` when that kernel is quantized."""
  if path[-1] != "kernel":
    return None
  parent = _get_path(state, path[:-1])
  return parent[quant_lib.SCALE_NAME] if quant_lib.SCALE_NAME in parent else None


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def _array_has_nonfinite(x: jax.Array) -> bool:
  """NaN/Inf anywhere in `x`, tested where it lives without copying it: the CPU backend's buffers
  are host memory, read in place by the bit test (4-7x faster there than a reduction by XLA,
  docs/checkpoints.md); on an accelerator one reduction runs on the device."""
  shards = [s for s in x.addressable_shards if s.replica_id == 0]
  if all(s.device.platform == "cpu" for s in shards):
    return any(has_nonfinite(np.asarray(s.data)) for s in shards)
  return not bool(_all_finite(x))


def _checked(x: np.ndarray, rule: KeyRule, want: tuple[int, ...], key: str, where: str
             ) -> np.ndarray:
  """The HF tensor after checking its shape against the param shape `want` ([in, out] layout)."""
  hf_want = tuple(want[::-1] if rule.transpose else want)
  if tuple(x.shape) != hf_want:
    raise CheckpointError(f"tensor {key!r} in {where} has shape {tuple(x.shape)}, expected {hf_want}")
  return x


def _fill_state(state, entries: Mapping[str, tuple[KeyRule, int | None]],
                read: Callable[[str], np.ndarray], where: Callable[[str], str],
                shard_of: Callable[[tuple[str, ...]], jax.sharding.Sharding],
                progress: Callable[[int], None] | None = None, *,
                allow_nonfinite: bool = False) -> None:
  """Reads every entry once and writes it into its own (sharded) device buffer in `state`.

  Each tensor is checked for NaN/Inf on the host buffer it was read into, before the transfer: on
  the CPU this costs a fraction of the transfer, where the same test on the device costs more
  (measured in docs/checkpoints.md), and it needs no copy of the tensor.
  """
  for key, (rule, layer) in entries.items():
    path = rule.param_path(layer)
    var = _get_path(state, path)
    shape, dtype, sharding = tuple(var.value.shape), var.value.dtype, shard_of(path)
    src_sharding = _source_sharding(sharding, len(shape), rule.transpose)
    host = _checked(read(key), rule, shape, key, where(key))
    if not allow_nonfinite and has_nonfinite(host):
      raise CheckpointError(f"tensor {key!r} in {where(key)} holds NaN or Inf values; refused "
                            "unless allow_nonfinite is set")
    host_dtype = host.dtype
    x = jax.device_put(host, src_sharding)
    del host
    scale = _scale_of(state, path)
    if scale is None:
      var.value = _convert_fn(sharding, dtype, rule.transpose)(x)
    else:  # quantized here, so only this one tensor is ever held unquantized
      scale_path = (*path[:-1], quant_lib.SCALE_NAME)
      var.value, scale.value = _quantize_fn((sharding, shard_of(scale_path)),
                                            quant_lib.mode_of(dtype), rule.transpose)(x)
    del x
    # float16's range (±65504) is far narrower than bfloat16's and float32's: a finite weight can
    # become Inf in the cast, which only the result shows.
    if (not allow_nonfinite and var.value.dtype == jnp.float16 and host_dtype != np.float16
        and _array_has_nonfinite(var.value)):
      raise CheckpointError(f"tensor {key!r} in {where(key)} overflows float16 (values beyond "
                            "±65504); load it as bfloat16 or float32, or set allow_nonfinite")
    if progress:
      progress(1)


def _zero_unfilled(state, shard_of) -> None:
  """LoRA factors absent from the checkpoint become zeros, which makes the adapter the identity."""
  for path, var in nnx.to_flat_state(state):
    if isinstance(var.value, jax.ShapeDtypeStruct):
      var.value = _zeros_fn(tuple(var.value.shape), var.value.dtype, shard_of(path))()


def model_from_tensors(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray], keys: Iterable[str],
                       *, dtype=jnp.float32, param_dtype=None, lora: LoRAConfig | None = None,
                       mesh=None, source: str = "checkpoint", allow_nonfinite: bool = False,
                       quantize: str | None = None) -> NLDModel:
  """Builds an NLDModel from HF-named tensors fetched one at a time by `get_tensor(key)`.

  With `lora`, `keys` may also hold the adapter's PEFT keys (docs/model.md §2.3, all layers);
  without them the adapter is zero (identity). At most one checkpoint tensor is held besides the
  result.
  source: what errors name as the tensors' origin (e.g. a GGUF file). allow_nonfinite: load
  tensors holding NaN or Inf instead of refusing them. quantize: None, "int8" or "fp8"
  (dllm_jax.quantize), applied to each linear kernel as it arrives.
  """
  keys = list(keys)
  naming = detect_naming(keys)
  _check_layer_count(keys, cfg.num_layers, source, "the config has num_layers")
  expected = expected_hf_keys(cfg, naming)
  if lora is not None:
    lora_expected = expected_lora_keys(cfg, lora, naming)
    if set(keys) & set(lora_expected):
      expected = {**expected, **lora_expected}
  _check_key_sets(keys, expected, source)
  model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, quantize=quantize)
  graphdef, state = nnx.split(model)
  shard_of = _sharding_lookup(cfg, state, mesh)
  _fill_state(state, expected, lambda k: np.asarray(get_tensor(k)), lambda k: source, shard_of,
              allow_nonfinite=allow_nonfinite)
  _zero_unfilled(state, shard_of)
  return nnx.merge(graphdef, state)


def model_from_state_dict(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], **kw) -> NLDModel:
  """Convenience wrapper over an in-memory {HF key: array} mapping."""
  return model_from_tensors(cfg, tensors.__getitem__, tensors.keys(), **kw)


# --- the draft LoRA adapter -----------------------------------------------------------------------

def read_adapter_config(adapter_dir: Path) -> LoRAConfig:
  """Validates a PEFT adapter_config.json as a plain LoRA on supported projections (any subset of
  `LORA_TARGETS`) and returns its rank, alpha and targets."""
  path = Path(adapter_dir) / ADAPTER_CONFIG
  if not path.is_file():
    raise CheckpointError(f"{path}: file not found")
  try:
    ac = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(ac, dict):
    raise CheckpointError(f"{path}: not a JSON object")
  targets = ac.get("target_modules")
  targets = [targets] if isinstance(targets, str) else targets
  targets_ok = (isinstance(targets, list) and bool(targets)
                and all(isinstance(t, str) and t in LORA_TARGETS for t in targets))
  checks = (
      (ac.get("peft_type", "LORA") == "LORA", f"peft_type={ac.get('peft_type')!r}, expected 'LORA'"),
      (targets_ok, f"target_modules={ac.get('target_modules')!r}, expected a non-empty subset of "
                   f"{list(LORA_TARGETS)}"),
      (not ac.get("use_dora"), "use_dora=true is not supported"),
      (not ac.get("use_rslora"), "use_rslora=true is not supported"),
      (ac.get("bias", "none") == "none", f"bias={ac.get('bias')!r}, expected 'none'"),
      (not ac.get("fan_in_fan_out"), "fan_in_fan_out=true is not supported"),
      (not ac.get("modules_to_save"), "modules_to_save is not supported"),
      (ac.get("layers_to_transform") is None, "layers_to_transform is not supported"),
      (not ac.get("rank_pattern") and not ac.get("alpha_pattern"),
       "rank_pattern/alpha_pattern are not supported"),
      (isinstance(ac.get("r"), int) and ac["r"] > 0, f"r={ac.get('r')!r}, expected a positive int"),
      (isinstance(ac.get("lora_alpha"), (int, float)) and not isinstance(ac.get("lora_alpha"), bool),
       f"lora_alpha={ac.get('lora_alpha')!r}, expected a number"),
  )
  for ok, msg in checks:
    if not ok:
      raise CheckpointError(f"{path}: {msg}")
  return LoRAConfig(rank=int(ac["r"]), alpha=float(ac["lora_alpha"]), targets=tuple(targets))


def adapter_config(lora: LoRAConfig, base_model_name_or_path: str | None = None
                   ) -> dict[str, Any]:
  """The PEFT adapter_config.json of a plain LoRA on `lora.targets`."""
  return dict(peft_type="LORA", task_type="CAUSAL_LM", r=lora.rank, lora_alpha=lora.alpha,
              target_modules=list(lora.targets), lora_dropout=0.0, bias="none", use_rslora=False,
              use_dora=False, fan_in_fan_out=False, inference_mode=True,
              base_model_name_or_path=base_model_name_or_path)


def _adapter_headers(adapter_dir: Path, cfg: ModelConfig, lora: LoRAConfig, naming: str, state
                     ) -> tuple[dict[str, TensorInfo], dict[str, tuple[KeyRule, int | None]]]:
  infos = read_safetensors_header(Path(adapter_dir) / ADAPTER_WEIGHTS)
  _check_layer_count(infos, cfg.num_layers, str(Path(adapter_dir) / ADAPTER_WEIGHTS),
                     "config.json has num_hidden_layers")
  expected = expected_lora_keys(cfg, lora, naming)
  _check_key_sets(infos, expected, str(Path(adapter_dir) / ADAPTER_WEIGHTS))
  _check_header_shapes(infos, expected, state,
                       f"the rank in {ADAPTER_CONFIG} and the widths in config.json imply")
  return infos, expected


# --- load_pretrained --------------------------------------------------------------------------------

@dataclasses.dataclass
class Pretrained:
  """A loaded checkpoint: config, ready model, where the tokenizer files are, the draft adapter."""
  config: ModelConfig
  model: NLDModel
  tokenizer_dir: Path | None
  lora: LoRAConfig | None
  path: Path


def read_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
  """The ModelConfig and raw dict of `model_dir`/config.json (CheckpointError naming the file)."""
  path = model_dir / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{model_dir}: no config.json (expected an HF model directory or one "
                          "written by scripts/convert_checkpoint.py)")
  try:
    hf = json.loads(path.read_text())
    return ModelConfig.from_hf_config(hf), hf
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
  except (json.JSONDecodeError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def _tokenizer_dir(model_dir: Path) -> Path | None:
  return model_dir if any((model_dir / n).is_file() for n in TOKENIZER_FILES) else None


def _want_lora(lora: bool | str, available: bool, where: Path) -> bool:
  if lora not in (True, False, "required"):
    raise ValueError(f"lora={lora!r}: expected True, False or 'required'")
  if lora == "required" and not available:
    raise CheckpointError(f"{where}: no draft adapter ({LORA_DIR}/) but lora='required'")
  return bool(lora) and available


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, param_dtype=None, mesh=None,
                    lora: bool | str = True, progress: bool = False,
                    allow_nonfinite: bool = False, quantize: str | None = None) -> Pretrained:
  """Loads an HF directory or a converted (orbax) directory into a ready NLDModel.

  dtype / param_dtype: compute and parameter dtypes (param_dtype defaults to dtype); the LoRA
    factors stay fp32. mesh: place each parameter on its dllm_jax.sharding target (None: one device).
  lora: True loads `linear_spec_lora/` when present, "required" fails without it, False skips it.
  progress: a bar per tensor on a terminal.
  allow_nonfinite: load tensors that hold NaN or Inf (by default each tensor is checked as it
    arrives and the first such one is refused, naming it and its file).
  quantize: None, "int8" or "fp8": every linear kernel is quantized as it arrives
    (dllm_jax.quantize); a converted directory stored quantized loads as stored with None and
    refuses any other mode.
  Every header is validated against config.json before any tensor data is read.
  """
  quant_lib.check_mode(quantize)
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory")
  if (path / CONVERTED_MARKER).is_file():
    return _load_converted(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, lora=lora,
                           allow_nonfinite=allow_nonfinite, quantize=quantize)
  cfg, _ = read_config(path)
  infos = index_checkpoint(path)
  naming = detect_naming(infos)
  _check_layer_count(infos, cfg.num_layers, f"checkpoint {path}",
                     "config.json has num_hidden_layers")
  expected = expected_hf_keys(cfg, naming)
  _check_key_sets(infos, expected, f"checkpoint {path}")
  adapter_dir = path / LORA_DIR
  lora_cfg = None
  if _want_lora(lora, adapter_dir.is_dir(), path):
    lora_cfg = read_adapter_config(adapter_dir)
  model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora_cfg,
                         quantize=quantize)
  graphdef, state = nnx.split(model)
  _check_headers(infos, expected, state)
  lora_infos, lora_expected = ({}, {})
  if lora_cfg is not None:
    lora_infos, lora_expected = _adapter_headers(adapter_dir, cfg, lora_cfg, naming, state)
  all_infos = {**infos, **lora_infos}
  shard_of = _sharding_lookup(cfg, state, mesh)
  with contextlib.ExitStack() as stack:
    read = stack.enter_context(TensorReader())
    bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      # disable=None: a bar only on a terminal, so that a log holds errors, not bar frames.
      bar = stack.enter_context(tqdm(total=len(all_infos), desc=f"loading {path.name}",
                                     unit="tensor", disable=None))
    _fill_state(state, {**expected, **lora_expected}, lambda k: read(all_infos[k]),
                lambda k: str(all_infos[k].file), shard_of, bar.update if bar else None,
                allow_nonfinite=allow_nonfinite)
  return Pretrained(cfg, nnx.merge(graphdef, state), _tokenizer_dir(path), lora_cfg, path)


# --- converted (orbax) directories -------------------------------------------------------------------

def _split_params(model: NLDModel):
  """(graphdef, lora state, base state); LoRAParam is a Param subclass, so it is filtered first."""
  return nnx.split(model, nnx.LoRAParam, nnx.Param)


def _abstract_target(tree: Mapping[str, Any], shard_of, path=()) -> dict[str, Any]:
  return {k: (_abstract_target(v, shard_of, (*path, k)) if isinstance(v, Mapping)
              else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard_of((*path, k))))
          for k, v in tree.items()}


def _copy_side_files(src: Path | None, dst: Path) -> None:
  if src is None:
    return
  for name in SIDE_FILES:
    if (src / name).is_file():
      shutil.copy2(src / name, dst / name)


def _config_json(cfg: ModelConfig, source: Path | None, naming: str = "nld",
                 dtype: str | None = None) -> dict[str, Any]:
  """Our config in HF form, over the source config.json (keeps auto_map and other extra fields)."""
  out: dict[str, Any] = {}
  if source is not None and (source / "config.json").is_file():
    out = json.loads((source / "config.json").read_text())
    out.pop("rope_scaling", None)  # superseded by rope_parameters below
  out.update(cfg.to_hf_config())
  if naming == "llama":
    out.update(architectures=["Ministral3ForCausalLM"], model_type="ministral3")
    out.pop("auto_map", None)
  else:
    out.setdefault("architectures", ["NemotronLabsDiffusionModel"])
    out.setdefault("model_type", "nemotron_labs_diffusion")
  if dtype is not None:
    out["dtype"] = dtype
    out.pop("torch_dtype", None)
  return out


def _orbax_checkpointer():
  """A synchronous orbax checkpointer that keeps about 1 GB of arrays in flight on the host.

  The default (asynchronous, 96 GB budgets) first copies every array to host memory, which would
  double the host footprint of a conversion.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=1, restore_concurrent_gb=1, save_device_host_concurrent_gb=1))


def save_converted(pre: Pretrained, out_dir: str | os.PathLike) -> Path:
  """Writes `pre` as a converted directory (orbax params + config + tokenizer files), atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = Path(out_dir).absolute()
  _, lora_state, base_state = _split_params(pre.model)
  with atomic_dir(out_dir) as tmp:
    items = [("params", base_state)] + ([("lora", lora_state)] if pre.lora is not None else [])
    with _orbax_checkpointer() as ckptr:
      for item, state in items:
        # One orbax checkpoint per parameter: orbax keeps every host copy of a call alive until
        # the call ends (measured: +0.5x the checkpoint in host memory for one whole-tree call).
        for name, (keys, value) in _flat_leaves(state.to_pure_dict()).items():
          try:
            ckptr.save(tmp / item / name, args=ocp.args.PyTreeSave(_nest(keys, value)))
          except ValueError as e:  # TensorStore reports a failed write (a full disk) as ValueError
            raise CheckpointError(f"{out_dir}: not written (saving {item}/{name}: "
                                  f"{_storage_reason(e)})") from None
    (tmp / "config.json").write_text(json.dumps(_config_json(pre.config, pre.path), indent=2))
    _copy_side_files(pre.tokenizer_dir, tmp)
    marker = {"format": 1, "lora": dataclasses.asdict(pre.lora) if pre.lora else None,
              "quantize": pre.model.quantize}
    (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
  return out_dir


def _storage_reason(e: BaseException) -> str:
  """One line for an orbax/TensorStore failure: the OS error text where TensorStore gives its
  code, else the first line of the innermost cause (orbax wraps it in a 60-line `Exception`)."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip()
  code = re.search(r"\[os_error_code='(\d+)'\]", text)
  return os.strerror(int(code.group(1))) if code else (text.splitlines() or [type(e).__name__])[0]


def _flat_leaves(tree: Mapping[str, Any]) -> dict[str, tuple[list[str], Any]]:
  """{"encoder.layers.mlp.up_proj.kernel": (path keys, leaf)} of a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(k.key) for k in path]
    out[".".join(keys)] = (keys, leaf)
  return out


def _nest(keys: list[str], leaf) -> dict[str, Any]:
  for k in reversed(keys):
    leaf = {k: leaf}
  return leaf


def _deep_update(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
  for k, v in src.items():
    if isinstance(v, Mapping):
      _deep_update(dst.setdefault(k, {}), v)
    else:
      dst[k] = v


def _stored_params(item_dir: Path) -> list[str]:
  if not item_dir.is_dir():
    raise CheckpointError(f"{item_dir}: not found (incomplete converted directory)")
  return [p.name for p in item_dir.iterdir() if p.is_dir()]


def _check_stored(ckptr, item_dir: Path, target: Mapping[str, tuple[list[str], Any]]) -> None:
  """Parameter names and orbax-recorded shapes against the config's, before any restore."""
  _check_key_sets(_stored_params(item_dir), target, str(item_dir))
  for name, (_, want) in target.items():
    try:
      shapes = [tuple(m.shape) for m in
                jax.tree.leaves(ckptr.metadata(item_dir / name).item_metadata)]
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise CheckpointError(f"{item_dir / name}: unreadable orbax metadata "
                            f"({_storage_reason(e)})") from None
    if len(shapes) != 1:  # orbax logs and swallows a missing or damaged metadata file
      raise CheckpointError(f"{item_dir / name}: unreadable orbax metadata (a file is missing or "
                            "damaged)")
    (shape,) = shapes
    if shape != tuple(want.shape):
      raise CheckpointError(f"{item_dir}: param {name!r} has shape {shape}, but config.json "
                            f"implies {tuple(want.shape)}")


def _quantized_kernels(state) -> dict[str, tuple[tuple, tuple]]:
  """{"encoder.layers.0.mlp.up_proj.kernel": (kernel path, scale path)} of the quantized kernels."""
  return {".".join(map(str, path)): (path, (*path[:-1], quant_lib.SCALE_NAME))
          for path, _ in nnx.to_flat_state(state) if _scale_of(state, path) is not None}


def _load_converted(path: Path, *, dtype, param_dtype, mesh, lora, allow_nonfinite,
                    quantize) -> Pretrained:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    marker = json.loads((path / CONVERTED_MARKER).read_text())
    stored_lora = LoRAConfig(**marker["lora"]) if marker.get("lora") else None
    stored_quantize = quant_lib.check_mode(marker.get("quantize"))
  except OSError as e:
    raise CheckpointError(f"{path / CONVERTED_MARKER}: cannot read ({e.strerror or e})") from None
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path / CONVERTED_MARKER}: corrupt ({e!r})") from None
  cfg, _ = read_config(path)
  _check_layer_count(_stored_params(path / "params"), cfg.num_layers, str(path / "params"),
                     "config.json has num_hidden_layers")
  lora_cfg = stored_lora if _want_lora(lora, stored_lora is not None, path) else None
  if quantize is None:  # nothing to go back to: quantized weights load as stored
    quantize = stored_quantize
  elif stored_quantize not in (None, quantize):
    raise CheckpointError(f"{path}: stores {stored_quantize} weights but quantize={quantize!r} "
                          f"was asked (load it with {stored_quantize!r} or None)")
  model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora_cfg,
                         quantize=quantize)
  graphdef, lora_state, base_state = _split_params(model)
  _, full_state = nnx.split(model)
  shard_of = _sharding_lookup(cfg, full_state, mesh)
  # Unquantized kernels stored, quantized ones wanted: each is quantized as it is restored.
  to_quantize = _quantized_kernels(full_state) if stored_quantize != quantize else {}
  stored_model = model if not to_quantize else abstract_model(
      cfg, dtype=dtype, param_dtype=param_dtype, lora=lora_cfg, quantize=stored_quantize)
  _, stored_lora_state, stored_base_state = _split_params(stored_model)
  items = [("params", base_state)] + ([("lora", lora_state)] if lora_cfg is not None else [])
  stored = [stored_base_state] + ([stored_lora_state] if lora_cfg is not None else [])
  targets = [_flat_leaves(_abstract_target(state.to_pure_dict(), shard_of)) for state in stored]
  with _orbax_checkpointer() as ckptr:
    for (item, _), target in zip(items, targets):  # all checks before any restore
      _check_stored(ckptr, path / item, target)
    for (item, state), target in zip(items, targets):
      restored: dict[str, Any] = {}
      for name, (keys, leaf) in target.items():
        one = _nest(keys, leaf)
        try:
          value = ckptr.restore(path / item / name, args=ocp.args.PyTreeRestore(
              item=one, restore_args=ocp.checkpoint_utils.construct_restore_args(one)))
        except Exception as e:  # pylint: disable=broad-exception-caught  # orbax raises Exception
          raise CheckpointError(f"{path / item}: cannot restore param {name!r} "
                                f"({_storage_reason(e)})") from None
        # Checked where it landed (sharded): fetching it from an accelerator would copy it.
        if not allow_nonfinite and _array_has_nonfinite(jax.tree.leaves(value)[0]):
          raise CheckpointError(f"{path / item}: param {name!r} holds NaN or Inf values as "
                                f"{jnp.dtype(leaf.dtype).name}; refused unless allow_nonfinite "
                                "is set")
        if name in to_quantize:
          kernel_path, scale_path = to_quantize[name]
          values, scale = _quantize_fn((shard_of(kernel_path), shard_of(scale_path)), quantize,
                                       False)(jax.tree.leaves(value)[0])
          value = _nest(keys, values)
          _deep_update(restored, _nest([*keys[:-1], quant_lib.SCALE_NAME], scale))
        _deep_update(restored, value)
      nnx.replace_by_pure_dict(state, restored)
  return Pretrained(cfg, nnx.merge(graphdef, lora_state, base_state), _tokenizer_dir(path),
                    lora_cfg, path)


# --- export to HF ----------------------------------------------------------------------------------

def _export_entries(state, entries: Mapping[str, tuple[KeyRule, int | None]], dtype):
  """(key, dtype, HF shape, produce) per tensor; produce() fetches one tensor at a time."""
  out = []
  for key, (rule, layer) in entries.items():
    var = _get_path(state, rule.param_path(layer))
    out_dtype = np.dtype(var.value.dtype if dtype is None else dtype)

    def produce(var=var, rule=rule, out_dtype=out_dtype):
      x = var.value
      x = x.T if rule.transpose else x  # on the device: see the note above _zeros_fn
      return np.asarray(jax.device_get(x.astype(out_dtype)))
    out.append((key, out_dtype, _hf_shape(state, rule, layer), produce))
  return out


def write_peft_adapter(model: NLDModel, adapter_dir: Path, *, naming: str = "nld",
                       base_model_name_or_path: str | None = None) -> None:
  """Writes the model's adapter in PEFT format (docs/model.md §2.3) into the existing `adapter_dir`:
  adapter_config.json and adapter_model.safetensors (fp32 factors, key table order)."""
  _, state = nnx.split(model)
  write_safetensors(adapter_dir / ADAPTER_WEIGHTS,
                    _export_entries(state, expected_lora_keys(model.cfg, model.lora, naming),
                                    np.float32))
  (adapter_dir / ADAPTER_CONFIG).write_text(
      json.dumps(adapter_config(model.lora, base_model_name_or_path), indent=2))


def export_hf(model: NLDModel, out_dir: str | os.PathLike, *, naming: str = "nld", dtype=None,
              source_dir: str | os.PathLike | None = None) -> Path:
  """Writes an HF-layout directory: config.json, model.safetensors and, when the model carries the
  draft adapter, `linear_spec_lora/` in PEFT format. Atomic: nothing appears at `out_dir` unless
  everything was written.

  naming: "nld" (`encoder.*`, `diffusion_head.weight`) or "llama" (`model.*`, `lm_head.weight`,
    loadable by transformers' Ministral3ForCausalLM). dtype: tensor dtype (default: the params').
  source_dir: an HF directory whose config.json extras (auto_map, ...) and tokenizer files to keep.
  """
  if naming not in NAMING:
    raise ValueError(f"naming={naming!r}: expected one of {', '.join(NAMING)}")
  if model.quantize:
    raise ValueError(f"the model holds {model.quantize}-quantized kernels; export the "
                     "unquantized model (load it with quantize=None)")
  cfg = model.cfg
  source = Path(source_dir) if source_dir is not None else None
  _, state = nnx.split(model)
  base = _export_entries(state, expected_hf_keys(cfg, naming), dtype)
  with atomic_dir(Path(out_dir)) as tmp:
    write_safetensors(tmp / WEIGHTS_NAME, base)
    (tmp / "config.json").write_text(json.dumps(
        _config_json(cfg, source, naming, ST_TO_HF_DTYPE[NP_TO_ST[base[0][1]]]), indent=2))
    _copy_side_files(source, tmp)
    if model.lora is not None:
      (tmp / LORA_DIR).mkdir()
      write_peft_adapter(model, tmp / LORA_DIR, naming=naming)
  return Path(out_dir).absolute()
