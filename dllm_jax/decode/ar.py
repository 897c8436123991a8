"""Autoregressive decoding (docs/model.md §5.2), batched with per-row EOS.

Sampling event e is token e of every row (event 0 samples from the prefill logits). NFE per row =
number of tokens it generated (the reference counts the sampling steps, not the prefill).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.decode.common import UNWRITTEN, Ctx
from dllm_jax.decode.sampling import choose_tokens, is_any
from dllm_jax.kv_cache import KVCache


def _force_end_think(ctx: Ctx, token: jax.Array, step: jax.Array, seen: jax.Array) -> jax.Array:
  """Thinking budget: from step max_thinking_tokens on, a row without end-think is given it."""
  return jnp.where((step >= ctx.think_budget) & ~seen, ctx.end_think_id, token)


def init(ctx: Ctx, last_logits: jax.Array, cache: KVCache) -> dict:
  s = ctx.settings
  batch = last_logits.shape[0]
  step = jnp.int32(0)
  seen = jnp.zeros((batch,), jnp.bool_)
  token = choose_tokens(last_logits[:, None], ctx.temperature, ctx.seed_key, step,
                        greedy=s.greedy)[:, 0]
  token = _force_end_think(ctx, token, step, seen)
  out = jnp.full((batch, s.out_width), UNWRITTEN, jnp.int32).at[:, 0].set(token)
  ones = jnp.ones((batch,), jnp.int32)
  return dict(cache=cache, out=out, token=token, step=step + 1, count=ones, nfe=ones,
              done=is_any(token, ctx.eos_ids), seen=token == ctx.end_think_id)


def running(ctx: Ctx, c: dict) -> jax.Array:
  return (c["step"] < ctx.settings.max_new_tokens) & jnp.any(~c["done"])


def step(ctx: Ctx, c: dict) -> dict:
  """Forward each running row's last token, then sample its next one."""
  s = ctx.settings
  live = ~c["done"]
  logits, cache = ctx.model(c["token"][:, None], pattern="causal", cache=c["cache"],
                            n_new=live.astype(jnp.int32))
  token = choose_tokens(logits, ctx.temperature, ctx.seed_key, c["step"], greedy=s.greedy)[:, 0]
  token = _force_end_think(ctx, token, c["step"], c["seen"])
  token = jnp.where(live, token, c["token"])
  column = jnp.where(live, token, c["out"][:, c["step"]])
  return dict(cache=cache, out=c["out"].at[:, c["step"]].set(column), token=token,
              step=c["step"] + 1, count=c["count"] + live, nfe=c["nfe"] + live,
              done=c["done"] | (live & is_any(token, ctx.eos_ids)),
              seen=c["seen"] | (live & (token == ctx.end_think_id)))
