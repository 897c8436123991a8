"""Export of a trained adapter: in PEFT format (spec §2.3), as the NLD repos ship the draft LoRA, or
merged into the base weights when it was trained as a fine-tuning delta."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dllm_jax.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, atomic_dir
from dllm_jax.model import LORA_TARGETS, NLDModel, lora_linears
from dllm_jax.training.optim import trainable_filter

LORA_KEY = "base_model.model.encoder.layers.{i}.{module}.{target}.lora_{ab}.weight"


def peft_adapter_tensors(model: NLDModel) -> dict[str, np.ndarray]:
  """{PEFT key: fp32 array}: lora_A [r, in] = a.T and lora_B [out, r] = b.T per target and layer."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to export")
  out = {}
  for target, linears in lora_linears(model).items():
    for i, linear in enumerate(linears):
      names = dict(i=i, module=LORA_TARGETS[target], target=target)
      a = np.asarray(linear.lora_a[...], np.float32)  # [in, r]
      b = np.asarray(linear.lora_b[...], np.float32)  # [r, out]
      out[LORA_KEY.format(ab="A", **names)] = np.ascontiguousarray(a.T)
      out[LORA_KEY.format(ab="B", **names)] = np.ascontiguousarray(b.T)
  return out


def export_peft_adapter(model: NLDModel, out_dir: str | os.PathLike,
                        base_model_name_or_path: str | None = None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors into `out_dir` (replacing it); the
  directory appears complete or not at all (written next to it, then renamed)."""
  tensors = peft_adapter_tensors(model)
  with atomic_dir(out_dir, replace=True) as tmp:
    with open(tmp / ADAPTER_CONFIG, "w") as f:
      json.dump(adapter_config(model.lora, base_model_name_or_path), f, indent=2)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def merge_lora(model: NLDModel) -> NLDModel:
  """A copy of `model` without an adapter whose kernels are W + scale * a @ b: what every forward
  with the adapter computes, as plain weights (fp32 sum, cast back to the kernel's dtype)."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to merge")
  merged = {}
  for target, linears in lora_linears(model).items():
    for i, linear in enumerate(linears):
      kernel = linear.kernel[...]
      delta = linear.lora_a[...] @ linear.lora_b[...]
      merged[i, target] = (kernel.astype(jnp.float32)
                           + linear.lora_scale * delta).astype(kernel.dtype)
  plain = nnx.eval_shape(lambda: NLDModel(model.cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(plain)
  _, base_state, _ = nnx.split(model, trainable_filter("full"), ...)  # every non-adapter weight
  values = nnx.to_pure_dict(base_state)
  for (i, target), kernel in merged.items():
    values["encoder"]["layers"][i][LORA_TARGETS[target]][target]["kernel"] = kernel
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)
