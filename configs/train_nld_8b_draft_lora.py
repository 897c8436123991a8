"""Train the self-speculation draft LoRA (o_proj, rank 128, alpha 512) of an NLD model, base frozen.

Best trained on text the model itself generates (its own greedy answers), so that the drafts learn
what the verifier will accept.

python scripts/train.py --config=configs/train_nld_8b_draft_lora.py \
    --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B --config.data.path=self_gen.jsonl \
    --config.export.peft_dir=/out/linear_spec_lora
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  return _common["train_config"]({
      "objective.paradigm": "draft", "train.trainable": "lora", "model.lora_rank": 128,
      "model.lora_targets": "o_proj",
      "model.lora_alpha": 512.0, "objective.draft_blocks_per_pass": 4, "data.seq_len": 1024,
      "data.batch_size": 8, "optim.peak_lr": 1e-4, "optim.final_lr": 1e-5,
      "optim.weight_decay": 0.0, "optim.warmup_steps": 20, "optim.decay_steps": 200,
      "train.steps": 1000,
  })
