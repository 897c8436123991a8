"""Preallocated KV cache, one buffer pair per layer, with per-row lengths.

k[i], v[i]: layer i's [batch, max_len, kv_heads, head_dim]; lengths: [batch] int32. Row b's valid
entries are slots 0 .. lengths[b]-1 and slot s holds absolute position s. Keys are stored post-RoPE
and unscaled (docs/model.md §3.5). "Crop" only moves `lengths` back: stale slots beyond it are
masked out and overwritten by the next append.

Each layer owns its buffers (no stacked [layers, ...] array) so that a layer's attention, XLA or a
Pallas/Triton kernel, takes its cache as a whole buffer: a slice of a stacked cache fed to a kernel
is a copy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Frozen, hence hashable when it holds shardings (a jit static argument)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    layers = range(cfg.num_layers)
    return cls(tuple(jnp.zeros(shape, dtype) for _ in layers),
               tuple(jnp.zeros(shape, dtype) for _ in layers), jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  def crop(self, lengths: jax.Array) -> KVCache:
    """Sets each row's length (<= current); entries past it become invisible."""
    return dataclasses.replace(self, lengths=jnp.minimum(lengths.astype(jnp.int32), self.lengths))

  def with_lengths(self, lengths: jax.Array) -> KVCache:
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def write_layer(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """Writes new [B, T, G, D] into one layer's buf [B, S, G, D], row b at slots offsets[b] + t.

  A scatter touching only the T new slots per row, so that inside a while_loop with a donated
  cache XLA updates the buffer in place. Writes past max_len are dropped (not clamped onto earlier
  slots); callers size the cache so that this never happens for tokens that matter.
  """
  rows = jnp.arange(new.shape[0])[:, None]
  cols = offsets[:, None] + jnp.arange(new.shape[1])[None, :]
  return buf.at[rows, cols].set(new.astype(buf.dtype), mode="drop")
