"""Straightforward PyTorch transcriptions of the NLD decoding loops (docs/model.md §5) on
transformers models.

These are the like-for-like baselines for scripts/bench.py: eager Python loops over a transformers
`Ministral3ForCausalLM` / `LlamaForCausalLM` with a `DynamicCache`, written the way the reference
`generate` / `ar_generate` / `linear_spec_generate` methods are, greedy (temperature 0) only.

The reference's "diffusion mode against a read-only cache" (docs/model.md §4.1/§4.3) is reproduced
by running the block with an all-visible 4-D mask against the cache and cropping the cache back
afterwards: the block sees the whole prefix and itself, and the cache ends as it began.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import transformers
from transformers import DynamicCache

from dllm_jax.config import ModelConfig


@dataclasses.dataclass
class TorchDecodeResult:
  """Generated tokens [batch, n] (prompt excluded), forward counts and wall-clock seconds."""
  tokens: np.ndarray
  nfe: int  # forwards counted as the reference counts them (docs/model.md §5)
  forwards: int  # every backbone forward, prefill included
  seconds: float  # the whole call
  prefill_seconds: float | None  # None where the call does not expose it (transformers generate)

  @property
  def decode_seconds(self) -> float | None:
    return None if self.prefill_seconds is None else self.seconds - self.prefill_seconds


# --- model construction -------------------------------------------------------------------------

def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
  """The transformers config for a ModelConfig: Ministral3 for YaRN/Llama-4-scaled, Llama otherwise."""
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=list(cfg.eos_token_ids) or None, pad_token_id=cfg.pad_token_id,
      attn_implementation="sdpa")
  if cfg.rope_type == "default" and cfg.llama_4_scaling_beta is None:
    return transformers.LlamaConfig(
        **common, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
  rope = cfg.to_hf_config()["rope_parameters"]
  return transformers.Ministral3Config(**common, rope_parameters=rope)


def torch_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=torch.float32,
                device: str = "cpu") -> transformers.PreTrainedModel:
  """A transformers causal LM holding exactly `tensors` (HF Llama naming: `model.*`, `lm_head`)."""
  model = random_torch_model(cfg, dtype=dtype, device=device)
  state = {k: torch.tensor(np.asarray(v)) for k, v in tensors.items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if cfg.tie_word_embeddings:
    missing = [k for k in missing if k != "lm_head.weight"]
  if missing or unexpected:
    raise ValueError(f"tensors do not fit {type(model).__name__}: missing {missing[:3]}, "
                     f"unexpected {unexpected[:3]}")
  return model


def random_torch_model(cfg: ModelConfig, *, dtype=torch.float32,
                       device: str = "cpu") -> transformers.PreTrainedModel:
  """A transformers causal LM for `cfg` with transformers' own random init, built on `device`."""
  hf = hf_config(cfg)
  cls = (transformers.LlamaForCausalLM if isinstance(hf, transformers.LlamaConfig)
         else transformers.Ministral3ForCausalLM)
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)  # initialise directly in `dtype`: an 8B fp32 copy would not fit
  try:
    with torch.device(device):
      model = cls(hf)
  finally:
    torch.set_default_dtype(previous)
  return model.eval()


@dataclasses.dataclass(frozen=True)
class TorchLoRA:
  """The draft adapter (docs/model.md §2.3) as per-layer tensors on the model's device and dtype."""
  a: list[torch.Tensor]  # per layer [heads*head_dim, rank]
  b: list[torch.Tensor]  # per layer [rank, hidden]
  scale: float

  @classmethod
  def from_numpy(cls, model, a: np.ndarray, b: np.ndarray, scale: float) -> TorchLoRA:
    """a: [layers, heads*head_dim, rank], b: [layers, rank, hidden] (the dllm_jax layout)."""
    like = next(model.parameters())
    return cls([torch.from_numpy(np.ascontiguousarray(x)).to(like) for x in a],
               [torch.from_numpy(np.ascontiguousarray(x)).to(like) for x in b], scale)


