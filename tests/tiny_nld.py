"""A tiny random NLD checkpoint directory for tokenizer and CLI tests, built from scratch.

The tokenizer mirrors the NLD instruct layout of docs/model.md §7: ids 0/1/2 = <unk>/<s>/</s>, 10/11
= start/end of turn, 12/13 = <think>/</think>, 100 = [MASK]; a word-level vocabulary fills the rest.
The chat template is ChatML-shaped like the NLD one: an empty system turn when none is given, no
BOS, and an empty think pair after the generation prompt unless thinking is enabled.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from dllm_jax.checkpoint import hf_tensor_shapes

SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>", 12: "<think>",
           13: "</think>", 100: "[MASK]"}
WORDS = ["\n", "system", "user", "assistant", "the", "sea", "is", "blue", "what", "why", "sky",
         "a", "haiku", "about", "write", "and", "of", "to", "hello", "world", "?", ".", ","]

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking %}{{ '<think>' }}{%- else %}{{ '<think></think>' }}{%- endif %}"
    "{%- endif %}")


def vocab(size: int = 256) -> dict[str, int]:
  """token -> id: the special ids above, the words from id 14, filler tokens elsewhere."""
  out = {tok: i for i, tok in SPECIAL.items()}
  free = [i for i in range(size) if i not in SPECIAL and i >= 14]
  for word, i in zip(WORDS, free):
    out[word] = i
  for i in range(size):
    if i not in out.values():
      out[f"<tok{i}>"] = i
  return out


def write_tokenizer(directory: pathlib.Path, size: int = 256) -> None:
  """tokenizer.json (word level, newline as a token), tokenizer_config.json, chat_template.jinja."""
  from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel(vocab(size), unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="removed", invert=True)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL.values()])
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True}))
  (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_checkpoint(directory: pathlib.Path, cfg=None, seed: int = 0) -> pathlib.Path:
  """config.json + model.safetensors (random fp32 weights) + tokenizer files."""
  from safetensors.numpy import save_file
  from dllm_jax.config import preset
  cfg = preset("tiny") if cfg is None else cfg
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(cfg.to_hf_config()))
  rng = np.random.default_rng(seed)
  tensors = {}
  for key, shape in hf_tensor_shapes(cfg).items():
    if key.endswith("norm.weight"):
      tensors[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      tensors[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  save_file(tensors, str(directory / "model.safetensors"))
  write_tokenizer(directory, cfg.vocab_size)
  return directory
