"""Linear self-speculation (docs/model.md §5.3), batched: rows accept different lengths.

One `step` is one round for every running row: draft the block [seed, MASK, ...] in diffusion mode
(draft LoRA on), verify it with one causal forward (LoRA off) that appends all B tokens, accept the
longest matching prefix plus the verifier's bonus token, then crop each row's cache to
c + accepted by resetting its length. Each row keeps its own cache length, output offset and done
flag, so rows run the same number of forwards per round but advance by different amounts.

Sampling events: 0 = the seed from the prefill; round r uses 1 + r(B+1) + j for draft step j and
1 + r(B+1) + B for the verify.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.decode.common import UNWRITTEN, Ctx
from dllm_jax.decode.sampling import choose_tokens, is_any, masked_confidence, token_confidence
from dllm_jax.kv_cache import KVCache


def init(ctx: Ctx, last_logits: jax.Array, cache: KVCache) -> dict:
  """Seed from the prefill; the prefill counts as one forward here (unlike the other modes)."""
  s = ctx.settings
  batch = last_logits.shape[0]
  seed = choose_tokens(last_logits[:, None], ctx.temperature, ctx.seed_key, jnp.int32(0),
                       greedy=s.greedy)[:, 0]
  out = jnp.full((batch, s.out_width), UNWRITTEN, jnp.int32).at[:, 0].set(seed)
  ones = jnp.ones((batch,), jnp.int32)
  done = is_any(seed, ctx.eos_ids) | (s.max_new_tokens <= 1)
  return dict(cache=cache, out=out, seed=seed, round=jnp.int32(0), count=ones, nfe=ones,
              done=done, seen=seed == ctx.end_think_id,
              accepted=jnp.zeros((batch, s.max_new_tokens), jnp.int32))


def running(ctx: Ctx, c: dict) -> jax.Array:
  del ctx
  return jnp.any(~c["done"])


def _draft(ctx: Ctx, cache: KVCache, x: jax.Array, live: jax.Array, r: jax.Array,
           nfe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fills the block's MASKs in diffusion mode; returns (block, nfe).

  threshold 0: one forward fills every MASK. threshold > 0: repeat, committing the MASKs whose
  confidence clears it (or the single most confident one if none does), at most B forwards: the
  reference loops until no MASK is left, which never ends if the model keeps predicting MASK.
  """
  s = ctx.settings
  size = s.block_length

  # Position 0 is the seed, the verifier's own token: it is never a draft slot, even when it equals
  # the mask id (the reference would redraft it and then diverge from greedy AR; docs/decoding.md).
  draft_slot = jnp.arange(size)[None, :] > 0

  def active(x, live):
    return live & jnp.any((x == s.mask_id) & draft_slot, axis=1)

  def cond(carry):
    i, x, live, _ = carry
    return ((i == 0) | ctx.use_threshold) & (i < size) & jnp.any(active(x, live))

  def body(carry):
    i, x, live, nfe = carry
    act = active(x, live)
    logits, _ = ctx.model(x, pattern="bidirectional", cache=cache, lora=s.draft_lora)
    cand = choose_tokens(logits, ctx.temperature, ctx.seed_key, 1 + r * (size + 1) + i,
                         greedy=s.greedy)
    if not s.greedy:  # the reference's draft confidence is taken at the sampling temperature
      logits = (logits / ctx.temperature.astype(logits.dtype)).astype(logits.dtype)
    is_mask = (x == s.mask_id) & draft_slot
    conf = masked_confidence(token_confidence(logits, cand), is_mask)
    take = is_mask & (conf >= ctx.threshold.astype(conf.dtype))
    best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), size, dtype=jnp.bool_)
    take = jnp.where(jnp.any(take, axis=1, keepdims=True), take, best)
    take = jnp.where(ctx.use_threshold, take, is_mask)
    return i + 1, jnp.where(act[:, None] & take, cand, x), live, nfe + act

  _, x, _, nfe = jax.lax.while_loop(cond, body, (jnp.int32(0), x, live, nfe))
  return x, nfe


def step(ctx: Ctx, c: dict) -> dict:
  """One draft + verify round for every running row."""
  s = ctx.settings
  size, r, live = s.block_length, c["round"], ~c["done"]
  batch = live.shape[0]
  start = c["cache"].lengths  # the seed is not in the cache yet
  x = jnp.full((batch, size), s.mask_id, jnp.int32).at[:, 0].set(c["seed"])
  x, nfe = _draft(ctx, c["cache"], x, live, r, c["nfe"])
  logits, cache = ctx.model(x, pattern="causal", cache=c["cache"],
                            n_new=jnp.where(live, size, 0).astype(jnp.int32))
  verified = choose_tokens(logits, ctx.temperature, ctx.seed_key, 1 + r * (size + 1) + size,
                           greedy=s.greedy)
  matches = jnp.cumprod(verified[:, :-1] == x[:, 1:], axis=1)
  accepted = jnp.sum(matches, axis=1).astype(jnp.int32) + 1
  positions = jnp.arange(size)[None, :]
  eos = is_any(verified, ctx.eos_ids) & (positions < accepted[:, None])
  hit_eos = jnp.any(eos, axis=1)
  emitted = jnp.where(hit_eos, jnp.argmax(eos, axis=1) + 1, accepted).astype(jnp.int32)

  rows = jnp.arange(batch)[:, None]
  kept = live[:, None] & (positions < emitted[:, None])
  cols = jnp.where(kept, c["count"][:, None] + positions, s.out_width)  # out of range: dropped
  out = c["out"].at[rows, cols].set(verified, mode="drop")
  count = c["count"] + live * emitted
  seen = c["seen"] | jnp.any(kept & (verified == ctx.end_think_id), axis=1)
  seed = jnp.take_along_axis(verified, (accepted - 1)[:, None], axis=1)[:, 0]
  done = c["done"] | (live & (hit_eos | (count >= s.max_new_tokens)))
  # Thinking budget. The forced seed also replaces the bonus token in the output, so the output is
  # the sequence the cache conditions on (the reference keeps the bonus token; docs/decoding.md).
  force = live & ~done & (count > ctx.think_budget) & ~seen
  seed = jnp.where(force, ctx.end_think_id, seed)
  last = jnp.where(force, count - 1, s.out_width)
  out = out.at[jnp.arange(batch), last].set(ctx.end_think_id, mode="drop")
  seen = seen | force
  cache = cache.with_lengths(jnp.where(live, start + accepted, start))
  acc_col = jnp.where(live, r, s.max_new_tokens)
  return dict(cache=cache, out=out, seed=jnp.where(live, seed, c["seed"]), round=r + 1,
              count=count, nfe=nfe + live, done=done, seen=seen,
              accepted=c["accepted"].at[jnp.arange(batch), acc_col].set(accepted, mode="drop"))