@contextlib.contextmanager
def draft_lora(model: transformers.PreTrainedModel, lora: TorchLoRA) -> Iterator[None]:
  """Adds scale * (x @ a[l]) @ b[l] to every layer's o_proj output while active."""
  hooks = []
  for layer, a, b in zip(model.model.layers, lora.a, lora.b):
    def hook(module, inputs, output, a=a, b=b):
      return output + lora.scale * ((inputs[0] @ a) @ b)
    hooks.append(layer.self_attn.o_proj.register_forward_hook(hook))
  try:
    yield
  finally:
    for h in hooks:
      h.remove()


# --- shared pieces ------------------------------------------------------------------------------

def _crop_to(cache: DynamicCache, length: int) -> None:
  extra = cache.get_seq_length() - length
  if extra > 0:
    cache.crop(-extra)  # transformers 5: a negative argument removes that many trailing tokens


def _causal(model, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
  """Causal forward appending ids' K/V to the cache (prefill, decode, commit, verify)."""
  return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def _diffusion(model, block: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
  """The block attends to the whole cached prefix and bidirectionally to itself; cache unchanged."""
  prefix = cache.get_seq_length()
  b, n = block.shape
  mask = torch.ones((b, 1, n, prefix + n), dtype=torch.bool, device=block.device)
  logits = model(input_ids=block, past_key_values=cache, use_cache=True, attention_mask=mask).logits
  _crop_to(cache, prefix)
  return logits


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _is_eos(tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
  if not eos:
    return torch.zeros_like(tokens, dtype=torch.bool)
  return torch.isin(tokens, torch.tensor(list(eos), device=tokens.device))


# --- docs/model.md §5.2: autoregressive -----------------------------------------------------------

@torch.inference_mode()
def ar_decode(model, prompt: torch.Tensor, max_new_tokens: int,
              eos_token_ids: Sequence[int] = ()) -> TorchDecodeResult:
  """Greedy AR: prefill (not counted), then one token per forward; NFE = generated tokens."""
  dev = prompt.device
  cache = DynamicCache(config=model.config)
  t0 = time.perf_counter()
  logits = _causal(model, prompt, cache)[:, -1]
  _sync(dev)
  t1 = time.perf_counter()
  out, forwards = [], 1
  for step in range(max_new_tokens):
    token = logits.argmax(-1)
    out.append(token)
    if bool(_is_eos(token, eos_token_ids).all()) or step == max_new_tokens - 1:
      break
    logits = _causal(model, token[:, None], cache)[:, -1]
    forwards += 1
  tokens = torch.stack(out, 1).cpu().numpy()
  _sync(dev)
  t2 = time.perf_counter()
  return TorchDecodeResult(tokens, nfe=tokens.shape[1], forwards=forwards,
                           seconds=t2 - t0, prefill_seconds=t1 - t0)


# --- docs/model.md §5.1: block diffusion ----------------------------------------------------------

def transfer_schedule(masked: int, steps: int) -> list[int]:
  """floor(M/B) per step, plus one for the first M mod B steps (docs/model.md §5.1 c)."""
  base, rem = divmod(masked, steps)
  return [base + (1 if i < rem else 0) for i in range(steps)]


def _select(conf: torch.Tensor, masked: torch.Tensor, threshold: float | None,
            k: int) -> torch.Tensor:
  """Positions [b, n] to commit: top-k by confidence, or {argmax} ∪ {conf ≥ τ} among masked."""
  if threshold is None:
    chosen = torch.zeros_like(masked)
    if k > 0:
      chosen.scatter_(1, conf.topk(k, dim=-1).indices, True)
    return chosen & masked
  best = torch.zeros_like(masked)
  best.scatter_(1, conf.argmax(-1, keepdim=True), True)
  return (best | (conf >= threshold)) & masked


@torch.inference_mode()
def block_diffusion_decode(model, prompt: torch.Tensor, max_new_tokens: int, *,
                           block_length: int, mask_token_id: int, threshold: float | None,
                           eos_token_ids: Sequence[int] = ()) -> TorchDecodeResult:
  """Greedy block diffusion with causal context (docs/model.md §5.1): denoise each block against the
  read-only cache until no MASK remains, then commit it with one causal forward."""
  if max_new_tokens % block_length:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not a multiple of "
                     f"block_length={block_length}")
  dev, b = prompt.device, prompt.shape[0]
  cache = DynamicCache(config=model.config)
  t0 = time.perf_counter()
  seed = _causal(model, prompt, cache)[:, -1].argmax(-1)
  _sync(dev)
  t1 = time.perf_counter()
  blocks, nfe = [], 0
  for _ in range(max_new_tokens // block_length):
    block = torch.full((b, block_length), mask_token_id, dtype=torch.long, device=dev)
    block[:, 0] = seed
    schedule = transfer_schedule(int((block[0] == mask_token_id).sum()), block_length)
    for step in range(block_length):
      masked = block == mask_token_id
      if not bool(masked.any()):
        break
      nfe += 1
      logits = _diffusion(model, block, cache)
      candidates = logits.argmax(-1)
      # Confidence in the logits' dtype, without temperature (docs/model.md §5.1 d).
      probs = torch.softmax(logits, dim=-1)
      conf = torch.gather(probs, -1, candidates[..., None])[..., 0]
      conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
      chosen = _select(conf, masked, threshold, schedule[step])
      block = torch.where(chosen, candidates, block)
      if eos_token_ids and _eos_ends_block(block, mask_token_id, eos_token_ids):
        break
    nfe += 1
    seed = _causal(model, block, cache)[:, -1].argmax(-1)
    blocks.append(block)
    if eos_token_ids and bool(_is_eos(torch.cat(blocks, 1), eos_token_ids).any(-1).all()):
      break
  tokens = torch.cat(blocks, 1)
  if eos_token_ids:
    tokens = _truncate_after_eos(tokens, eos_token_ids)
  tokens = tokens.cpu().numpy()
  _sync(dev)
  t2 = time.perf_counter()
  return TorchDecodeResult(tokens, nfe=nfe, forwards=nfe + 1, seconds=t2 - t0,
                           prefill_seconds=t1 - t0)


def _eos_ends_block(block: torch.Tensor, mask_token_id: int, eos: Sequence[int]) -> bool:
  """True if any row holds an EOS with no MASK before its first EOS (the batch-wide early exit)."""
  for row in block:
    hits = torch.nonzero(_is_eos(row, eos))
    if len(hits) and not bool((row[:int(hits[0])] == mask_token_id).any()):
      return True
  return False


def _truncate_after_eos(tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
  """If every row has an EOS, keep up to the latest first-EOS over rows (docs/model.md §5.1 f)."""
  hits = _is_eos(tokens, eos)
  if not bool(hits.any(-1).all()):
    return tokens
  return tokens[:, :int(hits.int().argmax(-1).max()) + 1]


# --- docs/model.md §5.3: linear self-speculation --------------------------------------------------

@torch.inference_mode()
def linear_spec_decode(model, prompt: torch.Tensor, max_new_tokens: int, *, block_length: int,
                       mask_token_id: int, threshold: float = 0.0,
                       eos_token_ids: Sequence[int] = (),
                       lora: TorchLoRA | None = None) -> TorchDecodeResult:
  """Greedy linear self-speculation (docs/model.md §5.3), batch 1: draft a block in diffusion mode
  (with the draft LoRA), verify it with one causal forward, keep the matching prefix plus the bonus
  token.

  lora: the draft adapter, or None to draft with the base weights.
  """
  if prompt.shape[0] != 1:
    raise ValueError(f"linear self-speculation is batch-1 only, got batch {prompt.shape[0]}")
  dev = prompt.device
  adapter = (lambda: draft_lora(model, lora)) if lora else contextlib.nullcontext
  cache = DynamicCache(config=model.config)
  t0 = time.perf_counter()
  seed = int(_causal(model, prompt, cache)[0, -1].argmax())
  _sync(dev)
  t1 = time.perf_counter()
  nfe, generated = 1, [seed]
  eos = set(eos_token_ids)
  while len(generated) < max_new_tokens and seed not in eos:
    start = cache.get_seq_length()
    block = torch.full((1, block_length), mask_token_id, dtype=torch.long, device=dev)
    block[0, 0] = seed
    while True:
      masked = block == mask_token_id
      nfe += 1
      with adapter():
        logits = _diffusion(model, block, cache)
      draft = logits.argmax(-1)
      if threshold <= 0:
        block = torch.where(masked, draft, block)
        break
      conf = torch.gather(torch.softmax(logits, -1), -1, draft[..., None])[..., 0]
      conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
      block = torch.where(_select(conf, masked, threshold, 0), draft, block)
      if not bool((block == mask_token_id).any()):
        break
    nfe += 1
    verified = _causal(model, block, cache)[0].argmax(-1)
    matches = (verified[:-1] == block[0, 1:]).int()
    accepted = int(matches.cumprod(0).sum()) + 1
    emitted = verified[:accepted].tolist()
    _crop_to(cache, start + accepted)
    hit = next((i for i, t in enumerate(emitted) if t in eos), None)
    if hit is not None:
      emitted = emitted[:hit + 1]
    generated.extend(emitted)
    seed = emitted[-1]
  _sync(dev)
  t2 = time.perf_counter()
  return TorchDecodeResult(np.asarray([generated]), nfe=nfe, forwards=nfe,
                           seconds=t2 - t0, prefill_seconds=t1 - t0)


# --- transformers' own generate -----------------------------------------------------------------

@torch.inference_mode()
def hf_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> TorchDecodeResult:
  """transformers `generate`, greedy, exactly `max_new_tokens` tokens (no EOS stop)."""
  dev = prompt.device
  t0 = time.perf_counter()
  out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                       eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
  _sync(dev)
  t1 = time.perf_counter()
  tokens = out[:, prompt.shape[1]:].cpu().numpy()
  return TorchDecodeResult(tokens, nfe=tokens.shape[1], forwards=tokens.shape[1],
                           seconds=t1 - t0, prefill_seconds=None)


# --- single forwards ----------------------------------------------------------------------------

def time_torch_forward(model, kind: str, *, batch: int, tokens: int, context: int, token_id: int,
                       warmup: int, repeats: int,
                       lora: TorchLoRA | None = None) -> list[float]:
  """Seconds per forward of `kind` ("ar" | "denoise" | "commit" | "draft" | "verify") against a
  cache of `context` tokens, as the loops above run it (a causal forward appends, then the cache is
  cropped back so every call sees the same context)."""
  dev = next(model.parameters()).device
  cache = DynamicCache(config=model.config)
  ids = torch.full((batch, tokens), token_id, dtype=torch.long, device=dev)
  adapter = ((lambda: draft_lora(model, lora)) if lora and kind == "draft"
             else contextlib.nullcontext)

  def call():
    if kind in ("denoise", "draft"):
      with adapter():
        _diffusion(model, ids, cache)
    else:
      _causal(model, ids, cache)
      _crop_to(cache, context)
    _sync(dev)

  with torch.inference_mode():
    # Fill the cache; logits of the last position only (full-prompt logits of a 131k vocabulary
    # would take gigabytes at the GPU shapes).
    model(input_ids=torch.zeros((batch, context), dtype=torch.long, device=dev),
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    for _ in range(warmup):
      call()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      call()
      times.append(time.perf_counter() - start)
  return times
