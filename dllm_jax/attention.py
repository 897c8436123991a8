"""NLD's attention patterns: mask builders, the plain-XLA reference, and the `attention` dispatcher.

Layouts: q [B, T, H, D]; k, v [B, S, G, D] with H = G * R (query head h reads kv head h // R).
Key slot s of a cache holds absolute position s (each row's cache is contiguous from 0), so masks
are functions of (query position, key slot, per-row lengths).

Patterns (docs/model.md §4):
  "causal"        query at position q_offset[b] + t sees keys s <= q_offset[b] + t. Used for prefill,
                  AR decode, the post-block commit and the speculative verify (K/V already appended).
  "prefix"        a block of T queries sees the cached prefix s < kv_len[b] plus every key of the
                  block itself (block_k/block_v, never written to the cache): diffusion denoising steps
                  and speculative drafts.
  "bidirectional" every query sees every (valid) key: diffusion without a cache.
  "quadratic"     the round of quadratic self-speculation (docs/model.md §5.6): B sub-blocks
                  [d_i, MASK x B] of B(B+1) queries see the cached prefix s < kv_len[b] and, among
                  the block's own keys (block_k/block_v, never written here), the drafts d_j for
                  j <= i and, for the MASK queries only, their own sub-block (`quadratic_mask`).
  "block_diff"    the training dual-stream [noisy ; clean] mask of length 2n (docs/model.md §4.4).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.kernels.split_kv import quadratic_block_length

MASK_PATTERNS = ("causal", "prefix", "bidirectional", "block_diff", "quadratic")
# Patterns whose queries bring their own keys (block_k/block_v) next to a read-only cache.
BLOCK_PATTERNS = ("prefix", "quadratic")


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
  """[2n, 2n] bool training mask over [noisy (0..n-1) ; clean (n..2n-1)] (docs/model.md §4.4)."""
  idx = jnp.arange(2 * n)
  noisy = idx < n
  blk = (idx % n) // block_size  # stream-relative block index
  q_noisy, k_noisy = noisy[:, None], noisy[None, :]
  q_blk, k_blk = blk[:, None], blk[None, :]
  block_diagonal = q_noisy & k_noisy & (q_blk == k_blk)
  offset_block_causal = q_noisy & ~k_noisy & (k_blk < q_blk)
  fully_causal = ~q_noisy & ~k_noisy & (idx[None, :] <= idx[:, None])
  return block_diagonal | offset_block_causal | fully_causal


def quadratic_mask(block_length: int) -> np.ndarray:
  """[T, T] bool over the T = B(B+1) tokens of a quadratic round, token i(B+1) + m being slot m of
  sub-block i (m = 0: the draft d_i; m > 0: a MASK). Query (i, m) sees key (j, n) iff the key is
  an earlier-or-own draft (n = 0, j <= i) or, for a MASK query, any token of its own sub-block."""
  sub, slot = np.divmod(np.arange(block_length * (block_length + 1)), block_length + 1)
  draft_seen = (slot[None, :] == 0) & (sub[None, :] <= sub[:, None])
  own_sub_block = (sub[None, :] == sub[:, None]) & (slot[:, None] > 0)
  return draft_seen | own_sub_block


def quadratic_offsets(block_length: int) -> np.ndarray:
  """[T] position of each round token past the cache length: slot m of sub-block i is at i + m."""
  sub, slot = np.divmod(np.arange(block_length * (block_length + 1)), block_length + 1)
  return (sub + slot).astype(np.int32)


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
  if mask in BLOCK_PATTERNS:
    # Scores against cache and block are computed separately and softmaxed jointly, so the
    # read-only cache is never concatenated with (copied next to) the block.
    s_cache = _scores(q, k, scale)
    s_blk = _scores(q, block_k, scale)
    m_cache = prefix_mask(kv_len, t, k.shape[1])[:, None, None]
    m_blk = (jnp.ones((b, 1, 1, t, block_k.shape[1]), bool) if mask == "prefix" else
             jnp.asarray(quadratic_mask(quadratic_block_length(t)))[None, None, None])
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

# Set to "1" to run the Pallas kernels in Mosaic GPU interpret mode (on CPU: tests and debugging).
KERNEL_INTERPRET_ENV = "DLLM_JAX_KERNEL_INTERPRET"
_DIFF_ARGS = ("block_k", "block_v")  # differentiable keyword operands besides q, k, v


def _kernel_interpret() -> bool:
  return os.environ.get(KERNEL_INTERPRET_ENV, "") == "1"


def _pallas_supports(mask: str, q, k, kw) -> bool:
  """Whether the Mosaic GPU kernel with its default tiling takes this call
  (see kernels/flash_attention_mgpu.py)."""
  from dllm_jax.kernels import flash_attention_mgpu  # pylint: disable=g-import-not-at-top
  itemsize = jnp.dtype(k.dtype).itemsize
  row_bytes = q.shape[3] * itemsize
  return ((kw.get("key_valid") is None or mask == "prefix")
          and q.shape[3] <= 256 and (row_bytes in (32, 64) or row_bytes % 128 == 0)
          and k.shape[1] % (32 // itemsize) == 0
          and flash_attention_mgpu.default_tiling_fits(q.shape[3], itemsize))


def _cudnn_supports(mask: str, q, k, kw) -> bool:
  del mask, k, kw
  return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[3] <= 256 and q.shape[3] % 8 == 0


def _triton_supports(mask: str, q, k, kw) -> bool:
  del k
  return (mask in ("causal", "prefix") and (kw.get("key_valid") is None or mask == "prefix")
          and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[3] >= 16
          and q.shape[3] & (q.shape[3] - 1) == 0
          and importlib.util.find_spec("jax_triton") is not None)


def resolve_impl(impl: str, mask: str | None = None, q=None, k=None, **kw) -> str:
  """Maps "auto" to a concrete implementation for the current platform and call.

  "auto" is XLA on CPU; on GPU it is the fastest implementation measured for this device kind and
  shape class (kernels/attention_choices.py), falling back to XLA when nothing was measured or the
  winner cannot take this call (dtype, head_dim, key padding).
  """
  if impl != "auto":
    return impl
  if jax.default_backend() != "gpu" or mask is None or q is None:
    return "xla"
  from dllm_jax.kernels import attention_choices  # pylint: disable=g-import-not-at-top
  choice = attention_choices.measured_choice(jax.devices()[0].device_kind, mask, q.shape[1])
  supports = {"pallas": _pallas_supports, "triton": _triton_supports, "cudnn": _cudnn_supports}
  if choice in supports and not supports[choice](mask, q, k, kw):
    return "xla"
  return choice


def _kernel_fn(impl: str):
  """The forward of a kernel impl; imported lazily (jax_triton cannot import on a CPU jaxlib)."""
  if impl == "pallas":
    from dllm_jax.kernels import flash_attention_mgpu  # pylint: disable=g-import-not-at-top
    interpret = _kernel_interpret()
    if jax.default_backend() != "gpu" and not interpret:
      raise ValueError(f"attention_impl='pallas' needs a Hopper GPU; on {jax.default_backend()} "
                       f"set {KERNEL_INTERPRET_ENV}=1 to run it in Mosaic GPU interpret mode")
    return functools.partial(flash_attention_mgpu.flash_attention, interpret=interpret)
  try:
    import jax_triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from dllm_jax.kernels import decode_attention_triton  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"attention_impl='triton' needs triton and jax_triton (CUDA): {e}") from e
  return decode_attention_triton.decode_attention


def _local_shards(fn, q, k, v, operands: dict):
  """Runs a kernel under `shard_map` when a mesh is set (`jax.set_mesh`), on local shards only.

  Batch goes over the "data" axis and kv heads (with their query heads) over "model" when it
  divides them; otherwise that dimension is replicated. Without a mesh, `fn` runs as is.
  """
  operands = {name: x for name, x in operands.items() if x is not None}
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, **operands)
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  data = "data" if "data" in mesh.axis_names and q.shape[0] % mesh.shape["data"] == 0 else None
  model = ("model" if "model" in mesh.axis_names and k.shape[2] % mesh.shape["model"] == 0
           else None)
  heads = P(data, None, model, None)
  per_row = {"q_offset": P(data), "kv_len": P(data), "key_valid": P(data, None),
             "block_k": heads, "block_v": heads}
  specs = {name: per_row[name] for name in operands}
  return jax.shard_map(lambda q, k, v, ops: fn(q, k, v, **ops), mesh=mesh,
                       in_specs=(heads, heads, heads, specs), out_specs=heads,
                       check_vma=False)(q, k, v, operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_attention(impl: str, static: tuple, q, k, v, operands: dict):
  """Kernel forward; the backward is the VJP of `attention_reference` (XLA), see docs/kernels.md."""
  return _local_shards(functools.partial(_kernel_fn(impl), **dict(static)), q, k, v, operands)


def _kernel_attention_fwd(impl, static, q, k, v, operands):
  return _kernel_attention(impl, static, q, k, v, operands), (q, k, v, operands)


def _kernel_attention_bwd(impl, static, res, g):
  del impl
  q, k, v, operands = res
  diff = {name: operands[name] for name in _DIFF_ARGS if operands.get(name) is not None}
  rest = {name: val for name, val in operands.items() if name not in diff}

  def ref(q, k, v, diff):
    return attention_reference(q, k, v, **dict(static), **diff, **rest)

  _, vjp = jax.vjp(ref, q, k, v, diff)
  dq, dk, dv, ddiff = vjp(g)
  d_operands = {name: (ddiff[name] if name in ddiff else None) for name in operands}
  return dq, dk, dv, d_operands


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _cudnn_attention(q, k, v, *, mask: str, q_offset=None, kv_len=None, block_k=None,
                     block_v=None, block_size=None, key_valid=None, scale=None):
  """`jax.nn.dot_product_attention(implementation="cudnn")` for NLD's patterns.

  Its is_causal is top-left aligned (query i sees keys <= i), so it is used only when T == S with
  no offset; single-token decode uses key_value_seq_lengths; every other case passes the exact
  boolean mask (which cuDNN turns into a dense bias: correct but slower).
  """
  if jax.default_backend() != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a CUDA GPU with cuDNN; the backend is "
                     f"{jax.default_backend()}")
  if not _cudnn_supports(mask, q, k, {}):
    raise ValueError(f"attention_impl='cudnn' needs bf16/f16 and head_dim <= 256 (multiple of 8), "
                     f"got {q.dtype} and head_dim {q.shape[3]}")
  b, t = q.shape[:2]
  kw = dict(scale=scale, implementation="cudnn")
  if mask in BLOCK_PATTERNS:
    k, v = jnp.concatenate([k, block_k], 1), jnp.concatenate([v, block_v], 1)
    blk = jnp.ones((b, t, t), bool) if key_valid is None else jnp.broadcast_to(
        key_valid[:, None, :], (b, t, t))
    if mask == "quadratic":
      blk = blk & jnp.asarray(quadratic_mask(quadratic_block_length(t)))[None]
    m = jnp.concatenate([prefix_mask(kv_len, t, k.shape[1] - t), blk], -1)
    return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], **kw)
  if mask == "causal" and key_valid is None and (q_offset is None and t == k.shape[1]):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, **kw)
  if mask == "causal" and key_valid is None and t == 1 and q_offset is not None:
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=q_offset + 1, **kw)
  if mask == "causal":
    offs = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset
    m = causal_mask(offs, t, k.shape[1])
  elif mask == "bidirectional":
    m = jnp.ones((b, t, k.shape[1]), bool)
  else:
    m = jnp.broadcast_to(block_diff_mask(t // 2, block_size)[None], (b, t, t))
  if key_valid is not None:
    m = m & key_valid[:, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], **kw)


def attention(q, k, v, *, mask: str, impl: str = "xla", **kw):
  """Runs one attention pattern (see module docstring) with the chosen implementation.

  impl: "xla" (reference, CPU default), "pallas" (Mosaic GPU kernel; CPU only with
  DLLM_JAX_KERNEL_INTERPRET=1), "triton" (jax-triton decode kernel, "causal"/"prefix"), "cudnn",
  or "auto" (see `resolve_impl`). Kernel paths differentiate through the XLA reference's VJP.
  """
  if mask not in MASK_PATTERNS:
    raise ValueError(f"unknown mask pattern {mask!r}; expected one of {MASK_PATTERNS}")
  impl = resolve_impl(impl, mask, q, k, **kw)
  with jax.named_scope(f"attention_{mask}_{impl}"):
    if impl == "xla":
      return attention_reference(q, k, v, mask=mask, **kw)
    if impl == "cudnn":
      return _cudnn_attention(q, k, v, mask=mask, **kw)
    if impl in ("pallas", "triton"):
      static = tuple(sorted({"mask": mask, "block_size": kw.pop("block_size", None),
                             "scale": kw.pop("scale", None)}.items()))
      return _kernel_attention(impl, static, q, k, v, kw)
  raise ValueError(f"attention_impl={impl!r} is not one of xla, pallas, triton, cudnn, auto")
