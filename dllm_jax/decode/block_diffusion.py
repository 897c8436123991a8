"""Block diffusion decoding (docs/model.md §5.1), batched with per-row EOS.

One `step` is one block for every running row: build [seed, MASK, ...] (all MASK with
causal_context=False, whose prefill was bidirectional), apply the thinking budget,
denoise in diffusion mode against the read-only cache (inner while_loop, at most B steps), then one
commit forward that appends the block to the cache: causal, yielding the next seed, or
bidirectional within the block with causal_context=False (as the reference commits then). Rows
leave the denoising loop on their own (no MASK left, or an EOS with no MASK before it) and leave
the block loop once their generated region holds an EOS; the reference instead breaks both loops
for the whole batch (docs/decoding.md).

Sampling events: 0 = the seed from the prefill; block k uses 1 + k(B+1) + i for denoising step i
and 1 + k(B+1) + B for the seed sampled from its commit forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.decode.common import UNWRITTEN, Ctx
from dllm_jax.decode.sampling import (choose_tokens, is_any, masked_confidence, select_threshold,
                                      select_top_k, token_confidence, transfer_schedule)
from dllm_jax.kv_cache import KVCache


def init(ctx: Ctx, last_logits: jax.Array, cache: KVCache) -> dict:
  s = ctx.settings
  batch = last_logits.shape[0]
  seed = choose_tokens(last_logits[:, None], ctx.temperature, ctx.seed_key, jnp.int32(0),
                       greedy=s.greedy)[:, 0]
  zeros = jnp.zeros((batch,), jnp.int32)
  return dict(cache=cache, out=jnp.full((batch, s.out_width), UNWRITTEN, jnp.int32), seed=seed,
              block=jnp.int32(0), count=zeros, nfe=zeros, done=jnp.zeros((batch,), jnp.bool_),
              seen=jnp.zeros((batch,), jnp.bool_))


def running(ctx: Ctx, c: dict) -> jax.Array:
  s = ctx.settings
  return (c["block"] < s.max_new_tokens // s.block_length) & jnp.any(~c["done"])


def _inject_end_think(ctx: Ctx, x: jax.Array, k: jax.Array, seen: jax.Array) -> jax.Array:
  """Thinking budget: once the block ends past the budget, rows without end-think get it at
  in-block offset max(0, budget - k*B) (offset 0 overwrites the seed)."""
  size = ctx.settings.block_length
  offset = jnp.clip(ctx.think_budget - k * size, 0, size - 1)
  inject = ((k + 1) * size > ctx.think_budget) & ~seen
  column = jnp.where(inject, ctx.end_think_id, x[:, offset])
  return x.at[:, offset].set(column)


def _stops_at_eos(x: jax.Array, eos_ids: jax.Array, mask_id: int) -> jax.Array:
  """[B] True where the block holds an EOS and no MASK before its first EOS."""
  eos = is_any(x, eos_ids)
  before_first_eos = jnp.cumsum(eos, axis=1) == 0
  return jnp.any(eos, axis=1) & ~jnp.any((x == mask_id) & before_first_eos, axis=1)


def _denoise(ctx: Ctx, cache: KVCache, x: jax.Array, live: jax.Array, k: jax.Array,
             nfe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The inner loop over denoising steps i = 0..B-1 of block k; returns (block, nfe)."""
  s = ctx.settings
  size = s.block_length
  schedule = transfer_schedule(jnp.sum(x == s.mask_id, axis=1), size)

  def active(x, live):
    return live & jnp.any(x == s.mask_id, axis=1)

  def cond(carry):
    i, x, live, _ = carry
    return (i < size) & jnp.any(active(x, live))

  def body(carry):
    i, x, live, nfe = carry
    act = active(x, live)
    logits, _ = ctx.model(x, pattern="bidirectional", cache=cache)
    event = 1 + k * (size + 1) + i
    cand = choose_tokens(logits, ctx.temperature, ctx.seed_key, event, greedy=s.greedy)
    is_mask = x == s.mask_id
    conf = masked_confidence(token_confidence(logits, cand), is_mask)
    take = jnp.where(ctx.use_threshold, select_threshold(conf, is_mask, ctx.threshold),
                     select_top_k(conf, schedule[:, i]) & is_mask)
    x = jnp.where(act[:, None] & take, cand, x)
    live = act & ~_stops_at_eos(x, ctx.eos_ids, s.mask_id)
    return i + 1, x, live, nfe + act

  _, x, _, nfe = jax.lax.while_loop(cond, body, (jnp.int32(0), x, live, nfe))
  return x, nfe


def step(ctx: Ctx, c: dict) -> dict:
  """One block for every running row."""
  s = ctx.settings
  size, k, live = s.block_length, c["block"], ~c["done"]
  batch = live.shape[0]
  x = jnp.full((batch, size), s.mask_id, jnp.int32)
  if s.causal_context:  # without it the block starts all-MASK (docs/model.md §5.1 step 2a)
    x = x.at[:, 0].set(c["seed"])
  x = _inject_end_think(ctx, x, k, c["seen"])
  x, nfe = _denoise(ctx, c["cache"], x, live, k, c["nfe"])
  n_new = jnp.where(live, size, 0).astype(jnp.int32)
  if s.causal_context:
    logits, cache = ctx.model(x, pattern="causal", cache=c["cache"], n_new=n_new)
    event = 1 + k * (size + 1) + size
    seed = choose_tokens(logits[:, -1:], ctx.temperature, ctx.seed_key, event,
                         greedy=s.greedy)[:, 0]
  else:  # the commit's mask is causal iff causal_context (docs/model.md §5.1 step 2e), no seed
    _, cache = ctx.model(x, pattern="bidirectional", cache=c["cache"], n_new=n_new, append=True)
    seed = c["seed"]
  old = jax.lax.dynamic_slice_in_dim(c["out"], k * size, size, axis=1)
  out = jax.lax.dynamic_update_slice_in_dim(c["out"], jnp.where(live[:, None], x, old), k * size,
                                            axis=1)
  return dict(cache=cache, out=out, seed=jnp.where(live, seed, c["seed"]), block=k + 1,
              count=c["count"] + live * size, nfe=nfe + live,
              done=c["done"] | (live & jnp.any(is_any(x, ctx.eos_ids), axis=1)),
              seen=c["seen"] | (live & jnp.any(x == ctx.end_think_id, axis=1)))
