"""Export of a trained adapter: in PEFT format (docs/model.md §2.3), as the NLD repos ship the draft
LoRA, or merged into the base weights when it was trained as a fine-tuning delta."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from dllm_jax.atomic_files import atomic_dir
from dllm_jax.checkpoint import write_peft_adapter
from dllm_jax.model import LORA_TARGETS, NLDModel, lora_linears
from dllm_jax.training.optim import trainable_filter


def export_peft_adapter(model: NLDModel, out_dir: str | os.PathLike,
                        base_model_name_or_path: str | None = None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors into `out_dir` (replacing it); the
  directory appears complete or not at all (written next to it, then renamed)."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to export")
  with atomic_dir(out_dir, replace=True) as tmp:
    write_peft_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path)


def merge_lora(model: NLDModel) -> NLDModel:
  """A copy of `model` without an adapter whose kernels are W + scale * a @ b: what every forward
  with the adapter computes, as plain weights (fp32 sum, cast back to the kernel's dtype)."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to merge")
  merged = {}
  for target, i, linear in lora_linears(model):
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
