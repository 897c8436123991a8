"""XLA side of split-KV (flash-decoding) attention, shared by the Mosaic GPU and Triton kernels.

Kernels see queries with GQA folded into rows: for kv head g, row t * R + j is query t of head
g * R + j (R = H / G). Each split of the key range yields a normalised partial output and the
per-row natural-log LSE; `combine` merges them exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": keeps empty rows/splits NaN-free (-inf - -inf = NaN)
TARGET_CTAS = 2 * 132  # two programs per SM of an H100 SXM / H200


def num_splits(requested: int, num_tiles: int, programs: int) -> tuple[int, int]:
  """(splits, tiles per split) for `num_tiles` key tiles when the grid already has `programs`
  programs besides the split axis.

  Splits only need to fill the GPU (~2 programs per SM); more would add combine traffic and, for
  long query blocks, partial outputs the size of the whole problem. No split is left without a
  tile.
  """
  n = min(requested, num_tiles, max(1, -(-TARGET_CTAS // programs)))
  per_split = -(-num_tiles // n)
  return -(-num_tiles // per_split), per_split


def fold_queries(q: jax.Array, num_kv_heads: int, total_rows: int) -> jax.Array:
  """[B, T, H, D] -> [B, G, rows, D], row t * R + j = head g * R + j at query t, zero-padded."""
  b, t, h, d = q.shape
  qg = q.reshape(b, t, num_kv_heads, h // num_kv_heads, d).transpose(0, 2, 1, 3, 4)
  qg = qg.reshape(b, num_kv_heads, t * (h // num_kv_heads), d)
  return jnp.pad(qg, ((0, 0), (0, 0), (0, total_rows - qg.shape[2]), (0, 0)))


def unfold_rows(x: jax.Array, t: int, h: int) -> jax.Array:
  """[B, G, rows, D] -> [B, T, H, D] (inverse of `fold_queries`, dropping padding rows)."""
  b, g, _, d = x.shape
  x = x[:, :, :t * (h // g)].reshape(b, g, t, h // g, d).transpose(0, 2, 1, 3, 4)
  return x.reshape(b, t, h, d)


def block_partial(q, block_k, block_v, key_valid, scale):
  """The prefix block's own keys as one more split: (o [B,G,T*R,D] normalised, lse [B,G,T*R])."""
  b, t, h, d = q.shape
  g = block_k.shape[2]
  qg = q.reshape(b, t, g, h // g, d)
  s = jnp.einsum("btgrd,bsgd->bgtrs", qg, block_k, preferred_element_type=jnp.float32) * scale
  if key_valid is not None:
    s = jnp.where(key_valid[:, None, None, None, :], s, NEG)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  o = jnp.einsum("bgtrs,bsgd->bgtrd", p.astype(block_v.dtype), block_v,
                 preferred_element_type=jnp.float32)
  return o.reshape(b, g, t * (h // g), d), lse.reshape(b, g, t * (h // g))


def quadratic_block_length(num_queries: int) -> int:
  """B of a quadratic self-speculation round of num_queries = B(B+1) tokens (one-line error for
  other counts)."""
  size = (math.isqrt(4 * num_queries + 1) - 1) // 2
  if size < 1 or size * (size + 1) != num_queries:
    raise ValueError(f"a quadratic round has B(B+1) tokens for a block length B, got {num_queries}")
  return size


def quadratic_partial(q, block_k, block_v, block_length, scale):
  """A quadratic round's own keys (dllm_jax.attention.quadratic_mask) as one more split.

  Query (i, m) sees at most 2B of the B(B+1) round keys: the drafts d_0..d_i and, when m > 0, the
  B MASKs of its own sub-block. Scores are taken against exactly those two [B]-key sets, so no
  [T, T] mask or score matrix is formed: B(B+1) x 2B scores per head instead of B^2(B+1)^2.
  Returns (o [B,G,T*R,D] normalised, lse [B,G,T*R]).
  """
  b, t, h, d = q.shape
  g, size = block_k.shape[2], block_length
  qg = q.reshape(b, size, size + 1, g, h // g, d)

  def split(x):  # the drafts [b, j, G, D] and each sub-block's MASK keys [b, i, n, G, D]
    x = x.reshape(b, size, size + 1, g, d)
    return x[:, :, 0], x[:, :, 1:]

  (k_draft, k_own), (v_draft, v_own) = split(block_k), split(block_v)
  s_draft = jnp.einsum("bimgrd,bjgd->bgimrj", qg, k_draft, preferred_element_type=jnp.float32)
  s_own = jnp.einsum("bimgrd,bingd->bgimrn", qg, k_own, preferred_element_type=jnp.float32)
  sub = jnp.arange(size)
  draft_seen = (sub[None, :] <= sub[:, None])[:, None, None, :]  # [i, 1, 1, j]
  own_seen = (jnp.arange(size + 1) > 0)[None, :, None, None]     # [1, m, 1, 1]
  s = jnp.concatenate([jnp.where(draft_seen, s_draft * scale, NEG),
                       jnp.where(own_seen, s_own * scale, NEG)], axis=-1)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None]).astype(block_v.dtype)
  o = (jnp.einsum("bgimrj,bjgd->bgimrd", p[..., :size], v_draft,
                  preferred_element_type=jnp.float32)
       + jnp.einsum("bgimrn,bingd->bgimrd", p[..., size:], v_own,
                    preferred_element_type=jnp.float32))
  rows = t * (h // g)
  return o.reshape(b, g, rows, d), lse.reshape(b, g, rows)


def combine(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
  """Merges normalised split outputs [B,G,n,M,D] with their LSEs [B,G,n,M] -> [B,G,M,D] fp32."""
  lse_max = lse_parts.max(axis=2, keepdims=True)
  w = jnp.exp(lse_parts - lse_max)  # empty splits carry NEG: weight 0 unless all are empty
  return (w[..., None] * o_parts).sum(axis=2) / w.sum(axis=2)[..., None]


def finish(o_parts: jax.Array, lse_parts: jax.Array, q: jax.Array, *, block_k=None, block_v=None,
           key_valid=None, scale: float, quadratic_block: int = 0) -> jax.Array:
  """Kernel partials [B,G,n,rows,D] / [B,G,n,rows] -> attention output [B,T,H,D] in q's dtype.

  With block_k/block_v ("prefix", or "quadratic" with its block length `quadratic_block`), the
  block's own keys join as one more split.
  """
  b, t, h, _ = q.shape
  if block_k is not None:
    if quadratic_block:
      o_blk, lse_blk = quadratic_partial(q, block_k, block_v, quadratic_block, scale)
    else:
      o_blk, lse_blk = block_partial(q, block_k, block_v, key_valid, scale)
    pad = o_parts.shape[3] - o_blk.shape[2]
    o_blk = jnp.pad(o_blk, ((0, 0), (0, 0), (0, pad), (0, 0)))
    lse_blk = jnp.pad(lse_blk, ((0, 0), (0, 0), (0, pad)), constant_values=NEG)
    o_parts = jnp.concatenate([o_parts, o_blk[:, :, None]], axis=2)
    lse_parts = jnp.concatenate([lse_parts, lse_blk[:, :, None]], axis=2)
  return unfold_rows(combine(o_parts, lse_parts), t, h).astype(q.dtype)
