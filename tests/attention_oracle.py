"""A float64 numpy transcription of NLD's attention masks (docs/model.md §4), the oracle for kernel
tests.

Independent of dllm_jax: written from the mask definitions, with an explicit loop per query.
"""

import numpy as np


def _visible(mask, b, t, s, *, T, S, q_offset, kv_len, block_size):
  """Spec §4 mask predicates for query index t, key slot s of row b."""
  if mask == "causal":
    return s <= q_offset[b] + t
  if mask == "prefix":
    return s < kv_len[b]
  if mask == "bidirectional":
    return True
  n = T // 2
  if t < n and s < n:
    return t // block_size == s // block_size
  if t < n:
    return (s - n) // block_size < t // block_size
  return n <= s <= t


def numpy_attention(q, k, v, *, mask, q_offset=None, kv_len=None, block_k=None, block_v=None,
                    key_valid=None, block_size=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  out = np.zeros((B, T, H, D))
  for b in range(B):
    for t in range(T):
      vis = np.array([_visible(mask, b, t, s, T=T, S=S, q_offset=q_offset, kv_len=kv_len,
                               block_size=block_size) for s in range(S)], bool)
      keys, vals = k[b], v[b]
      if mask == "prefix":
        blk_vis = np.ones(T, bool) if key_valid is None else np.asarray(key_valid[b])
        vis = np.concatenate([vis, blk_vis])
        keys = np.concatenate([keys, np.asarray(block_k[b], np.float64)])
        vals = np.concatenate([vals, np.asarray(block_v[b], np.float64)])
      for h in range(H):
        g = h // (H // G)
        logits = keys[:, g] @ q[b, t, h] / np.sqrt(D)
        w = np.exp(logits[vis] - logits[vis].max())
        out[b, t, h] = (w / w.sum()) @ vals[vis, g]
  return out
