"""Knobs shared by every `scripts/generate.py` config; each size file sets what differs.

Defaults follow the reference (spec §5): block length 32, threshold 0.9 for block diffusion and 0
for self-speculation (one draft forward per round), 512 new tokens, greedy decoding.
"""

from ml_collections import config_dict


def generate_config(**overrides) -> config_dict.ConfigDict:
  """The full knob set; `overrides` replace defaults (every key must already exist)."""
  c = config_dict.ConfigDict()
  # What to load: an HF/converted NLD directory, a llama .gguf file, or "smollm2" (embedded default).
  c.checkpoint = config_dict.placeholder(str)
  c.lora = True  # load the draft LoRA (`linear_spec_lora/`) for spec-mode drafting when present
  c.dtype = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU), "float32" or "bfloat16"
  c.mesh_shape = ""  # "data,model", e.g. "1,8"; empty: one device
  # "auto" (per-layer weight buffers on CPU without a mesh, the scanned stack elsewhere), "scan" or
  # "unrolled" (per-layer buffers: ~1.85x faster forwards on an H100 for 8B, but a second copy of
  # the layer weights in device memory; docs/benchmarks.md).
  c.layer_layout = "auto"
  # Multi-host (jax.distributed): every process runs the same command with its own process_id.
  c.coordinator_address = ""  # "host:port" of process 0; needed when num_processes > 1
  c.num_processes = 1
  c.process_id = 0
  # Decoding mode: "ar" (autoregressive), "diffusion" (block diffusion), "spec" (self-speculation).
  c.mode = "spec"
  c.max_new_tokens = 512
  c.block_length = config_dict.placeholder(int)  # None: the checkpoint's block_size (NLD: 32)
  c.diffusion_threshold = 0.9  # commit every masked position with confidence >= this (plus the top-1)
  c.spec_threshold = 0.0  # 0: one draft forward fills the whole block
  c.temperature = 0.0  # 0: greedy
  c.seed = 0
  c.causal_context = True  # diffusion: seed each block with the causal prediction
  c.max_thinking_tokens = config_dict.placeholder(int)  # thinking budget (needs a </think> token)
  # Mask id for drafting when the checkpoint has none (spec mode on an AR model; output stays exact).
  c.mask_token_id = config_dict.placeholder(int)
  c.max_seq_len = 0  # prompt + new tokens + one block must fit; 0: the model's max positions
  # Prompting.
  c.prompt = "Write a haiku about the sea."
  c.system = ""  # optional system message (chat mode)
  c.chat = True  # format with the checkpoint's chat template; False: raw text (base models)
  c.enable_thinking = False
  c.interactive = False  # multi-turn chat loop on stdin
  # Output.
  c.stream = True  # print text as tokens are committed
  c.output_json = ""  # write a JSON record to this path ("-": stdout instead of streamed text)
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"generate_config: unknown key {key!r}")
    c[key] = value
  return c
