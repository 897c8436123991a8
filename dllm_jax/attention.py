"""NLD's attention patterns: mask builders, the plain-XLA reference, and the `attention` dispatcher.

Layouts: q [B, T, H, D]; k, v [B, S, G, D] with H = G * R (query head h reads kv head h // R).
Key slot s of a cache holds absolute position s (each row's cache is contiguous from 0), so masks
are functions of (query position, key slot, per-row lengths).

Patterns (spec §4):
  "causal"        query at position q_offset[b] + t sees keys s <= q_offset[b] + t. Used for prefill,
                  AR decode, the post-block commit and the speculative verify (K/V already appended).
  "prefix"        a block of T queries sees the cached prefix s < kv_len[b] plus every key of the
                  block itself (block_k/block_v, never written to the cache): diffusion denoising steps
                  and speculative drafts.
  "bidirectional" every query sees every (valid) key: diffusion without a cache.
  "block_diff"    the training dual-stream [noisy ; clean] mask of length 2n (spec §4.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_PATTERNS = ("causal", "prefix", "bidirectional", "block_diff")


# --- mask builders (pure, shared by the reference and the tests) ----------------------------------

def causal_mask(q_offset: jax.Array, num_queries: int, num_keys: int) -> jax.Array:
  """[B, T, S] bool: key slot s visible to query t of row b iff s <= q_offset[b] + t."""
  q_pos = q_offset[:, None] + jnp.arange(num_queries)[None, :]
  return jnp.arange(num_keys)[None, None, :] <= q_pos[:, :, None]


def prefix_mask(kv_len: jax.Array, num_queries: int, num_keys: int) -> jax.Array:
  """[B, T, S] bool over the cache part of a prefix-block attention: slot s visible iff s < kv_len."""
  visible = jnp.arange(num_keys)[None, :] < kv_len[:, None]
  return jnp.broadcast_to(visible[:, None, :], (kv_len.shape[0], num_queries, num_keys))


def block_diff_mask(n: int, block_size: int) -> jax.Array:
  """[2n, 2n] bool training mask over [noisy (0..n-1) ; clean (n..2n-1)] (spec §4.4)."""
  idx = jnp.arange(2 * n)
  noisy = idx < n
  blk = (idx % n) // block_size  # stream-relative block index
  q_noisy, k_noisy = noisy[:, None], noisy[None, :]
  q_blk, k_blk = blk[:, None], blk[None, :]
  block_diagonal = q_noisy & k_noisy & (q_blk == k_blk)
  offset_block_causal = q_noisy & ~k_noisy & (k_blk < q_blk)
  fully_causal = ~q_noisy & ~k_noisy & (idx[None, :] <= idx[:, None])
  return block_diagonal | offset_block_causal | fully_causal


# --- reference XLA attention -------------------------------------------------------------------

def _scores(q, k, scale):
  """q [B,T,H,D], k [B,S,G,D] -> fp32 scores [B,G,R,T,S] without repeating K across the group."""
  b, t, h, d = q.shape
  g = k.shape[2]
  qg = q.reshape(b, t, g, h // g, d)
  return jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * scale


def _weighted_values(p, v, dtype):
  """p [B,G,R,T,S] fp32, v [B,S,G,D] -> [B,T,H,D]."""
  out = jnp.einsum("bgrts,bsgd->btgrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  b, t, g, r, d = out.shape
  return out.reshape(b, t, g * r, d).astype(dtype)


def _masked_softmax(s, mask):
  # A large finite negative instead of -inf keeps fully masked rows (padding queries) NaN-free.
  s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1)


def attention_reference(q, k, v, *, mask: str, q_offset=None, kv_len=None, block_k=None,
                        block_v=None, block_size=None, key_valid=None, scale=None):
  """Plain XLA attention for every pattern; the oracle for kernels. fp32 softmax."""
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  if mask == "prefix":
    # Scores against cache and block are computed separately and softmaxed jointly, so the
    # read-only cache is never concatenated with (copied next to) the block.
    s_cache = _scores(q, k, scale)
    s_blk = _scores(q, block_k, scale)
    m_cache = prefix_mask(kv_len, t, k.shape[1])[:, None, None]
    m_blk = jnp.ones((b, 1, 1, t, block_k.shape[1]), bool)
    if key_valid is not None:
      m_blk = m_blk & key_valid[:, None, None, None, :]
    p = _masked_softmax(jnp.concatenate([s_cache, s_blk], -1),
                        jnp.concatenate([jnp.broadcast_to(m_cache, s_cache.shape),
                                         jnp.broadcast_to(m_blk, s_blk.shape)], -1))
    s_len = k.shape[1]
    return (_weighted_values(p[..., :s_len], v, jnp.float32)
            + _weighted_values(p[..., s_len:], block_v, jnp.float32)).astype(q.dtype)
  s = _scores(q, k, scale)
  n_keys = k.shape[1]
  if mask == "causal":
    offs = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset
    m = causal_mask(offs, t, n_keys)
  elif mask == "bidirectional":
    m = jnp.ones((b, t, n_keys), bool)
  elif mask == "block_diff":
    if t != n_keys or t % 2:
      raise ValueError(f"block_diff needs q and k of equal even length, got {t} and {n_keys}")
    m = jnp.broadcast_to(block_diff_mask(t // 2, block_size)[None], (b, t, n_keys))
  else:
    raise ValueError(f"unknown mask pattern {mask!r}; expected one of {MASK_PATTERNS}")
  if key_valid is not None:
    m = m & key_valid[:, None, :]
  p = _masked_softmax(s, m[:, None, None])
  return _weighted_values(p, v, q.dtype)


# --- dispatcher --------------------------------------------------------------------------------

def resolve_impl(impl: str) -> str:
  """Maps "auto" to a concrete implementation for the current platform."""
  if impl != "auto":
    return impl
  return "xla"  # kernels register measured wins per platform in kernels/; XLA is the safe default


def attention(q, k, v, *, mask: str, impl: str = "xla", **kw):
  """Runs one attention pattern (see module docstring) with the chosen implementation."""
  if mask not in MASK_PATTERNS:
    raise ValueError(f"unknown mask pattern {mask!r}; expected one of {MASK_PATTERNS}")
  impl = resolve_impl(impl)
  if impl == "xla":
    with jax.named_scope(f"attention_{mask}"):
      return attention_reference(q, k, v, mask=mask, **kw)
  raise NotImplementedError(f"attention_impl={impl!r} is not available in this build")
