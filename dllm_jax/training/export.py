"""Export of a trained draft adapter in PEFT format (spec §2.3), as the NLD repos ship it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from safetensors.numpy import save_file

from dllm_jax.model import NLDModel

LORA_KEY = "base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_{ab}.weight"


def peft_adapter_tensors(model: NLDModel) -> dict[str, np.ndarray]:
  """{PEFT key: fp32 array}: lora_A [r, in] = a.T and lora_B [out, r] = b.T per layer."""
  if model.lora is None:
    raise ValueError("the model has no LoRA adapter to export")
  attn = model.encoder.layers.self_attn
  a = np.asarray(attn.o_lora_a[...], np.float32)  # [L, in, r]
  b = np.asarray(attn.o_lora_b[...], np.float32)  # [L, r, out]
  out = {}
  for i in range(model.cfg.num_layers):
    out[LORA_KEY.format(i=i, ab="A")] = np.ascontiguousarray(a[i].T)
    out[LORA_KEY.format(i=i, ab="B")] = np.ascontiguousarray(b[i].T)
  return out


def export_peft_adapter(model: NLDModel, out_dir: str | os.PathLike,
                        base_model_name_or_path: str | None = None) -> None:
  """Writes adapter_config.json + adapter_model.safetensors into `out_dir` (replacing it); the
  directory appears complete or not at all (written next to it, then renamed)."""
  tensors = peft_adapter_tensors(model)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "target_modules": ["o_proj"],
      "r": model.lora.rank, "lora_alpha": model.lora.alpha, "lora_dropout": 0.0, "bias": "none",
      "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path,
  }
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
  try:
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    _apply_umask(tmp)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _apply_umask(directory: str) -> None:
  """Gives the temp dir (mkdtemp: 0700) and its files the permissions a plain mkdir/open would."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)
