"""Nemotron-Labs-Diffusion instruct checkpoints (3B, 8B, 14B): chat template, self-speculation
with the draft LoRA.

python scripts/generate.py --config=configs/nld.py --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config():
  return _common["generate_config"](mode="spec", chat=True)
