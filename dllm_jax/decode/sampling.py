"""Token choice and commit selection shared by the three decoding modes (docs/model.md §5, §9.2
items 4-5).

Randomness: every sampling event draws U(0,1) noise from `event_key(seed, event, row)`, so a row's
noise depends only on (seed, event number, row index) and never on the batch size. A draw is the
Gumbel-max argmax over v of logits_v / T - log(-log u_v), which selects the same token as the
reference's float64 `exp(l) / (-log u)^T` (docs/model.md §5.1) and is a sample from softmax(logits /
T) (the reference's `multinomial` in §5.2/§5.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def event_key(seed_key: jax.Array, event: jax.Array, row: jax.Array) -> jax.Array:
  """Key of sampling event `event` for batch row `row`."""
  return jax.random.fold_in(jax.random.fold_in(seed_key, event), row)


def uniform_noise(seed_key: jax.Array, event: jax.Array, rows: jax.Array, shape) -> jax.Array:
  """[B, *shape] fp32 U(0,1) noise, row b drawn from event_key(seed, event, rows[b])."""
  tiny = jnp.finfo(jnp.float32).tiny
  draw = lambda r: jax.random.uniform(event_key(seed_key, event, r), shape, jnp.float32,
                                      minval=tiny, maxval=1.0)
  return jax.vmap(draw)(rows)


def choose_tokens(logits: jax.Array, temperature: jax.Array, seed_key: jax.Array,
                  event: jax.Array, *, greedy: bool) -> jax.Array:
  """logits [B, T, V] -> token ids [B, T]: argmax when greedy, else a Gumbel-max draw at T."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  b, t, v = logits.shape
  u = uniform_noise(seed_key, event, jnp.arange(b), (t, v))
  scores = logits.astype(jnp.float32) / temperature - jnp.log(-jnp.log(u))
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def token_confidence(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """p(token) under softmax(logits), rounded to the logits dtype, [B, T].

  The reference takes this softmax on bf16 logits; torch accumulates it in fp32 and rounds the
  probabilities to bf16, which is what decides the threshold commits (docs/model.md §9.2 item 4), so
  the same rounding happens here. With fp32 logits it is the plain fp32 softmax.
  """
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
  return jnp.take_along_axis(p, tokens[..., None], axis=-1)[..., 0]


def masked_confidence(conf: jax.Array, is_mask: jax.Array) -> jax.Array:
  """Confidence at MASK positions, -inf elsewhere (never selected before a masked position)."""
  return jnp.where(is_mask, conf, jnp.array(-jnp.inf, conf.dtype))


def select_threshold(conf: jax.Array, is_mask: jax.Array, threshold: jax.Array) -> jax.Array:
  """{most confident masked position} U {masked positions with conf >= threshold}, [B, T] bool.

  `conf` is already -inf off the mask. The threshold is compared in the confidence dtype, as torch
  does when it compares a bf16 tensor with a Python float (0.9 -> 0.8984375 in bf16). Exactly one
  guaranteed position per row (the first on ties), never an epsilon band (docs/model.md §9.2 item
  5).
  """
  top1 = jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=jnp.bool_)
  return is_mask & (top1 | (conf >= threshold.astype(conf.dtype)))


def select_top_k(conf: jax.Array, k: jax.Array) -> jax.Array:
  """The k[b] most confident positions of each row (ties: lower position first), [B, T] bool."""
  order = jnp.argsort(-conf.astype(jnp.float32), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return rank < k[:, None]


def transfer_schedule(num_masked: jax.Array, steps: int) -> jax.Array:
  """[B, steps] commits per step without a threshold: M // steps, +1 for the first M % steps."""
  base = num_masked[:, None] // steps
  extra = (jnp.arange(steps)[None, :] < (num_masked[:, None] % steps)).astype(num_masked.dtype)
  return base + extra


def is_any(tokens: jax.Array, ids: jax.Array) -> jax.Array:
  """tokens == any of ids [K] (entries of -1 match nothing: ids are padded with -1)."""
  return jnp.any(tokens[..., None] == ids, axis=-1)
