"""TextTokenizer: chat layout of docs/model.md §7.2 on a hand-made NLD-shaped tokenizer, raw text,
streaming."""

import json

import pytest

from dllm_jax.tokenizer import StreamDecoder, TextTokenizer
from tiny_nld import write_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  write_tokenizer(d)
  return TextTokenizer.from_dir(str(d))


def _ids(tok, words):
  return [tok.token_to_id(w) for w in words]


def test_chat_layout_matches_spec(tok):
  """Empty system turn, no BOS, 10/11 around turns, empty think pair (docs/model.md §7.2)."""
  user = "what is the sea ?"
  ids = tok.encode_chat([{"role": "user", "content": user}])
  nl, = _ids(tok, ["\n"])
  system, user_id, assistant = _ids(tok, ["system", "user", "assistant"])
  expected = [10, system, nl, 11, nl,
              10, user_id, nl, *_ids(tok, user.split()), 11, nl,
              10, assistant, nl, 12, 13]
  assert ids == expected
  assert 1 not in ids  # no BOS


def test_chat_thinking_and_multiturn(tok):
  msgs = [{"role": "system", "content": "a haiku"}, {"role": "user", "content": "hello"},
          {"role": "assistant", "content": "world"}, {"role": "user", "content": "why"}]
  ids = tok.encode_chat(msgs, enable_thinking=True)
  nl = tok.token_to_id("\n")
  assert ids[:2] == [10, tok.token_to_id("system")]
  assert ids[3:5] == _ids(tok, ["a", "haiku"])  # the given system turn replaces the empty one
  assert ids.count(10) == 5 and ids.count(11) == 4
  assert ids[-3:] == [tok.token_to_id("assistant"), nl, 12]  # thinking on: open <think> only
  assert tok.encode_chat(msgs[:2], add_generation_prompt=False)[-2:] == [11, nl]


def test_raw_text_gets_bos(tok):
  assert tok.encode_raw("the sea is blue") == [1, *_ids(tok, ["the", "sea", "is", "blue"])]


def test_special_token_ids_and_decode(tok):
  assert tok.bos_token_id == 1 and tok.eos_token_id == 11
  assert tok.end_think_token_id() == 13
  ids = [10, *_ids(tok, ["hello", "world"]), 11]
  assert tok.decode(ids) == "hello world"
  assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|> hello world <|im_end|>"


def test_chat_template_from_tokenizer_config(tmp_path):
  """Without chat_template.jinja the template comes from tokenizer_config.json."""
  write_tokenizer(tmp_path)
  template = (tmp_path / "chat_template.jinja").read_text()
  (tmp_path / "chat_template.jinja").unlink()
  cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
  tok = TextTokenizer.from_dir(str(tmp_path))
  assert tok.encode_chat([{"role": "user", "content": "hello"}])[-2:] == [12, 13]


def test_missing_tokenizer_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    TextTokenizer.from_dir(str(tmp_path))


def test_stream_decoder_holds_back_partial_utf8():
  """A multi-byte character split over two byte-level tokens is printed once, whole."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  byte_chars = pre_tokenizers.ByteLevel.alphabet()
  vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
  t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  tok = TextTokenizer(t)
  ids = t.encode("sé!").ids  # 'é' is two bytes, two tokens
  assert len(ids) == 4
  stream = StreamDecoder(tok)
  pieces = [stream.push([i]) for i in ids]
  assert pieces == ["s", "", "é", "!"]
  assert stream.flush() == ""
