"""Teach the embedded default SmolLM2-135M-Instruct to self-speculate: a draft LoRA trained on the
model's own answers, base frozen (CPU-sized, ~20 minutes on 2 cores).

python scripts/train.py --config=configs/train_smollm2_drafter.py \
    --config.data.prompts=configs/prompts/smollm2_train.jsonl \
    --config.data.path=/tmp/smollm2_self.jsonl --config.export.hf_dir=/tmp/smollm2-drafter
python scripts/eval_modes.py --checkpoint=/tmp/smollm2-drafter \
    --prompts=configs/prompts/smollm2_eval.jsonl --max_new_tokens=64

The base model stays the verifier, so speculative output is exactly its greedy AR output; the
adapter learns to fill an 8-token block of MASK bidirectionally against the causal prefix. The
export is an NLD-layout directory (fp32 base + linear_spec_lora/ + tokenizer files, block_size 8)
that scripts/generate.py runs in spec mode.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  return _common["smollm2_cpu_lora"]("draft")
