"""Split-KV (flash-decoding) attention for NLD's decode-time patterns as a raw Triton kernel.

Patterns: "causal" with a per-row cache offset (AR decode, 32-token verify/commit) and "prefix"
(a block of T queries over the cached slots < kv_len[b]; the block's own keys join in XLA, see
`kernels/split_kv.py`). The layout is the same as the Mosaic GPU kernel's: GQA folded into rows
(row t * R + j = query t, head g * R + j), grid (batch * kv_head, split, row_tile), an fp32 online
softmax per split, and an XLA combine of the normalised partials by their LSEs.

It is called from JAX through `jax_triton.triton_call` (CUDA only; jax_triton is imported inside
`decode_attention`, so this module imports wherever triton does). It serves pre-Hopper GPUs, where
Mosaic GPU does not run. On CPU the same `@triton.jit` body runs in Triton's interpreter on torch
tensors (tests/test_kernels_triton.py).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from dllm_jax.kernels import split_kv


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_rows: folded query rows per program (>= 16: tl.dot's minimum M); block_kv: keys per
  loop step; num_splits: KV splits; num_warps / num_stages: Triton launch options."""
  block_rows: int = 64
  block_kv: int = 64
  num_splits: int = 16
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_rows", "block_kv"):
      val = getattr(self, name)
      if val < 16 or val & (val - 1):
        raise ValueError(f"{name}={val} must be a power of two >= 16")
    if self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, base_ptr, hi_ptr, o_ptr, lse_ptr,
                 SCALE: tl.constexpr, S: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
                 ROWS: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 KEYS_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr):
  """q [B,G,ROWS,D] folded; k/v [B,S,G,D]; base/hi [B] int32; o [B,G,NUM_SPLITS,ROWS,D] fp32 and
  lse [B,G,NUM_SPLITS,ROWS] fp32 (natural log; -1e30 where the split saw no key)."""
  bg = tl.program_id(0).to(tl.int64)  # offsets below exceed int32 at long caches x batch
  split = tl.program_id(1)
  row_tile = tl.program_id(2)
  b = bg // G
  g = bg % G
  base = tl.load(base_ptr + b)
  hi = tl.load(hi_ptr + b)
  rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
  dims = tl.arange(0, D)
  q = tl.load(q_ptr + (bg * ROWS + rows[:, None]) * D + dims[None, :])
  if CAUSAL:
    limit = base + rows // R  # query t sees slots < q_offset + t + 1 (base = q_offset + 1)
    last = base + (tl.minimum(row_tile * BLOCK_M + BLOCK_M, ROWS) - 1) // R
  else:
    limit = base + rows * 0
    last = hi
  start = split * KEYS_PER_SPLIT
  end = tl.minimum(tl.minimum(start + KEYS_PER_SPLIT, last), hi)  # ragged rows skip dead tiles
  m_i = tl.full([BLOCK_M], -1e30, tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, D], tl.float32)
  for k0 in range(start, end, BLOCK_N):
    keys = k0 + tl.arange(0, BLOCK_N)
    kv_off = ((b * S + keys[:, None]) * G + g) * D + dims[None, :]
    k = tl.load(k_ptr + kv_off, mask=keys[:, None] < S, other=0.0)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * SCALE
    visible = (keys[None, :] < limit[:, None]) & (keys[None, :] < S)
    s = tl.where(visible, s, -1e30)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + kv_off, mask=keys[:, None] < S, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    m_i = m_new
  nonempty = l_i > 0.0
  safe_l = tl.where(nonempty, l_i, 1.0)
  out_rows = (bg * NUM_SPLITS + split) * ROWS + rows
  tl.store(o_ptr + out_rows[:, None] * D + dims[None, :], acc / safe_l[:, None])
  tl.store(lse_ptr + out_rows, tl.where(nonempty, m_i + tl.log(safe_l), -1e30))


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
  """Grid and constexprs of one `split_kernel` launch (shared by the JAX and torch launchers)."""
  grid: tuple[int, int, int]
  rows: int
  num_splits: int
  constexprs: dict


