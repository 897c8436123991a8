"""Export of a trained adapter in PEFT format (spec §2.3), as the NLD repos ship the draft LoRA."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from dllm_jax.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, atomic_dir
from dllm_jax.model import LORA_TARGETS, NLDModel, lora_linears

LORA_KEY = "base_model.model.encoder.layers.{i}.{module}.{target}.lora_{ab}.weight"


def peft_adapter_tensors(model: NLDModel) -> dict[str, np.ndarray]:
  """{PEFT key: fp32 array}: lora_A [r, in] = a.T and lora_B [out, r] = b.T per target and layer."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to export")
  out = {}
  for target, linear in lora_linears(model).items():
    a = np.asarray(linear.lora_a[...], np.float32)  # [L, in, r]
    b = np.asarray(linear.lora_b[...], np.float32)  # [L, r, out]
    for i in range(model.cfg.num_layers):
      names = dict(i=i, module=LORA_TARGETS[target], target=target)
      out[LORA_KEY.format(ab="A", **names)] = np.ascontiguousarray(a[i].T)
      out[LORA_KEY.format(ab="B", **names)] = np.ascontiguousarray(b[i].T)
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
