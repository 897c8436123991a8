"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (fp32, CPU).

transformers dequantizes the same file independently (its own GGUF reader, tokenizer converter
and q/k un-permutation), so agreement here checks our dequantization, name mapping, q/k row order,
tied head, RoPE and tokenizer end to end.
"""

import contextlib
import functools
import os

import numpy as np
import pytest

from dllm_jax import gguf as gguf_lib

PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def path():
  try:
    return gguf_lib.embedded_default_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def ckpt(path):
  return gguf_lib.load_gguf(path)


@pytest.fixture(scope="module")
def model(ckpt):
  return gguf_lib.model_from_gguf(ckpt)


@contextlib.contextmanager
def _faster_transformers_gguf_load():
  """transformers parses the GGUF header once per `from_pretrained` part (config, tokenizer,
  weights) with gguf-py's reader, whose every metadata slice of an `np.memmap` runs memmap's
  Python-level `__getitem__` (~250k slices for a 49k vocabulary), and rebuilds gguf-py's tensor
  name table for every tensor. Both are pure speed: the reader below parses the same bytes through
  a plain ndarray view (a copy of the idea in dllm_jax/gguf.py, kept separate so the reference
  does not run the library's code), and the name table is built once per (arch, layers)."""
  gguf = pytest.importorskip("gguf")

  class Reader(gguf.GGUFReader):
    @property
    def data(self):
      return self._plain

    @data.setter
    def data(self, value):
      self._plain = value.view(np.ndarray)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, "GGUFReader", Reader)
    mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    yield


@pytest.fixture(scope="module")
def hf_tokenizer(path):
  transformers = pytest.importorskip("transformers")
  with _faster_transformers_gguf_load():
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))


def test_unpermute_inverts_llama_cpp_permute():
  """llama.cpp's convert_hf_to_gguf `permute`, transcribed, then undone."""
  rng = np.random.default_rng(0)
  n_head, head_dim, d = 3, 8, 5
  w_hf = rng.standard_normal((n_head * head_dim, d)).astype(np.float32)
  w_gguf = (w_hf.reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w_hf.shape))
  np.testing.assert_array_equal(gguf_lib.unpermute_qk(w_gguf, n_head), w_hf)
  # Row (head 0, pair 1, imaginary half) of HF sits at GGUF row 3 (interleaved pairs).
  np.testing.assert_array_equal(w_gguf[3], w_hf[head_dim // 2 + 1])


@pytest.fixture(scope="module")
def hf_model(path):
  """transformers' LlamaForCausalLM loaded from the same GGUF file, fp32."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  # One thread: on a shared 2-core machine torch's spinning worker threads are many times slower.
  torch.set_num_threads(1)
  with _faster_transformers_gguf_load():
    return transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.mark.slow
def test_config_matches_transformers(ckpt, hf_model):
  hf = hf_model.config
  cfg = ckpt.config
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
          cfg.num_kv_heads, cfg.max_position_embeddings) == (
              hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers,
              hf.num_attention_heads, hf.num_key_value_heads, hf.max_position_embeddings)
  assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
  assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
  assert cfg.tie_word_embeddings and cfg.mask_token_id is None
  assert cfg.eos_token_ids == (hf.eos_token_id,)


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    "Hello world!", "  leading spaces and trailing   ", "Numbers: 3.14159, 2024 and 1e-5",
    "naïve café — 東京 🙂", "def f(x):\n\treturn x**2  # square\n", "<|im_start|>user\nHi<|im_end|>",
    "can't won't it's", "",
])
def test_tokenizer_matches_transformers(ckpt, hf_tokenizer, text):
  ids = ckpt.tokenizer.encode(text)
  assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
  assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_chat_prompt_matches_transformers(ckpt, hf_tokenizer):
  ours = ckpt.tokenizer.encode_chat(PROMPT)
  ref = hf_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
  assert ours == list(ref)


def _torch_greedy(hf, ids, n):
  """Greedy decoding with the transformers model and its own KV cache."""
  import torch  # pylint: disable=g-import-not-at-top
  out, past, x = [], None, torch.tensor([ids])
  with torch.no_grad():
    for _ in range(n):
      r = hf(x, past_key_values=past, use_cache=True)
      past = r.past_key_values
      tok = int(r.logits[0, -1].argmax())
      out.append(tok)
      x = torch.tensor([[tok]])
  return out


@pytest.fixture(scope="module")
def greedy_ref(hf_model, ckpt):
  return _torch_greedy(hf_model, ckpt.tokenizer.encode_chat(PROMPT), NEW_TOKENS)


@pytest.mark.slow
def test_greedy_ar_matches_transformers(ckpt, model, greedy_ref):
  from dllm_jax.decode import AR, generate
  ids = ckpt.tokenizer.encode_chat(PROMPT)
  # EOS off on both sides, so all NEW_TOKENS ids are compared.
  res = generate(model, [ids], AR(max_new_tokens=NEW_TOKENS, eos_token_ids=()))
  assert res.tokens[0] == greedy_ref
  assert ckpt.tokenizer.decode(greedy_ref).strip()  # real text, not only special tokens


@pytest.mark.slow
def test_greedy_self_speculation_equals_ar(ckpt, model, greedy_ref):
  """Spec mode on the AR model, drafting with an id the model never produces as MASK. A third of
  the AR budget is a dozen rounds of draft and verify, enough to cross rejections; each round
  costs two forwards of the 30-layer model."""
  from dllm_jax.decode import Spec, generate
  ids = ckpt.tokenizer.encode_chat(PROMPT)
  n = NEW_TOKENS // 3
  # mask id 16 = <empty_output>, as configs/default.py
  res = generate(model, [ids], Spec(max_new_tokens=n, block_length=4, eos_token_ids=(),
                                    mask_token_id=16))
  assert res.tokens[0][:n] == greedy_ref[:n]
  assert res.nfe[0] < 2 * len(res.tokens[0]) + 2  # at most one draft + one verify per round


def test_bad_file_names_the_path(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="bad.gguf"):
    gguf_lib.load_gguf(str(bad))
