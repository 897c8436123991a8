"""NLD's training objectives (docs/model.md §6): the forward process and the four paradigms' losses.

Every loss function returns `(loss_sum, normaliser, metrics)` rather than a mean, so that gradient
accumulation and data parallelism average over the global token count (docs/model.md §6.2: "returned
as (sum, #masked tokens) for global token-count averaging"); the optimised loss is sum(loss_sum) /
sum(normaliser) over all micro-batches of a step.

Paradigms:
  "block_diff"     the joint objective: [noisy ; clean] with the §4.4 mask; L_diff (weighted by 1/p,
                   no shift) on the noisy half + ar_loss_weight * L_AR (shifted) on the clean half,
                   normaliser #masked + ar_loss_weight * n per sequence.
  "bidirectional"  L_diff only, plain bidirectional attention over the noisy sequence.
  "autoregressive" shifted cross-entropy on loss_mask positions, causal attention.
  "draft"          the self-speculation draft (docs/model.md §5.3 at tau = 0): each block of the
                   sequence is [first token, MASK ...] and attends to the clean prefix through a KV cache
                   filled by a causal forward without the adapter, exactly as at inference; the
                   draft forward runs with the LoRA adapter when the model has one. Loss: CE on
                   the masked positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dllm_jax.config import DLM_PARADIGMS, ModelConfig
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import NLDModel

PARADIGMS = DLM_PARADIGMS  # the training objectives a checkpoint's dlm_paradigm may name


@dataclasses.dataclass(frozen=True)
class Objective:
  """What to optimise; the defaults come from the model config (docs/model.md §6)."""
  paradigm: str
  mask_token_id: int
  block_size: int
  eps: float = 1e-3
  ar_loss_weight: float = 1.0
  dlm_loss_weight: float | None = None
  draft_blocks_per_pass: int | None = None  # draft paradigm: blocks per forward (None: all)
  # block_diff / bidirectional / autoregressive: run every forward with the LoRA adapter (LoRA
  # fine-tuning of the whole model; the HF export merges the adapter into the weights). The draft
  # paradigm always drafts with the adapter and fills its cache without it.
  adapter_forward: bool = False

  def __post_init__(self):
    if self.paradigm not in PARADIGMS:
      raise ValueError(f"unknown paradigm {self.paradigm!r}; expected one of {PARADIGMS}")

  @classmethod
  def from_model_config(cls, cfg: ModelConfig, **overrides) -> Objective:
    """Paradigm, block size, mask id and loss weights from `cfg`, then `overrides` (None = keep)."""
    if cfg.mask_token_id is None and overrides.get("mask_token_id") is None:
      raise ValueError("the model config has no mask_token_id; set objective.mask_token_id")
    kw = dict(paradigm=cfg.dlm_paradigm, mask_token_id=cfg.mask_token_id,
              block_size=cfg.block_size, ar_loss_weight=cfg.ar_loss_weight,
              dlm_loss_weight=cfg.dlm_loss_weight)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw)


# --- forward process (docs/model.md §6.1) ---------------------------------------------------------

def forward_process(key: jax.Array, tokens: jax.Array, loss_mask: jax.Array, mask_token_id: int,
                    eps: float = 1e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per sequence t ~ U(0,1), p = (1-eps) t + eps; each loss_mask token masked with probability p.

  Returns (noisy tokens [B, n], masked [B, n] bool, p [B] fp32). Positions with loss_mask = 0
  (prompts, padding) are never masked.
  """
  b, n = tokens.shape
  key_t, key_m = jax.random.split(key)
  p = (1.0 - eps) * jax.random.uniform(key_t, (b,), jnp.float32) + eps
  masked = (jax.random.uniform(key_m, (b, n), jnp.float32) < p[:, None]) & (loss_mask > 0)
  return jnp.where(masked, mask_token_id, tokens), masked, p


def draft_corruption(tokens: jax.Array, loss_mask: jax.Array, mask_token_id: int,
                     block_size: int) -> tuple[jax.Array, jax.Array]:
  """The linear-speculation draft input: every block position but the first is MASK (docs/model.md
  §5.3)."""
  n = tokens.shape[1]
  masked = ((jnp.arange(n) % block_size) != 0)[None, :] & (loss_mask > 0)
  return jnp.where(masked, mask_token_id, tokens), masked


# --- losses from logits (pure; checked against a numpy transcription in the tests) -------------

