"""Adapt the embedded default SmolLM2-135M-Instruct (autoregressive) into a tri-mode model: the
joint AR + diffusion objective on the model's own answers to a prompt set (GPU-sized run).

python scripts/train.py --config=configs/train_smollm2_trimode.py \
    --config.data.prompts=prompts.jsonl --config.data.path=/data/smollm2_self.jsonl \
    --config.save.dir=/ckpt/smollm2 --config.export.hf_dir=/out/smollm2-trimode

prompts.jsonl: {"messages": [{"role": "user", "content": ...}]} per line. The AR model has no
mask token: the unused control token <empty_output> (id 16) becomes MASK, and 32-token blocks as
in NLD. The export is an NLD-layout directory with tokenizer files, usable by
scripts/generate.py in all three modes.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  c = _common["train_config"]({
      "checkpoint": "smollm2", "objective.paradigm": "block_diff",
      "data.seq_len": 512, "data.batch_size": 32, "data.gen_max_new_tokens": 384,
      "data.gen_batch_size": 64, "optim.peak_lr": 1e-4, "optim.final_lr": 1e-5,
      "optim.warmup_steps": 50, "optim.decay_steps": 300, "train.steps": 3000,
      "save.every": 500,
  })
  c.model.overrides.mask_token_id = 16
  c.model.overrides.block_size = 32
  return c
