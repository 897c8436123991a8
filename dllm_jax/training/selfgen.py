"""Self-generated training data: the starting model's own greedy answers to a set of prompts.

Training on what the model itself would say keeps its behaviour while a new objective is learned:
the draft adapter learns exactly the tokens its verifier accepts, and an AR model adapted to
diffusion keeps its answers. Prompts are a jsonl file of {"messages": [...]} (chat; the answer
becomes the final assistant turn) or {"text": ...} (raw text; the continuation is appended).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from typing import Any

from dllm_jax.atomic_files import write_text_atomic
from dllm_jax.decode import AR, generate
from dllm_jax.model import NLDModel
from dllm_jax.tokenizer import TextTokenizer
from dllm_jax.training.data import read_jsonl


def self_generate(model: NLDModel, tokenizer: TextTokenizer, prompts: list[dict], *,
                  max_new_tokens: int, batch_size: int,
                  log: Callable[[str], Any] = print) -> list[dict]:
  """Training examples completed with the model's greedy autoregressive output."""
  examples = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    ids = [tokenizer.encode_prompt(p) for p in chunk]
    out = generate(model, ids, AR(max_new_tokens=max_new_tokens))
    for prompt, tokens in zip(chunk, out.tokens):
      answer = tokenizer.decode(tokens)
      if "messages" in prompt:
        examples.append({"messages": [*prompt["messages"],
                                      {"role": "assistant", "content": answer}]})
      else:
        examples.append({"text": prompt["text"] + answer})
    log(f"self-generated {len(examples)}/{len(prompts)} answers")
  return examples


def write_self_generated(prompts_path: str, out_path: str, model: NLDModel,
                         tokenizer: TextTokenizer, *, max_new_tokens: int, batch_size: int,
                         log: Callable[[str], Any] = print) -> None:
  """Writes the completed examples as jsonl; the file appears complete or not at all."""
  examples = self_generate(model, tokenizer, read_jsonl(prompts_path),
                           max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
  directory = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(directory, exist_ok=True)
  write_text_atomic(out_path, "".join(json.dumps(ex, ensure_ascii=False) + "\n"
                                      for ex in examples))