def plan(q_shape, k_shape, *, mask: str, scale: float, block_sizes: BlockSizes) -> LaunchPlan:
  """Validates shapes and lays out the launch; one-line errors name the offending argument."""
  b, t, h, d = q_shape
  s_len, g = k_shape[1], k_shape[2]
  if mask not in ("causal", "prefix"):
    raise ValueError(f"the Triton kernel handles mask='causal' or 'prefix', got {mask!r}")
  if h % g:
    raise ValueError(f"query heads {h} are not a multiple of kv heads {g}")
  if d < 16 or d & (d - 1):
    raise ValueError(f"head_dim={d} must be a power of two >= 16 (tl.arange)")
  rows_needed = t * (h // g)
  block_m = min(block_sizes.block_rows, max(16, triton.next_power_of_2(rows_needed)))
  rows = -(-rows_needed // block_m) * block_m
  block_n = min(block_sizes.block_kv, max(16, triton.next_power_of_2(s_len)))
  tiles = -(-s_len // block_n)
  num_splits, tiles_per_split = split_kv.num_splits(block_sizes.num_splits, tiles,
                                                    b * g * (rows // block_m))
  keys_per_split = tiles_per_split * block_n
  return LaunchPlan(
      grid=(b * g, num_splits, rows // block_m), rows=rows, num_splits=num_splits,
      constexprs=dict(SCALE=scale, S=s_len, G=g, R=h // g, ROWS=rows, D=d, NUM_SPLITS=num_splits,
                      KEYS_PER_SPLIT=keys_per_split, BLOCK_M=block_m, BLOCK_N=block_n,
                      CAUSAL=mask == "causal"))


def row_bounds(mask: str, batch: int, num_queries: int, q_offset=None, kv_len=None):
  """(base, hi) [B] int32: row t sees slots < base + t (causal) or < base; hi = most keys seen."""
  if mask == "causal":
    offs = jnp.zeros((batch,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    return offs + 1, offs + num_queries
  return kv_len.astype(jnp.int32), kv_len.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("mask", "block_size", "scale", "block_sizes"))
def decode_attention(q, k, v, *, mask: str, q_offset=None, kv_len=None, block_k=None,
                     block_v=None, key_valid=None, block_size: int | None = None,
                     scale: float | None = None, block_sizes: BlockSizes = BlockSizes()):
  """Same arguments and semantics as `attention_reference` for mask="causal" / "prefix" (GPU)."""
  import jax_triton as jt  # pylint: disable=g-import-not-at-top  (cannot import on a CPU jaxlib)
  del block_size
  if key_valid is not None and mask != "prefix":
    raise ValueError(f"key_valid is only supported with mask='prefix', got mask={mask!r}")
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  lp = plan(q.shape, k.shape, mask=mask, scale=scale, block_sizes=block_sizes)
  base, hi = row_bounds(mask, b, t, q_offset, kv_len)
  g = k.shape[2]
  out_types = (jax.ShapeDtypeStruct((b, g, lp.num_splits, lp.rows, d), jnp.float32),
               jax.ShapeDtypeStruct((b, g, lp.num_splits, lp.rows), jnp.float32))
  # jax-triton 0.4 renamed out_shape to out_type; 0.3.x (the release for triton 3.6) only has
  # out_shape.
  out_kw = ("out_type" if "out_type" in inspect.signature(jt.triton_call).parameters
            else "out_shape")
  o_parts, lse_parts = jt.triton_call(
      split_kv.fold_queries(q.astype(k.dtype), g, lp.rows), k, v, base, hi,
      kernel=split_kernel, grid=lp.grid, num_warps=block_sizes.num_warps,
      num_stages=block_sizes.num_stages, **{out_kw: out_types}, **lp.constexprs)
  return split_kv.finish(o_parts, lse_parts, q, block_k=block_k, block_v=block_v,
                         key_valid=key_valid, scale=scale)