def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position, in fp32. logits [..., V], targets [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def diffusion_loss_sum(logits, tokens, masked, p) -> tuple[jax.Array, jax.Array]:
  """(sum over masked positions of CE(logits_t, x_t) / p, the same sum without the 1/p weight)."""
  ce = token_cross_entropy(logits, tokens) * masked
  return jnp.sum(ce / p[:, None]), jnp.sum(ce)


def ar_loss_sum(logits, tokens, weights=None) -> jax.Array:
  """sum_t CE(logits_t, x_{t+1}) for t = 0..n-2 (times weights[:, t+1] when given)."""
  ce = token_cross_entropy(logits[:, :-1], tokens[:, 1:])
  if weights is not None:
    ce = ce * weights[:, 1:]
  return jnp.sum(ce)


def block_diff_loss(noisy_logits, clean_logits, tokens, masked, p, *, ar_loss_weight: float,
                    dlm_loss_weight: float | None):
  """Spec §6.2 block_diff: (L_diff [* dlm_w] + ar_w * L_AR, #masked + ar_w * n per sequence)."""
  b, n = tokens.shape
  l_diff, ce_masked = diffusion_loss_sum(noisy_logits, tokens, masked, p)
  if dlm_loss_weight is not None:
    l_diff = l_diff * dlm_loss_weight
  l_ar = ar_loss_sum(clean_logits, tokens)
  n_masked = jnp.sum(masked).astype(jnp.float32)
  total = l_diff + ar_loss_weight * l_ar
  normaliser = n_masked + ar_loss_weight * b * n
  metrics = dict(diff_ce_sum=ce_masked, diff_count=n_masked, ar_ce_sum=l_ar,
                 ar_count=jnp.float32(b * (n - 1)))
  return total, normaliser, metrics


def diffusion_only_loss(logits, tokens, masked, p, *, dlm_loss_weight: float | None):
  """Spec §6.2 bidirectional: (L_diff [* dlm_w], #masked)."""
  l_diff, ce_masked = diffusion_loss_sum(logits, tokens, masked, p)
  if dlm_loss_weight is not None:
    l_diff = l_diff * dlm_loss_weight
  n_masked = jnp.sum(masked).astype(jnp.float32)
  return l_diff, n_masked, dict(diff_ce_sum=ce_masked, diff_count=n_masked)


def autoregressive_loss(logits, tokens, loss_mask):
  """Shifted CE on positions whose target has loss_mask = 1: (sum, count)."""
  w = loss_mask.astype(jnp.float32)
  total = ar_loss_sum(logits, tokens, w)
  count = jnp.sum(w[:, 1:])
  return total, count, dict(ar_ce_sum=total, ar_count=count)


# --- model forwards ------------------------------------------------------------------------------

def draft_logits(model: NLDModel, tokens: jax.Array, noisy: jax.Array, block_size: int,
                 lora: bool, blocks_per_pass: int | None = None) -> jax.Array:
  """Logits of every noisy block k drafted against the causal cache of clean blocks < k.

  One causal forward (adapter off) fills a cache with the clean sequence; every block reads only
  its first k * block_size slots, so the draft forwards see exactly the K/V that linear
  speculation's verify pass commits. blocks_per_pass: blocks drafted per forward (default: all);
  each pass holds that many copies of the cache, so large models draft a few blocks at a time.
  """
  b, n = tokens.shape
  if n % block_size:
    raise ValueError(f"draft objective: seq_len {n} is not a multiple of block_size {block_size}")
  nb = n // block_size
  per_pass = nb if blocks_per_pass is None else blocks_per_pass
  if nb % per_pass:
    raise ValueError(f"draft objective: {nb} blocks per sequence are not a multiple of "
                     f"blocks_per_pass {per_pass}")
  passes = nb // per_pass
  cache = KVCache.init(model.cfg, b, n, model.dtype)
  _, cache = model(tokens, pattern="causal", cache=cache)
  # Row b * per_pass + i holds sequence b for the i-th block of a pass.
  k = tuple(jnp.repeat(x, per_pass, axis=0) for x in cache.k)
  v = tuple(jnp.repeat(x, per_pass, axis=0) for x in cache.v)
  blocks = noisy.reshape(b, passes, per_pass, block_size).transpose(1, 0, 2, 3)

  def one_pass(xs):
    j, blk = xs
    lengths = jnp.tile((j * per_pass + jnp.arange(per_pass, dtype=jnp.int32)) * block_size, b)
    logits, _ = model(blk.reshape(b * per_pass, block_size), pattern="bidirectional",
                      cache=KVCache(k, v, lengths), lora=lora)
    return logits.reshape(b, per_pass, block_size, -1)

  logits = jax.lax.map(one_pass, (jnp.arange(passes, dtype=jnp.int32), blocks))
  return logits.transpose(1, 0, 2, 3, 4).reshape(b, n, -1)


def compute_loss(model: NLDModel, obj: Objective, tokens: jax.Array, loss_mask: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """(loss_sum, normaliser, metrics) of one batch: tokens/loss_mask [B, n], key for the masks."""
  lora = obj.adapter_forward
  if obj.paradigm == "autoregressive":
    logits, _ = model(tokens, pattern="causal", lora=lora)
    return autoregressive_loss(logits, tokens, loss_mask)
  if obj.paradigm == "draft":
    noisy, masked = draft_corruption(tokens, loss_mask, obj.mask_token_id, obj.block_size)
    logits = draft_logits(model, tokens, noisy, obj.block_size, lora=model.lora is not None,
                          blocks_per_pass=obj.draft_blocks_per_pass)
    ones = jnp.ones((tokens.shape[0],), jnp.float32)
    return diffusion_only_loss(logits, tokens, masked, ones, dlm_loss_weight=None)
  noisy, masked, p = forward_process(key, tokens, loss_mask, obj.mask_token_id, obj.eps)
  if obj.paradigm == "bidirectional":
    logits, _ = model(noisy, pattern="bidirectional", lora=lora)
    return diffusion_only_loss(logits, tokens, masked, p, dlm_loss_weight=obj.dlm_loss_weight)
  n = tokens.shape[1]
  if obj.block_size != model.cfg.block_size:
    raise ValueError(f"block_diff: objective block_size {obj.block_size} differs from the model's "
                     f"attention block_size {model.cfg.block_size}")
  if n % obj.block_size:
    raise ValueError(f"block_diff: seq_len {n} is not a multiple of block_size {obj.block_size}")
  logits, _ = model(jnp.concatenate([noisy, tokens], axis=1), pattern="block_diff", lora=lora)
  return block_diff_loss(logits[:, :n], logits[:, n:], tokens, masked, p,
                         ar_loss_weight=obj.ar_loss_weight, dlm_loss_weight=obj.dlm_loss_weight)
