"""Preallocated, stacked KV cache with per-row lengths.

k, v: [layers, batch, max_len, kv_heads, head_dim]; lengths: [batch] int32. Row b's valid entries
are slots 0 .. lengths[b]-1 and slot s holds absolute position s. Keys are stored post-RoPE and
unscaled (spec §3.5). "Crop" only moves `lengths` back: stale slots beyond it are masked out and
overwritten by the next append.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def crop(self, lengths: jax.Array) -> KVCache:
    """Sets each row's length (<= current); entries past it become invisible."""
    return dataclasses.replace(self, lengths=jnp.minimum(lengths.astype(jnp.int32), self.lengths))

  def with_lengths(self, lengths: jax.Array) -> KVCache:
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def write_layer(buf: jax.Array, layer: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """Writes new [B, T, G, D] into buf [L, B, S, G, D] at `layer`, row b slots offsets[b] + t.

  A scatter touching only the T new slots per row, so that inside a while_loop with a donated
  cache XLA updates the buffer in place. Writes past max_len are dropped (not clamped onto earlier
  slots); callers size the cache so that this never happens for tokens that matter.
  """
  rows = jnp.arange(new.shape[0])[:, None]
  cols = offsets[:, None] + jnp.arange(new.shape[1])[None, :]
  return buf.at[layer, rows, cols].set(new.astype(buf.dtype), mode="drop")
