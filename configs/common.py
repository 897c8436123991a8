"""Knobs shared by every `scripts/generate.py` config; each config file sets what differs.

Defaults follow the reference (docs/model.md §5): block length 32, threshold 0.9 for block diffusion
and 0 for self-speculation (one draft forward per round), 512 new tokens, greedy decoding.

`python scripts/generate.py --help` lists every knob with the comment on its line here (or the
comment lines right above it): keep each one a self-contained description.
"""

from ml_collections import config_dict


def generate_config(**overrides) -> config_dict.ConfigDict:
  """The full knob set; `overrides` replace defaults (every key must already exist)."""
  c = config_dict.ConfigDict()
  # what to load: an HF or converted NLD directory, a llama .gguf file, or "smollm2" (embedded)
  c.checkpoint = config_dict.placeholder(str)
  c.lora = True  # load the draft LoRA (linear_spec_lora/) for spec-mode drafting when present
  c.dtype = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU), "float32" or "bfloat16"
  # weight-only quantization of the linear layers while loading: "" (none), "int8" or "fp8"
  c.quantize = ""
  # "auto" (XLA on CPU, the measured winner on GPU), "xla", "pallas", "triton" or "cudnn"
  c.attention_impl = "auto"
  c.mesh_shape = ""  # device mesh "data,model", e.g. "1,8"; empty: one device
  c.coordinator_address = ""  # multi-host: "host:port" of process 0; all processes run this command
  c.num_processes = 1  # multi-host: number of processes (jax.distributed)
  c.process_id = 0  # multi-host: this process's index, 0 .. num_processes - 1
  # compilation cache: "auto" (~/.cache/dllm_jax/jax; $XDG_CACHE_HOME if set), a directory, "none"
  c.compilation_cache_dir = "auto"
  c.allow_nonfinite = False  # load weights holding NaN or Inf instead of refusing them
  # "ar" (autoregressive), "diffusion" (block diffusion), "spec" (linear self-speculation) or
  # "quadratic" (quadratic self-speculation: one B(B+1)-token forward per round, greedy)
  c.mode = "spec"
  c.max_new_tokens = 512  # tokens to generate (spec may overshoot by up to block_length - 1)
  # diffusion block / speculative draft length; None: the checkpoint's block_size (NLD: 32)
  c.block_length = config_dict.placeholder(int)
  c.diffusion_threshold = 0.9  # diffusion: commit every masked position with confidence >= this
  # diffusion: commit a fixed number of positions per step instead (M // B, the reference's
  # threshold=None)
  c.fixed_schedule = False
  c.spec_threshold = 0.0  # spec: draft confidence threshold; 0: one draft forward fills the block
  # quadratic: weight of the AR logits mixed into the first draft position; None: exact AR (output
  # = greedy AR)
  c.ar_mix_weight = config_dict.placeholder(float)
  c.temperature = 0.0  # sampling temperature; 0: greedy
  c.seed = 0  # sampling seed
  c.causal_context = True  # diffusion: seed each block with the causal prediction
  c.max_thinking_tokens = config_dict.placeholder(int)  # thinking budget (needs a </think> token)
  # mask id for drafting when the checkpoint has none (spec/quadratic on an AR model; output stays
  # exact)
  c.mask_token_id = config_dict.placeholder(int)
  c.max_seq_len = 0  # prompt + new tokens + one block must fit; 0: the model's max positions
  c.prompt = "Write a haiku about the sea."  # the user message
  c.system = ""  # optional system message (chat mode)
  c.chat = True  # format with the checkpoint's chat template; False: raw text (base models)
  c.enable_thinking = False  # passed to the chat template (NLD: an open <think>)
  c.interactive = False  # multi-turn chat on stdin (/reset clears the history, /exit quits)
  # batch run: one prompt per line (.jsonl: {"prompt": ..., per-prompt settings} per line)
  c.prompts_file = ""
  c.batch_size = 8  # batch run: at most this many prompts per generate call
  c.stream = True  # print text as tokens are committed
  c.output_json = ""  # write a JSON record to this path ("-": stdout instead of streamed text)
  c.output_jsonl = ""  # batch run: write one JSON record per prompt, in input order ("-": stdout)
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"generate_config: unknown key {key!r}")
    c[key] = value
  return c
