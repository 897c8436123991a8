"""Training data: jsonl of chat conversations or plain text -> packed fixed-length rows.

Each jsonl line is either {"messages": [{"role": ..., "content": ...}, ...]} (loss only on the
assistant turns, as rendered by the chat template) or {"text": "..."} (loss on every token, followed
by EOS). Examples are concatenated and cut into rows of `seq_len` tokens ("packing"); the last row
is padded with `pad_id` at loss_mask 0. Batches are a pure function of the batch index, so the data
position of a resumed run is one integer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import json
import os

import numpy as np

Encode = Callable[[str], Sequence[int]]
# (messages, add_generation_prompt) -> rendered text, as a chat template does.
RenderChat = Callable[[list[dict], bool], str]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a jsonl file; a malformed line raises an error naming file and line."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(ex, dict) or not ({"messages", "text"} & ex.keys()):
        raise ValueError(f"{path}:{lineno}: expected an object with 'messages' or 'text'")
      examples.append(ex)
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def tokenize_chat(messages: list[dict], encode: Encode,
                  render_chat: RenderChat) -> list[tuple[list[int], list[int]]]:
  """(ids, loss mask) examples of a conversation; the mask is 1 on assistant responses.

  Assistant turn i is trained as the model sees it at inference: the generation prompt after
  messages[:i], then the response, i.e. what rendering messages[:i+1] adds beyond the part it
  shares with that prompt (the content and its end-of-turn token; a template whose generation
  prompt ends in an empty think pair that history turns omit is handled this way). Turns share
  one example while each prompt extends the tokens so far; a template that re-renders earlier
  turns differently starts a new example at that turn.
  """
  examples: list[tuple[list[int], list[int]]] = []
  ids: list[int] = []
  mask: list[int] = []
  for i, msg in enumerate(messages):
    if msg.get("role") != "assistant":
      continue
    prompt = list(encode(render_chat(messages[:i], True)))
    upto = list(encode(render_chat(messages[:i + 1], False)))
    shared = 0
    while shared < min(len(prompt), len(upto)) and prompt[shared] == upto[shared]:
      shared += 1
    response = upto[shared:]
    if prompt[:len(ids)] != ids:
      examples.append((ids, mask))
      ids, mask = [], []
    mask = mask + [0] * (len(prompt) - len(ids)) + [1] * len(response)
    ids = prompt + response
  if ids:
    examples.append((ids, mask))
  return examples


def tokenize_example(ex: dict, encode: Encode, render_chat: RenderChat | None,
                     eos_id: int) -> list[tuple[list[int], list[int]]]:
  if "messages" in ex:
    if render_chat is None:
      raise ValueError("chat example found but the tokenizer has no chat template")
    return tokenize_chat(ex["messages"], encode, render_chat)
  ids = list(encode(ex["text"])) + [eos_id]
  return [(ids, [1] * len(ids))]


def pack(examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates (ids, loss_mask) pairs and cuts them into [rows, seq_len] int32 arrays."""
  ids = np.concatenate([np.asarray(i, np.int32) for i, _ in examples])
  mask = np.concatenate([np.asarray(m, np.int32) for _, m in examples])
  rows = -(-len(ids) // seq_len)
  pad = rows * seq_len - len(ids)
  ids = np.concatenate([ids, np.full((pad,), pad_id, np.int32)])
  mask = np.concatenate([mask, np.zeros((pad,), np.int32)])
  return ids.reshape(rows, seq_len), mask.reshape(rows, seq_len)


class PackedDataset:
  """Packed rows served in a fresh seeded permutation each epoch."""

  def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, seed: int = 0):
    if tokens.shape != loss_mask.shape or tokens.ndim != 2:
      raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal 2-D")
    self.tokens, self.loss_mask, self.seed = tokens, loss_mask, seed

  @classmethod
  def from_jsonl(cls, path: str | os.PathLike, *, encode: Encode, render_chat: RenderChat | None,
                 eos_id: int, pad_id: int, seq_len: int, seed: int = 0) -> PackedDataset:
    examples = [pair for ex in read_jsonl(path)
                for pair in tokenize_example(ex, encode, render_chat, eos_id)]
    if not any(any(mask) for _, mask in examples):
      raise ValueError(f"{path}: no tokens to train on (chat examples without assistant turns?)")
    return cls(*pack(examples, seq_len, pad_id), seed=seed)

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def rows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start .. start+count-1 of the endless stream of epochs."""
    n = len(self)
    idx = np.arange(start, start + count)
    perms = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in set(idx // n)}
    order = np.array([perms[i // n][i % n] for i in idx])
    return self.tokens[order], self.loss_mask[order]

  def batch(self, index: int, micro_batches: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `index` as [micro_batches, batch_size, seq_len] tokens and loss mask."""
    per_step = micro_batches * batch_size
    tok, mask = self.rows(index * per_step, per_step)
    shape = (micro_batches, batch_size, self.tokens.shape[1])
    return tok.reshape(shape), mask.reshape(shape)
