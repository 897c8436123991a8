"""Serving a Nemotron-Labs-Diffusion instruct checkpoint (3B, 8B, 14B): all four modes, blocks of
32 (the checkpoint's), linear self-speculation by default.

python scripts/serve.py --config=configs/serve_nld.py --config.checkpoint=/path/to/NLD-8B
"""

import pathlib
import runpy

_serve = runpy.run_path(str(pathlib.Path(__file__).with_name("serve.py")))


def get_config():
  c = _serve["serve_config"](checkpoint="", modes="ar,diffusion,spec,quadratic", mode="spec",
                             mask_token_id=None, max_tokens_limit=512, default_max_tokens=256)
  return c
