"""Flash attention for NLD's attention patterns, flash-decoding style, written for Mosaic GPU.

Patterns (see `dllm_jax.attention`): "causal" with a per-row cache offset (single-token AR decode,
the 32-token verify / commit block, prefill), "prefix" (a block of T queries over the read-only
cache slots < kv_len[b] plus the block's own keys), "quadratic" (the B(B+1) queries of a quadratic
self-speculation round over the same read-only cache plus their own keys under the quadratic mask),
"bidirectional" and the training "block_diff".

Layout of the work:
  * GQA folded into the tile rows: the R = H / G query heads that share kv head g are stacked with
    the T query positions into T * R rows (row r = t * R + j is query t, head g * R + j), padded to
    the row tile (a multiple of 64, the wgmma M granule). Each K/V tile is read from HBM once per
    (batch, kv head, row tile, split) and multiplied against all its rows; K/V are never repeated.
  * Split-KV (flash-decoding): grid (batch, kv_head, row_tile, split); a split scans its own
    contiguous run of key tiles with a `stages`-deep TMA prefetch ring and an fp32 online softmax
    (base 2), and writes its normalised partial output plus the per-row log-sum-exp. A small XLA
    step (`split_kv.combine`) merges the splits. Decode-time shapes (few rows, long cache) are
    memory-bound, so the splits are what fills the SMs at small batch.
  * Masks are per-row unions of at most two key intervals, computed in-kernel from the row's query
    index (`_key_intervals`), so no mask tensor is ever read. Ragged lengths: tiles past the last
    key a row tile can see are never loaded.
  * "prefix": the block's own T keys are a T x T problem per kv head. They join the combine step as
    one extra partial computed by XLA (`split_kv.block_partial`), so the read-only cache is never
    concatenated with the block and the kernel only streams the cache.
  * "quadratic": every one of the B(B+1) queries sees the whole cache prefix, so the kernel streams
    it exactly as for "prefix" (one interval [0, kv_len), all B(B+1) * R rows per K/V tile: each
    cache tile is read once per row tile and serves B + 1 candidate continuations). The round's own
    keys join as one extra partial (`split_kv.quadratic_partial`), which scores each query against
    only the 2B keys its mask can admit. No mask over the cache or the round is ever built.

The same kernel body runs on CPU in Mosaic GPU interpret mode (`interpret=True`), which simulates
TMA, barriers and wgmma, so CPU tests exercise the code that compiles for Hopper. On GPU, fp32
inputs go through wgmma as tf32; bf16/f16 are the intended fast path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dllm_jax.kernels import split_kv
from dllm_jax.kernels.split_kv import quadratic_block_length

PATTERNS = ("causal", "prefix", "bidirectional", "block_diff", "quadratic")
_ROW_GRANULE = 64  # wgmma M granule on Hopper
_NEG = split_kv.NEG
_LOG2E = math.log2(math.e)
_SMEM_LIMIT = 227 * 1024  # dynamic shared memory per block on H100/H200


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling.

  block_rows: folded query rows (T * H/G) per CTA, a multiple of 64; fewer rows are padded to 64.
  block_kv: keys per tile, a power of two <= 256 (an upper bound: the tile used is the largest
    power of two <= block_kv dividing the key length, at least 32 bytes of P per row).
  num_splits: at most this many KV splits per (batch, kv head, row tile); fewer are used once
    B * G * row_tiles * splits reaches about two CTAs per SM.
  stages: depth of the TMA prefetch ring (K and V tiles in flight).
  """
  # Defaults from a tile sweep on an H100 (docs/benchmarks.md): 64-row tiles give twice the CTAs
  # of 128-row ones for a 32-query block, and 128-key tiles with a 2-deep ring fit in shared memory.
  block_rows: int = 64
  block_kv: int = 128
  num_splits: int = 16
  stages: int = 2

  def __post_init__(self):
    if self.block_rows % _ROW_GRANULE or self.block_rows <= 0:
      raise ValueError(f"block_rows={self.block_rows} must be a positive multiple of 64")
    if self.block_kv not in (8, 16, 32, 64, 128, 256):
      raise ValueError(f"block_kv={self.block_kv} must be a power of two in [8, 256]")
    if self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Static:
  """Trace-time constants of one kernel instance."""
  pattern: str
  group: int  # query heads per kv head (R)
  num_queries: int  # T
  block_rows: int
  block_kv: int
  num_tiles: int  # key tiles in total
  tiles_per_split: int
  stages: int
  scale: float
  diff_block: int  # block_diff block size (0 otherwise)


