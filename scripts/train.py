"""Fine-tune an NLD model (joint AR + diffusion objective, or the draft LoRA) from a config file.

python scripts/train.py --config=configs/train_tiny.py --config.data.path=data.jsonl \
    --config.data.tokenizer=/path/to/tokenizer_dir [--config.save.dir=/tmp/run]

Logs loss, the unweighted diffusion / AR cross-entropies, learning rate, gradient norm and
throughput (data tokens/s); re-running with the same save.dir resumes where the run stopped.
Compiled programs are cached on disk (--config.compilation_cache_dir).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dllm_jax.compile_cache import enable_compilation_cache
from dllm_jax.training.run import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/train_*.py).", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  config = _CONFIG.value
  if not config.data.path:
    raise app.UsageError("--config.data.path is required (a jsonl file of chat or text examples)")
  try:
    enable_compilation_cache(config.compilation_cache_dir)
  except OSError as e:
    raise app.UsageError(f"--config.compilation_cache_dir: {e}") from None
  train(config, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
