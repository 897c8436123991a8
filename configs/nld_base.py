"""Nemotron-Labs-Diffusion base checkpoints (3B, 8B, 14B): raw text (BOS + prompt), block diffusion.

python scripts/generate.py --config=configs/nld_base.py --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B-Base
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config():
  return _common["generate_config"](mode="diffusion", chat=False,
                                    prompt="The three laws of thermodynamics are")