def _key_intervals(st: _Static, t, base):
  """Visible keys of query index t as two half-open intervals [lo1, hi1) U [lo2, hi2)."""
  zero = jnp.zeros_like(t)
  if st.pattern == "causal":  # base = q_offset + 1
    return zero, base + t, zero, zero
  if st.pattern in ("prefix", "quadratic", "bidirectional"):  # base = visible cache slots
    return zero, zero + base, zero, zero
  n, bs = st.num_queries // 2, st.diff_block  # block_diff over [noisy ; clean], docs/model.md §4.4
  noisy = t < n
  start = lax.div(t, bs) * bs  # noisy query's own block start (t < n)
  lo1 = jnp.where(noisy, start, n)
  hi1 = jnp.where(noisy, start + bs, t + 1)  # own noisy block | clean causal
  hi2 = jnp.where(noisy, n + start, 0)  # clean blocks strictly before the noisy block
  return lo1, hi1, zero + n, hi2


def _visible_tiles(st: _Static, row_tile, base, hi):
  """Key tiles [0, n) that hold every key some row of this row tile may see (a sound bound)."""
  n_keys = hi  # the most keys any row of the call sees
  if st.pattern == "causal":  # the tile's last query sees the most
    last_row = jnp.minimum((row_tile + 1) * st.block_rows, st.num_queries * st.group) - 1
    n_keys = jnp.minimum(base + lax.div(last_row, st.group), hi)
  return jnp.minimum(lax.div(n_keys + st.block_kv - 1, st.block_kv), st.num_tiles)


def _kernel(base_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, *, st: _Static):
  """One CTA: a row tile of (batch b, kv head g) against the key tiles of one split."""
  b = lax.axis_index("batch")
  g = lax.axis_index("kv_head")
  row_tile = lax.axis_index("row_tile")
  split = lax.axis_index("split")
  base = base_ref[b]
  tile_end = _visible_tiles(st, row_tile, base, hi_ref[b])
  first = split * st.tiles_per_split
  n_steps = jnp.clip(jnp.minimum(first + st.tiles_per_split, tile_end) - first, 0,
                     st.tiles_per_split)
  rows, block_kv, stages = st.block_rows, st.block_kv, st.stages

  def fetch(step, slot):
    kv_slice = (b, pl.ds((first + step) * block_kv, block_kv), g)
    plgpu.copy_gmem_to_smem(k_ref.at[kv_slice], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[kv_slice], v_smem.at[slot], v_bar.at[slot])

  plgpu.copy_gmem_to_smem(q_ref.at[b, g, pl.ds(row_tile * rows, rows)], q_smem, q_bar)
  for i in range(stages):  # prologue: fill the prefetch ring
    pl.when(i < n_steps)(functools.partial(fetch, i, i))
  plgpu.barrier_wait(q_bar)

  d = q_smem.shape[-1]
  m_i = plgpu.layout_cast(jnp.full((rows,), _NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  l_i = plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  acc = plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), plgpu.Layout.WGMMA)
  row = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0, layout=plgpu.Layout.WGMMA)
  col = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 1, layout=plgpu.Layout.WGMMA)
  lo1, hi1, lo2, hi2 = _key_intervals(st, lax.div(row + row_tile * rows, st.group), base)

  def step_fn(step, carry):
    acc, m_i, l_i = carry
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(k_bar.at[slot])

    def qk_scope(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]
    s = pl.run_scoped(qk_scope, plgpu.ACC((rows, block_kv), jnp.float32))
    s = s * (st.scale * _LOG2E)
    key = col + (first + step) * block_kv
    visible = ((key >= lo1) & (key < hi1)) | ((key >= lo2) & (key < hi2))
    s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    # Masked entries are zeroed explicitly: with a finite _NEG a fully masked row would otherwise
    # contribute exp2(0) = 1 per key.
    p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0])), 0.0)
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    # P goes through SMEM (wgmma's A operand from SMEM): the form Mosaic GPU interpret mode
    # simulates, and cheap next to the K/V stream.
    p_smem[...] = p.astype(p_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bar.at[slot])

    def pv_scope(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
      return acc_ref[...]
    # A fresh accumulator added in registers rather than `pl.run_state(ACC.init(acc))`: one
    # [rows, D] add per tile, and interpret mode can run it.
    acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((rows, d), jnp.float32))
    # The slot's wgmmas have completed (their results were read back), so it can be refilled.
    pl.when(step + stages < n_steps)(lambda: fetch(step + stages, slot))
    return acc, m_new, l_i

  acc, m_i, l_i = lax.fori_loop(0, n_steps, step_fn, (acc, m_i, l_i))
  nonempty = l_i > 0.0
  safe_l = jnp.where(nonempty, l_i, 1.0)
  o_smem[...] = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
  # Natural-log LSE of the split; _NEG marks "this split saw no key for the row".
  lse_smem[...] = jnp.where(nonempty, m_i / _LOG2E + jnp.log(safe_l), _NEG)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, g, split, pl.ds(row_tile * rows, rows)])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, g, split, pl.ds(row_tile * rows, rows)])
  plgpu.wait_smem_to_gmem(0)


