"""Mask builders against hand-written tables, and the XLA reference against naive numpy attention."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax import attention as A


def block_diff_table(n, bs):
  """Spec §4.4 written as loops: [noisy 0..n-1 ; clean n..2n-1], stream-relative blocks."""
  m = np.zeros((2 * n, 2 * n), bool)
  for q, k in itertools.product(range(2 * n), repeat=2):
    q_noisy, k_noisy = q < n, k < n
    qb, kb = (q % n) // bs, (k % n) // bs
    if q_noisy and k_noisy:
      m[q, k] = qb == kb
    elif q_noisy and not k_noisy:
      m[q, k] = kb < qb
    elif not q_noisy and not k_noisy:
      m[q, k] = k <= q
  return m


def test_block_diff_literal_smallest_case():
  # n=2, block 1, derived by hand: noisy q0 sees only itself; noisy q1 sees itself and clean
  # block 0; clean queries are causal over the clean stream and never see noisy keys.
  want = np.array([[1, 0, 0, 0],
                   [0, 1, 1, 0],
                   [0, 0, 1, 0],
                   [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(np.asarray(A.block_diff_mask(2, 1)), want)


@pytest.mark.parametrize("n,bs", [(4, 2), (5, 2), (6, 4), (3, 1), (4, 8), (7, 3), (8, 8)])
def test_block_diff_matches_table(n, bs):  # includes lengths that are not block multiples
  np.testing.assert_array_equal(np.asarray(A.block_diff_mask(n, bs)), block_diff_table(n, bs))


def test_causal_and_prefix_masks_batched():
  offs = jnp.array([0, 3, 5])
  m = np.asarray(A.causal_mask(offs, 2, 8))
  for b, t, s in itertools.product(range(3), range(2), range(8)):
    assert m[b, t, s] == (s <= int(offs[b]) + t)
  lens = jnp.array([0, 2, 8])
  m = np.asarray(A.prefix_mask(lens, 3, 8))
  for b, t, s in itertools.product(range(3), range(3), range(8)):
    assert m[b, t, s] == (s < int(lens[b]))


def naive_attention(q, k, v, allowed):
  """Loops over heads with explicit GQA repeat; allowed [B, T, S]."""
  b, t, h, d = q.shape
  g = k.shape[2]
  out = np.zeros((b, t, h, d))
  for bi, hi in itertools.product(range(b), range(h)):
    kh, vh = k[bi, :, hi // (h // g)], v[bi, :, hi // (h // g)]
    s = q[bi, :, hi] @ kh.T / np.sqrt(d)
    s = np.where(allowed[bi], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ vh
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_reference_patterns_against_naive(rng, heads, kv_heads):
  b, t, s, d = 2, 4, 9, 8
  q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
  k = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
  v = rng.standard_normal((b, s, kv_heads, d)).astype(np.float32)
  offs = np.array([2, 5])
  allowed = np.arange(s)[None, None] <= (offs[:, None, None] + np.arange(t)[None, :, None])
  got = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask="causal",
                    q_offset=jnp.asarray(offs))
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, allowed), atol=1e-5)

  # prefix: cache slots < kv_len plus the whole block, equal to attention over [cache ; block].
  kb = rng.standard_normal((b, t, kv_heads, d)).astype(np.float32)
  vb = rng.standard_normal((b, t, kv_heads, d)).astype(np.float32)
  kv_len = np.array([0, 6])
  got = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask="prefix",
                    kv_len=jnp.asarray(kv_len), block_k=jnp.asarray(kb), block_v=jnp.asarray(vb))
  allowed = np.concatenate([np.broadcast_to((np.arange(s)[None] < kv_len[:, None])[:, None],
                                            (b, t, s)), np.ones((b, t, t), bool)], -1)
  want = naive_attention(q, np.concatenate([k, kb], 1), np.concatenate([v, vb], 1), allowed)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

  # block_diff over a dual stream of length 2n.
  n, bs = 4, 2
  q2 = rng.standard_normal((1, 2 * n, heads, d)).astype(np.float32)
  k2 = rng.standard_normal((1, 2 * n, kv_heads, d)).astype(np.float32)
  v2 = rng.standard_normal((1, 2 * n, kv_heads, d)).astype(np.float32)
  got = A.attention(jnp.asarray(q2), jnp.asarray(k2), jnp.asarray(v2), mask="block_diff",
                    block_size=bs)
  np.testing.assert_allclose(np.asarray(got), naive_attention(q2, k2, v2,
                                                              block_diff_table(n, bs)[None]),
                             atol=1e-5)


def test_unknown_pattern_is_rejected():
  x = jnp.zeros((1, 1, 1, 2))
  with pytest.raises(ValueError, match="unknown mask pattern 'sliding'"):
    A.attention(x, x, x, mask="sliding")
