"""Quadratic self-speculation (docs/model.md §5.6), batched: rows accept different lengths.

`init` runs the reference's first forward as the engine's causal prefill (its logits give d_0)
plus one diffusion forward of B MASKs against the read-only prompt cache (d_1 .. d_{B-1}); the
reference counts the two as one forward. One `step` is one round for every running row: a single
forward of the B(B+1) tokens [d_i, MASK x B] under the quadratic pattern (dllm_jax.model) gives,
per sub-block i, the AR prediction after d_i and the diffusion draft of the B positions after it.
The longest prefix of the draft that the AR predictions confirm is emitted (at least d_0, itself
an AR token), the next draft is the one computed under that acceptance, and each row's cache,
which the forward extended by the drafts' K/V, is cropped to c + accepted by resetting its length.
Greedy only (the reference takes the argmax at any temperature); the output stops at
max_new_tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.decode.common import UNWRITTEN, Ctx
from dllm_jax.decode.sampling import is_any
from dllm_jax.kv_cache import KVCache


def _argmax(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def init(ctx: Ctx, last_logits: jax.Array, cache: KVCache) -> dict:
  """The first draft: d_0 from the prefill's last logits, the rest from a MASK block."""
  s = ctx.settings
  batch = last_logits.shape[0]
  masks = jnp.full((batch, s.block_length), s.mask_id, jnp.int32)
  logits, _ = ctx.model(masks, pattern="bidirectional", cache=cache)
  draft = _argmax(logits).at[:, 0].set(_argmax(last_logits))
  zeros = jnp.zeros((batch,), jnp.int32)
  return dict(cache=cache, out=jnp.full((batch, s.out_width), UNWRITTEN, jnp.int32), draft=draft,
              round=jnp.int32(0), count=zeros, nfe=zeros + 1, done=zeros.astype(jnp.bool_),
              seen=zeros.astype(jnp.bool_),
              accepted=jnp.zeros((batch, s.max_new_tokens), jnp.int32))


def running(ctx: Ctx, c: dict) -> jax.Array:
  del ctx
  return jnp.any(~c["done"])


def step(ctx: Ctx, c: dict) -> dict:
  """One verify-and-draft forward for every running row."""
  s = ctx.settings
  size, r, live, draft = s.block_length, c["round"], ~c["done"], c["draft"]
  batch = live.shape[0]
  start = c["cache"].lengths
  sub_blocks = jnp.concatenate(
      [draft[:, :, None], jnp.full((batch, size, size), s.mask_id, jnp.int32)], axis=2)
  logits, cache = ctx.model(sub_blocks.reshape(batch, size * (size + 1)), pattern="quadratic",
                            cache=c["cache"])
  logits = logits.reshape(batch, size, size + 1, -1)
  # Row (i, 0) is the AR prediction after d_i, row (i, 1) the draft of the same position; both
  # become w * AR + (1 - w) * draft (w = 1 without ar_mix_weight: exactly the AR row).
  w = ctx.ar_mix_weight.astype(logits.dtype)
  ar = _argmax(w * logits[:, :, 0] + (1 - w) * logits[:, :, 1])              # [batch, B]
  drafted = _argmax(logits[:, :, 2:])                                          # [batch, B, B-1]
  confirmed = jnp.cumprod(ar[:, :-1] == draft[:, 1:], axis=1)
  accepted = jnp.sum(confirmed, axis=1).astype(jnp.int32) + 1
  positions = jnp.arange(size)[None, :]
  eos = is_any(draft, ctx.eos_ids) & (positions < accepted[:, None])
  hit_eos = jnp.any(eos, axis=1)
  emitted = jnp.where(hit_eos, jnp.argmax(eos, axis=1) + 1, accepted)
  emitted = jnp.minimum(emitted, s.max_new_tokens - c["count"]).astype(jnp.int32)

  rows = jnp.arange(batch)[:, None]
  kept = live[:, None] & (positions < emitted[:, None])
  cols = jnp.where(kept, c["count"][:, None] + positions, s.out_width)  # out of range: dropped
  out = c["out"].at[rows, cols].set(draft, mode="drop")
  count = c["count"] + live * emitted
  seen = c["seen"] | jnp.any(kept & (draft == ctx.end_think_id), axis=1)
  done = c["done"] | (live & (hit_eos | (count >= s.max_new_tokens)))
  last = (accepted - 1)[:, None]
  following = jnp.concatenate(
      [jnp.take_along_axis(ar, last, axis=1),
       jnp.take_along_axis(drafted, last[:, :, None], axis=1)[:, 0]], axis=1)
  # Thinking budget: end-think goes in front of the next draft (its d_0, emitted unconditionally).
  force = live & ~done & (count > ctx.think_budget) & ~seen
  forced = jnp.concatenate([jnp.full((batch, 1), ctx.end_think_id, jnp.int32),
                            following[:, :-1]], axis=1)
  following = jnp.where(force[:, None], forced, following)
  acc_col = jnp.where(live, r, s.max_new_tokens)
  return dict(cache=cache.with_lengths(jnp.where(live, start + accepted, start)), out=out,
              draft=jnp.where(live[:, None], following, draft), round=r + 1, count=count,
              nfe=c["nfe"] + live, done=done, seen=seen,
              accepted=c["accepted"].at[jnp.arange(batch), acc_col].set(accepted, mode="drop"))