def smem_bytes(block_rows: int, block_kv: int, stages: int, head_dim: int, itemsize: int) -> int:
  """Shared memory of one CTA: Q, the K/V ring, P, the fp32 output tile and the LSE row."""
  tiles = (block_rows * head_dim + 2 * stages * block_kv * head_dim
           + block_rows * block_kv) * itemsize
  return tiles + block_rows * (head_dim + 1) * 4


def default_tiling_fits(head_dim: int, itemsize: int) -> bool:
  """Whether `BlockSizes()` fits in shared memory at this head_dim whatever the shape (the tile
  actually used is never larger), so "auto" only picks this kernel when its defaults can run."""
  bs = BlockSizes()
  return smem_bytes(bs.block_rows, bs.block_kv, bs.stages, head_dim, itemsize) <= _SMEM_LIMIT


def _smem_transforms(minor: int, dtype) -> tuple:
  """Tiling + swizzle for a [rows, minor] SMEM tile that wgmma can read."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = min(128, minor * itemsize)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _check_inputs(q, k, v, mask, q_offset, kv_len, block_k, block_v, key_valid, block_size):
  """One-line errors naming the offending argument."""
  if mask not in PATTERNS:
    raise ValueError(f"mask={mask!r} is not one of {PATTERNS}")
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q must be [B,T,H,D] and k/v [B,S,G,D], got q{q.shape} k{k.shape}")
  b, t, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k{k.shape} / v{v.shape} do not match q{q.shape} as [B,S,G,D]")
  if h % k.shape[2]:
    raise ValueError(f"query heads {h} are not a multiple of kv heads {k.shape[2]}")
  row_bytes = d * jnp.dtype(k.dtype).itemsize
  if d > 256 or not (row_bytes in (32, 64) or row_bytes % 128 == 0):
    raise ValueError(f"head_dim={d} must be <= 256 and span 32, 64 or a multiple of 128 bytes")
  if key_valid is not None and mask != "prefix":
    raise ValueError(f"key_valid is only supported with mask='prefix', got mask={mask!r}")
  if mask == "causal" and q_offset is not None and q_offset.shape != (b,):
    raise ValueError(f"q_offset must be [B]=[{b}], got {q_offset.shape}")
  if mask == "quadratic":
    quadratic_block_length(t)  # raises unless T = B(B+1)
  if mask in ("prefix", "quadratic"):
    if kv_len is None or kv_len.shape != (b,):
      raise ValueError(f"kv_len must be [B]=[{b}], got {None if kv_len is None else kv_len.shape}")
    want = (b, t, k.shape[2], d)
    if block_k is None or block_v is None or block_k.shape != want or block_v.shape != want:
      raise ValueError(f"block_k/block_v must be [B,T,G,D]={want}, got "
                       f"{None if block_k is None else block_k.shape}")
    if key_valid is not None and key_valid.shape != (b, t):
      raise ValueError(f"key_valid must be [B,T]=[{b},{t}], got {key_valid.shape}")
  if mask == "block_diff":
    if t != k.shape[1] or t % 2:
      raise ValueError(f"block_diff needs q and k of equal even length, got {t} and {k.shape[1]}")
    if not block_size or (t // 2) % block_size:
      raise ValueError(f"block_size={block_size} must divide the stream length {t // 2}")


def _interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def _key_tile(s_len: int, block_kv: int, itemsize: int) -> int:
  """The largest power-of-two key tile <= block_kv dividing the key length.

  The tile is the K dimension of the P @ V wgmma, so its row of P must span a whole swizzle
  (32, 64 or 128 bytes); TMA tiles then stay in bounds without padding the cache.
  """
  smallest = 32 // itemsize
  tile = 256
  while tile >= smallest:
    if tile <= block_kv and s_len % tile == 0:
      return tile
    tile //= 2
  raise ValueError(f"key length {s_len} is not a multiple of {smallest} (the smallest key tile)")


@functools.partial(jax.jit, static_argnames=("mask", "block_size", "scale", "block_sizes",
                                             "interpret"))
def flash_attention(q, k, v, *, mask: str, q_offset=None, kv_len=None, block_k=None, block_v=None,
                    key_valid=None, block_size: int | None = None, scale: float | None = None,
                    block_sizes: BlockSizes = BlockSizes(),
                    interpret: bool | plgpu.InterpretGPUParams = False):
  """Attention for one NLD pattern; same arguments and semantics as `attention_reference`.

  q [B,T,H,D]; k, v [B,S,G,D] (slot s = position s); q_offset / kv_len [B] int32; block_k/block_v
  [B,T,G,D] and key_valid [B,T] (block keys) for "prefix"; block_k/block_v for "quadratic" (T =
  B(B+1)); block_size for "block_diff".
  Returns [B,T,H,D] in q's dtype. `interpret=True` (or an `InterpretGPUParams`, e.g. with
  detect_races=True) runs Mosaic GPU interpret mode, which works on CPU.
  """
  _check_inputs(q, k, v, mask, q_offset, kv_len, block_k, block_v, key_valid, block_size)
  b, t, h, d = q.shape
  s_len, g = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  group = h // g
  block_kv = _key_tile(s_len, block_sizes.block_kv, jnp.dtype(k.dtype).itemsize)
  block_rows = min(block_sizes.block_rows, -(-t * group // _ROW_GRANULE) * _ROW_GRANULE)
  row_tiles = -(-t * group // block_rows)
  num_tiles = s_len // block_kv
  num_splits, tiles_per_split = split_kv.num_splits(block_sizes.num_splits, num_tiles,
                                                   b * g * row_tiles)
  st = _Static(pattern=mask, group=group, num_queries=t, block_rows=block_rows, block_kv=block_kv,
               num_tiles=num_tiles, tiles_per_split=tiles_per_split,
               stages=min(block_sizes.stages, tiles_per_split), scale=scale,
               diff_block=block_size if mask == "block_diff" else 0)
  if mask == "causal":
    offs = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    base, hi = offs + 1, offs + t  # query t sees slots < offs + t + 1
  elif mask in ("prefix", "quadratic"):
    base = hi = kv_len.astype(jnp.int32)
  else:
    base = hi = jnp.full((b,), s_len, jnp.int32)
  dtype = k.dtype
  total_rows = row_tiles * block_rows
  smem = smem_bytes(st.block_rows, st.block_kv, st.stages, d, jnp.dtype(dtype).itemsize)
  if smem > _SMEM_LIMIT and _interpret_params(interpret) is None:
    raise ValueError(f"block_sizes={block_sizes} need {smem // 1024} KiB of shared memory for "
                     f"head_dim={d}, over the {_SMEM_LIMIT // 1024} KiB per block of Hopper")
  kernel = plgpu.kernel(
      functools.partial(_kernel, st=st),
      out_type=(jax.ShapeDtypeStruct((b, g, num_splits, total_rows, d), jnp.float32),
                jax.ShapeDtypeStruct((b, g, num_splits, total_rows), jnp.float32)),
      scratch_types=(
          plgpu.SMEM((block_rows, d), dtype, transforms=_smem_transforms(d, dtype)),
          plgpu.SMEM((st.stages, block_kv, d), dtype, transforms=_smem_transforms(d, dtype)),
          plgpu.SMEM((st.stages, block_kv, d), dtype, transforms=_smem_transforms(d, dtype)),
          plgpu.SMEM((block_rows, block_kv), dtype, transforms=_smem_transforms(block_kv, dtype)),
          plgpu.SMEM((block_rows, d), jnp.float32),
          plgpu.SMEM((block_rows,), jnp.float32),
          plgpu.Barrier(),
          plgpu.Barrier(num_barriers=st.stages),
          plgpu.Barrier(num_barriers=st.stages),
      ),
      grid=(b, g, row_tiles, num_splits),
      grid_names=("batch", "kv_head", "row_tile", "split"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )
  o_parts, lse_parts = kernel(base, hi, split_kv.fold_queries(q.astype(dtype), g, total_rows),
                              k, v)
  return split_kv.finish(o_parts, lse_parts, q, block_k=block_k, block_v=block_v,
                         key_valid=key_valid, scale=scale,
                         quadratic_block=quadratic_block_length(t) if mask == "quadratic" else 0)
