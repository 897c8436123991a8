"""Teach the embedded default SmolLM2-135M-Instruct to self-speculate: a draft LoRA trained on the
model's own answers, base frozen (CPU-sized).

python scripts/train.py --config=configs/train_smollm2_drafter.py \
    --config.data.prompts=prompts.jsonl --config.data.path=/tmp/smollm2_self.jsonl \
    --config.export.hf_dir=/tmp/smollm2-drafter

The base model stays the verifier, so speculative output is exactly its greedy AR output; the
adapter (every projection, rank 32) learns to fill a 32-token block of MASK (the unused control
token <empty_output>, id 16) bidirectionally against the causal prefix. The export is an
NLD-layout directory (fp32 base + linear_spec_lora/ + tokenizer files) that scripts/generate.py
runs in spec mode.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  c = _common["train_config"]({
      "model.init_from": "smollm2", "model.param_dtype": "float32", "model.dtype": "float32",
      "model.lora_rank": 32, "model.lora_alpha": 64.0,
      "model.lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
      "objective.paradigm": "draft", "train.trainable": "lora",
      "data.seq_len": 128, "data.batch_size": 4, "data.gen_max_new_tokens": 96,
      "data.gen_batch_size": 16, "optim.peak_lr": 1e-3, "optim.final_lr": 1e-4,
      "optim.weight_decay": 0.0, "optim.warmup_steps": 10, "optim.decay_steps": 100,
      "train.steps": 300, "train.log_every": 10, "export.hf_dtype": "float32",
  })
  c.model.overrides.mask_token_id = 16
  c.model.overrides.block_size = 32
  return c
