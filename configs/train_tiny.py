"""A seconds-long CPU run of the joint objective on the tiny preset (smoke test of the pipeline).

python scripts/train.py --config=configs/train_tiny.py --config.data.path=data.jsonl \
    --config.data.tokenizer=/path/to/tokenizer_dir
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("train_common.py")))


def get_config():
  c = _common["train_config"]({
      "model.preset": "tiny", "model.dtype": "float32", "data.seq_len": 64,
      "data.batch_size": 4, "optim.peak_lr": 3e-3, "optim.final_lr": 3e-4,
      "optim.warmup_steps": 5, "optim.decay_steps": 20, "train.steps": 100,
      "train.log_every": 10,
  })
  c.model.overrides.block_size = 16
  return c
