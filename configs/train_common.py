"""Knobs shared by every `scripts/train.py` config; each job file sets what differs.

Defaults follow the NVIDIA recipes of docs/model.md §6.3: AdamW beta2 0.95, weight decay 0.1, grad
clip 1.0, warmup-stable-decay schedule, block_diff joint objective with eps = 1e-3, bf16 compute on
fp32 master weights.
"""

from ml_collections import config_dict


def train_config(overrides: dict | None = None) -> config_dict.ConfigDict:
  """The full knob set; `overrides` maps dotted keys ("optim.peak_lr") to new values."""
  c = config_dict.ConfigDict()
  c.seed = 0
  # The model to start from, named as in scripts/generate.py: an HF or converted NLD directory, a
  # llama .gguf file or "smollm2" (the embedded default); empty: random init from `model.preset`.
  c.checkpoint = ""
  c.mesh_shape = ""  # device mesh "data,model"; empty: every device on the data axis
  # Persistent compilation cache of scripts/train.py: "auto" (~/.cache/dllm_jax/jax), a
  # directory, or "none".
  c.compilation_cache_dir = "auto"

  c.model = config_dict.ConfigDict()
  c.model.preset = "tiny"
  # ModelConfig fields for presets and GGUF files (e.g. block_size, mask_token_id)
  c.model.overrides = config_dict.ConfigDict()
  c.model.dtype = "bfloat16"  # compute dtype ("auto": float32 on CPU, bfloat16 on GPU)
  c.model.param_dtype = "float32"  # master weights
  c.model.lora_rank = 0  # > 0: build LoRA adapters (the NLD draft: o_proj, rank 128, alpha 512)
  c.model.lora_alpha = 512.0
  # Comma-separated projections to adapt: any of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
  # down_proj.
  c.model.lora_targets = "o_proj"

  c.objective = config_dict.ConfigDict()
  # block_diff | bidirectional | autoregressive | draft; empty: the model config's dlm_paradigm.
  c.objective.paradigm = "block_diff"
  c.objective.eps = 1e-3
  c.objective.ar_loss_weight = config_dict.placeholder(float)  # None: from the model config
  c.objective.dlm_loss_weight = config_dict.placeholder(float)
  c.objective.mask_token_id = config_dict.placeholder(int)
  # draft paradigm: blocks drafted per forward, each pass holding that many cache copies (0: all).
  c.objective.draft_blocks_per_pass = 0

  c.data = config_dict.ConfigDict()
  c.data.path = ""  # jsonl: {"messages": [...]} (loss on assistant turns) or {"text": ...}
  c.data.tokenizer = ""  # directory with tokenizer.json; empty: the checkpoint's
  c.data.seq_len = 1024  # multiple of the block size for block_diff / draft
  c.data.batch_size = 8  # sequences per micro-batch (split over the data axis of the mesh)
  c.data.micro_batches = 1  # gradient accumulation
  c.data.seed = 0
  # Self-generated data: with `prompts` (jsonl of {"messages"} or {"text"}) set and `path` absent,
  # the starting model's greedy answers to the prompts are written to `path` first.
  c.data.prompts = ""
  c.data.gen_max_new_tokens = 256
  c.data.gen_batch_size = 16

  c.optim = config_dict.ConfigDict()
  c.optim.peak_lr = 1e-5
  c.optim.final_lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.decay_steps = 200
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0

  c.train = config_dict.ConfigDict()
  c.train.steps = 1000
  # "full" or "lora" (adapter only, base frozen): the draft LoRA with paradigm draft, otherwise a
  # delta that every forward uses and the HF export merges into the weights.
  c.train.trainable = "full"
  c.train.log_every = 10

  c.save = config_dict.ConfigDict()  # the run's own orbax checkpoints
  c.save.dir = ""  # checkpoints + resume; empty: no checkpoints
  c.save.every = 100
  c.save.keep = 3

  c.export = config_dict.ConfigDict()
  c.export.peft_dir = ""  # write the trained adapter as adapter_config.json + safetensors
  c.export.hf_dir = ""  # write an HF-layout checkpoint (config.json + model.safetensors)
  c.export.hf_dtype = "bfloat16"

  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      if part not in node:
        raise KeyError(f"train_config: unknown key {key!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"train_config: unknown key {key!r}")
    node[leaf] = value
  return c


def smollm2_cpu_lora(paradigm: str) -> config_dict.ConfigDict:
  """A CPU-sized run on the embedded SmolLM2-135M-Instruct: a rank-32 LoRA on every projection,
  base frozen, fp32, 128-token rows of its own answers. The AR model has no mask token, so the
  unused control token <empty_output> (id 16) becomes MASK. Blocks are 8 tokens (as NLD's
  diffusion evaluation uses): with 32-token blocks a draft adapter plateaued at 1.86 accepted
  tokens per round on 24 held-out prompts (300 and 600 steps alike), with 8-token blocks it
  reached 2.21 there in 300 steps, because acceptance hinges on the first drafted positions and
  short blocks put four times as much of the loss there (docs/training.md)."""
  c = train_config({
      "checkpoint": "smollm2", "model.param_dtype": "float32", "model.dtype": "float32",
      "model.lora_rank": 32, "model.lora_alpha": 64.0,
      "model.lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
      "objective.paradigm": paradigm, "train.trainable": "lora",
      "data.seq_len": 128, "data.batch_size": 4, "data.gen_max_new_tokens": 96,
      "data.gen_batch_size": 16, "optim.peak_lr": 1e-3, "optim.final_lr": 1e-4,
      "optim.weight_decay": 0.0, "optim.warmup_steps": 10, "optim.decay_steps": 100,
      "train.steps": 300, "train.log_every": 10, "export.hf_dtype": "float32",
  })
  c.model.overrides.mask_token_id = 16
  c.model.overrides.block_size = 8
  return c
