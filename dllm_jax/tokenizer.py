"""Text <-> token ids: an HF `tokenizer.json` (the `tokenizers` package) plus the chat template (jinja2).

Chat prompts are rendered with the checkpoint's own template and tokenized without adding special
tokens, as transformers' `apply_chat_template` does; for NLD instruct checkpoints this gives the
docs/model.md §7.2 layout (empty system turn, no BOS, ids 10/11 around turns, the think pair). Raw
text (base models) gets the BOS the tokenizer config asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import datetime
import json
import os
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

Message = dict[str, str]

THINK_END = "</think>"


@dataclasses.dataclass
class TextTokenizer:
  """A `tokenizers.Tokenizer` with the chat template and special-token settings of a checkpoint."""
  tokenizer: Tokenizer
  chat_template: str | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  add_bos_token: bool = True  # for raw text; chat templates write their own prefix
  special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # template variables

  @classmethod
  def from_dir(cls, path: str, *, bos_token_id: int | None = None,
               eos_token_id: int | None = None) -> TextTokenizer:
    """Reads `tokenizer.json`, `chat_template.jinja` and `tokenizer_config.json` from `path`.

    bos/eos ids default to the tokenizer config's tokens; the model config's ids (passed in) win.
    """
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise FileNotFoundError(f"tokenizer file {tok_path} not found")
    try:
      tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # the tokenizers package raises bare Exceptions on bad JSON
      raise ValueError(f"{tok_path}: cannot be read as a tokenizer ({e})") from None
    tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    template_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_path):
      with open(template_path, encoding="utf-8") as f:
        template = f.read()
    else:
      template = _template_from_config(tok_cfg.get("chat_template"))
    special = {name: _token_content(tok_cfg[name]) for name in
               ("bos_token", "eos_token", "pad_token", "unk_token") if tok_cfg.get(name)}
    if bos_token_id is None and "bos_token" in special:
      bos_token_id = tokenizer.token_to_id(special["bos_token"])
    if eos_token_id is None and "eos_token" in special:
      eos_token_id = tokenizer.token_to_id(special["eos_token"])
    return cls(tokenizer=tokenizer, chat_template=template, bos_token_id=bos_token_id,
               eos_token_id=eos_token_id, add_bos_token=bool(tok_cfg.get("add_bos_token", True)),
               special_tokens=special)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(token_id)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` with no special tokens added (special-token strings in it still match)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def encode_raw(self, text: str) -> list[int]:
    """Raw-text prompt for base models: BOS (when the tokenizer config asks for it) + text."""
    ids = self.encode(text)
    if self.add_bos_token and self.bos_token_id is not None:
      ids = [self.bos_token_id, *ids]
    return ids

  def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                  enable_thinking: bool = False, **extra: Any) -> str:
    """The prompt text the checkpoint's chat template produces for `messages`."""
    if not self.chat_template:
      raise ValueError("the tokenizer has no chat template (use raw-text mode for base models)")
    template = _jinja_env().from_string(self.chat_template)
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, **self.special_tokens, **extra)

  def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                  enable_thinking: bool = False) -> list[int]:
    """Ids of the rendered chat prompt; the template writes every special token itself."""
    return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                        enable_thinking=enable_thinking))

  def encode_prompt(self, example: dict) -> list[int]:
    """A prompt-file line: {"messages": [...]} through the chat template, or {"text": ...} raw."""
    if "messages" in example:
      return self.encode_chat(example["messages"])
    return self.encode_raw(example["text"])

  def end_think_token_id(self) -> int | None:
    """The `</think>` id when it is a single token of the vocabulary (docs/model.md §5.4), else
    None."""
    return self.token_to_id(THINK_END)


class StreamDecoder:
  """Turns committed token ids into printable text increments.

  Byte-level BPE can split one UTF-8 character across tokens; text ending in U+FFFD is held back
  until the character is complete, so the terminal never shows a replacement character mid-stream.
  """

  def __init__(self, tokenizer: TextTokenizer):
    self._tok = tokenizer
    self._ids: list[int] = []
    self._printed = 0

  def push(self, ids: Iterable[int]) -> str:
    self._ids.extend(int(i) for i in ids)
    text = self._tok.decode(self._ids)
    if text.endswith("\ufffd"):
      return ""
    new, self._printed = text[self._printed:], len(text)
    return new

  def flush(self) -> str:
    text = self._tok.decode(self._ids)
    new, self._printed = text[self._printed:], len(text)
    return new


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from None


def _token_content(tok: str | dict[str, Any]) -> str:
  return tok["content"] if isinstance(tok, dict) else tok


def _template_from_config(value: str | list[dict[str, str]] | None) -> str | None:
  """`chat_template` in tokenizer_config.json is a string or a list of named templates."""
  if isinstance(value, list):
    named = {t["name"]: t["template"] for t in value}
    return named.get("default")
  return value


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _jinja_env() -> jinja2.Environment:
  """The environment transformers renders chat templates in (sandboxed, trimmed blocks)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii, **kw)
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env
