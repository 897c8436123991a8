"""Full SFT of Nemotron-Labs-Diffusion-8B with the joint objective (NeMo-AutoModel-like, §6.3).

python scripts/train.py --config=configs/train_nld_8b_sft.py \
    --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B --config.data.path=chat.jsonl \
    --config.save.dir=/ckpt/sft --config.export.hf_dir=/out/nld-8b-sft
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  return _common["train_config"]({
      "objective.paradigm": "block_diff", "data.seq_len": 1024, "data.batch_size": 8,
      "data.micro_batches": 8, "optim.peak_lr": 1e-5, "optim.final_lr": 1e-6,
      "optim.warmup_steps": 20, "optim.decay_steps": 400, "train.steps": 2000,
  })
