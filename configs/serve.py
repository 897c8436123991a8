"""`scripts/serve.py` knobs; with no --config, the embedded default SmolLM2-135M-Instruct.

python scripts/serve.py                          # SmolLM2 on http://127.0.0.1:8000, AR and spec
python scripts/serve.py --config=configs/serve_nld.py --config.checkpoint=/path/to/NLD-8B

`python scripts/serve.py --help` lists every knob with the comment on its line here (or the comment
lines right above it): keep each one a self-contained description. SmolLM2 is autoregressive and
has no mask token: it serves "ar" and "spec" (drafting from `mask_token_id`, a control token the
chat never produces, which keeps greedy output exact; "quadratic" drafts from it too and can be
added to --config.modes); "diffusion" is not served.
"""

from ml_collections import config_dict


def serve_config(**overrides) -> config_dict.ConfigDict:
  """The full knob set; `overrides` replace defaults (every key must already exist)."""
  c = config_dict.ConfigDict()
  # what to load: an HF or converted NLD directory, a llama .gguf file, or "smollm2" (embedded)
  c.checkpoint = "smollm2"
  c.model_name = ""  # the id clients send as `model`; empty: the checkpoint's file or folder name
  c.lora = True  # load the draft LoRA (linear_spec_lora/) for spec-mode drafting when present
  c.dtype = "auto"  # "auto" (float32 on CPU, bfloat16 on GPU), "float32" or "bfloat16"
  # "auto" (the measured kernels where they win, else XLA), "xla", "pallas", "triton" or "cudnn"
  c.attention_impl = "auto"
  c.quantize = ""  # weight-only quantization of the linear layers: "", "int8" or "fp8"
  c.mesh_shape = ""  # device mesh "data,model", e.g. "1,8"; empty: one device
  # compilation cache: "auto" (~/.cache/dllm_jax/jax; $XDG_CACHE_HOME if set), a directory, "none"
  c.compilation_cache_dir = "auto"
  c.host = "127.0.0.1"  # address to bind; anything but loopback exposes the server to the network
  c.port = 8000  # TCP port
  # API key clients must send as "Authorization: Bearer <key>" (all endpoints but /health); empty:
  # the DLLM_API_KEY environment variable, and no key at all when that is unset too
  c.api_key = ""
  c.cors_origins = ""  # comma-separated origins allowed cross-origin requests; empty: no CORS
  c.slots = 4  # requests decoded at once (rows of the preallocated KV cache)
  c.queue_size = 32  # requests waiting for a slot at most; beyond it: 429 with Retry-After
  c.max_connections = 64  # HTTP requests handled at once; beyond it: 503 with Retry-After
  c.max_body_bytes = 1048576  # largest request body accepted (413 beyond)
  c.max_prompt_tokens = 512  # longest prompt accepted in tokens (413 beyond)
  c.max_tokens_limit = 256  # most tokens one request may generate (400 beyond)
  c.default_max_tokens = 128  # max_tokens of a request that does not set it
  c.modes = "ar,spec"  # decoding modes served, comma-separated: ar, diffusion, spec, quadratic
  # diffusion / spec / quadratic block lengths served, comma-separated; empty: the checkpoint's
  # block_size
  c.block_lengths = ""
  c.sampling = True  # also serve temperature > 0 (compiles the sampled programs too)
  # step all slots of a mode in one vmapped program (throughput) instead of one slot at a time
  # (ids exactly those of scripts/generate.py); docs/serving.md
  c.batched = False
  c.mode = "ar"  # default decoding mode of a request that sends no `mode`
  c.block_length = config_dict.placeholder(int)  # default block length; None: the first served
  c.diffusion_threshold = 0.9  # default diffusion confidence threshold
  c.fixed_schedule = False  # default diffusion schedule: commit M // B positions per step
  c.spec_threshold = 0.0  # default speculative draft threshold (0: one draft forward per round)
  # default quadratic AR/draft logit mix weight in [0, 1]; None: the exact AR token starts each
  # draft (greedy AR output)
  c.ar_mix_weight = config_dict.placeholder(float)
  c.temperature = 0.0  # default sampling temperature (not applied to quadratic); 0: greedy
  c.seed = config_dict.placeholder(int)  # default sampling seed; None: a random seed per request
  # mask id for drafting when the checkpoint has none (spec or quadratic on an AR model; greedy
  # output stays exact)
  c.mask_token_id = 16  # SmolLM2's <empty_output>
  c.shutdown_timeout = 30  # seconds SIGTERM waits for requests in flight before cancelling them
  c.log_level = "info"  # "debug", "info", "warning" or "error"; request text is never logged
  for key, value in overrides.items():
    if key not in c:
      raise KeyError(f"serve_config: unknown key {key!r}")
    c[key] = value
  return c


def get_config():
  return serve_config()
