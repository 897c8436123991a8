"""llama.cpp (through llama-cpp-python) on the same GGUF weights: the CPU reference for AR decoding.

The embedded SmolLM2 GGUF is Q4_1. For an equal-precision race it is rewritten once with every
2-D weight dequantized to F32, which are exactly the fp32 values dllm_jax loads (dllm_jax/gguf.py
dequantizes with the same gguf package), and, as a reference column, requantized from those
values to Q8_0. Norm weights are F32 in the source already and stay so.

llama-cpp-python is an optional benchmark dependency (`pip install -e .[bench]`): it builds
llama.cpp from source, about 25 minutes on a 2-core machine. Without it `available()` is False and
the benchmark leaves the column out.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

import gguf
import numpy as np

# Tensor types the copies are written in, by the names the benchmark config uses.
QUANT_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}
# general.file_type of the copies (llama.cpp's LLAMA_FTYPE_ALL_F32 / LLAMA_FTYPE_MOSTLY_Q8_0).
_FILE_TYPES = {"F32": 0, "Q8_0": 7}


def available() -> bool:
  return importlib.util.find_spec("llama_cpp") is not None


def requantized_copy(src: str, quant: str, out_dir: str) -> str:
  """Path of `src` rewritten with its weight matrices in `quant` (F32 or Q8_0); written once into
  `out_dir` and reused while the source is unchanged (same name, size and mtime)."""
  if quant not in QUANT_TYPES:
    raise ValueError(f"llama.cpp quant {quant!r}: expected one of {list(QUANT_TYPES)}")
  st = os.stat(src)
  stem = os.path.splitext(os.path.basename(src))[0]
  dst = os.path.join(out_dir, f"{stem}-{st.st_size}-{int(st.st_mtime)}-{quant}.gguf")
  if os.path.exists(dst):
    return dst
  os.makedirs(out_dir, exist_ok=True)
  reader = gguf.GGUFReader(src)
  arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
  tmp = f"{dst}.partial-{os.getpid()}"
  writer = gguf.GGUFWriter(tmp, arch)
  for field in reader.fields.values():
    # The writer adds the architecture and GGUF.* itself; the file type changes.
    if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) \
        or field.name.startswith("GGUF."):
      continue
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
  writer.add_file_type(_FILE_TYPES[quant])
  for t in reader.tensors:
    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if values.ndim < 2 or quant == "F32":
      writer.add_tensor(t.name, values)
    else:
      q = gguf.quants.quantize(values, QUANT_TYPES[quant])
      writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=QUANT_TYPES[quant])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(tmp, dst)
  return dst


@dataclasses.dataclass
class Run:
  tokens: list[int]
  prefill_seconds: float  # prompt evaluation and the first token
  decode_seconds: float   # the remaining len(tokens) - 1 forwards, each with its sampling


class LlamaCppAR:
  """Greedy AR decoding of one prompt with llama.cpp; no EOS stop (every run decodes `n_new`)."""

  def __init__(self, path: str, threads: int, n_ctx: int):
    import llama_cpp  # pylint: disable=g-import-not-at-top
    self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, verbose=False)

  def generate(self, prompt: list[int], n_new: int) -> Run:
    tokens = []
    start = time.perf_counter()
    first = start
    for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
      tokens.append(int(token))
      if len(tokens) == 1:
        first = time.perf_counter()
      if len(tokens) == n_new:
        break
    end = time.perf_counter()
    return Run(tokens, first - start, end - first)

  def close(self) -> None:
    self.llm.close()


def version() -> str:
  import llama_cpp  # pylint: disable=g-import-not-at-top
  return llama_cpp.__version__
