"""A CPU-sized tri-mode adaptation of the embedded default SmolLM2-135M-Instruct: the joint
AR + diffusion objective on the model's own answers, trained as a LoRA (base frozen) that the
export merges into the weights (~35 minutes on 2 cores).

python scripts/train.py --config=configs/train_smollm2_trimode_cpu.py \
    --config.data.prompts=configs/prompts/smollm2_train.jsonl \
    --config.data.path=/tmp/smollm2_self.jsonl --config.export.hf_dir=/tmp/smollm2-trimode
python scripts/eval_modes.py --checkpoint=/tmp/smollm2-trimode \
    --prompts=configs/prompts/smollm2_eval.jsonl --max_new_tokens=64 \
    --diffusion_thresholds=0.9,0.5

The result is a plain NLD-layout directory (fp32, tokenizer files, block_size 8, no
linear_spec_lora/) that decodes in all three modes, self-speculation drafting with the model's own
weights as NLD does without its LoRA. configs/train_smollm2_trimode.py is the full fine-tuning run
for a GPU.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  return _common["smollm2_cpu_lora"]("block_diff")
