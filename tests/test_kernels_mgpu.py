"""The Mosaic GPU flash-attention kernel, run on CPU in Mosaic GPU interpret mode.

The oracle is the float64 numpy transcription in tests/attention_oracle.py, so the kernel is never
compared with anything derived from dllm_jax's own attention code.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import get_races
from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import reset_gpu_interpret_mode_state
from jax.experimental.pallas import mosaic_gpu as plgpu

from dllm_jax.kernels.flash_attention_mgpu import BlockSizes, flash_attention

from attention_oracle import numpy_attention

FP32_ATOL = 1e-5
BF16_ATOL = 2e-2  # P and the inputs are rounded to bf16 (8 mantissa bits) with unit-scale values


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  # After an exception the interpreter keeps stale state; every test starts clean.
  reset_gpu_interpret_mode_state()
  yield


def _inputs(rng, B, T, H, G, D, S, dtype):
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  return arr(B, T, H, D), arr(B, S, G, D), arr(B, S, G, D), arr(B, T, G, D), arr(B, T, G, D)


# (mask, B, T, H, G, S, per-row lengths, block sizes): decode, 32-query verify, GQA ratios 1/2/4,
# MQA, ragged lengths including 0 and non-multiples of the key tile, several tilings.
CASES = [
    ("causal", 2, 1, 4, 2, 64, [0, 37], BlockSizes(block_kv=16, num_splits=2, stages=2)),
    ("causal", 3, 32, 8, 2, 128, [0, 13, 96], BlockSizes(block_kv=32, num_splits=3, stages=3)),
    ("causal", 1, 32, 8, 2, 64, [21], BlockSizes(block_rows=64, block_kv=8, num_splits=1,
                                                 stages=1)),
    ("causal", 2, 5, 4, 1, 48, [0, 43], BlockSizes(block_kv=16, num_splits=16, stages=2)),
    ("prefix", 3, 8, 4, 2, 64, [0, 13, 64], BlockSizes(block_kv=16, num_splits=2, stages=2)),
    ("prefix", 2, 32, 8, 2, 128, [77, 5], BlockSizes(block_kv=64, num_splits=4, stages=3)),
    ("bidirectional", 2, 24, 4, 4, 24, None, BlockSizes(block_kv=64, num_splits=2)),
    ("block_diff", 1, 32, 4, 2, 32, None, BlockSizes(block_rows=64, block_kv=8, num_splits=2)),
]


def _run(case, dtype, rng, key_valid=False, interpret=True):
  mask, B, T, H, G, S, lens, bs = case
  D = 32
  q, k, v, bk, bv = _inputs(rng, B, T, H, G, D, S, dtype)
  kw = {}
  if mask == "causal":
    kw["q_offset"] = jnp.asarray(lens, jnp.int32)
  elif mask == "prefix":
    kw.update(kv_len=jnp.asarray(lens, jnp.int32), block_k=bk, block_v=bv)
    if key_valid:
      kw["key_valid"] = jnp.asarray(rng.random((B, T)) < 0.7).at[:, 0].set(True)
  elif mask == "block_diff":
    kw["block_size"] = 4
  out = flash_attention(q, k, v, mask=mask, block_sizes=bs, interpret=interpret, **kw)
  np_kw = {key: (np.asarray(val) if key in ("q_offset", "kv_len", "key_valid") else val)
           for key, val in kw.items()}
  return np.asarray(out, np.float64), numpy_attention(q, k, v, mask=mask, **np_kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[2]}-H{c[3]}G{c[4]}-S{c[5]}")
def test_fp32_matches_numpy(case):
  out, ref = _run(case, jnp.float32, np.random.default_rng(0))
  np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["verify", "prefix"])
def test_bf16_within_bound(case):
  out, ref = _run(case, jnp.bfloat16, np.random.default_rng(1))
  np.testing.assert_allclose(out, ref, atol=BF16_ATOL, rtol=0)


def test_prefix_key_valid():
  out, ref = _run(CASES[4], jnp.float32, np.random.default_rng(2), key_valid=True)
  np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("case", [
    CASES[2], ("prefix", 2, 8, 4, 2, 64, [50, 13], BlockSizes(block_kv=8, num_splits=2, stages=2)),
], ids=["verify", "prefix"])
def test_no_races_in_the_prefetch_ring(case):
  """The interpreter's happens-before race detector over TMA copies, barriers and wgmma, with
  more key tiles per split than ring slots, so slots are refilled."""
  out, ref = _run(case, jnp.float32, np.random.default_rng(5),
                  interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert not get_races().races_found
  np.testing.assert_allclose(out, ref, atol=FP32_ATOL, rtol=0)


def test_shape_errors_name_the_argument():
  q = jnp.zeros((1, 4, 4, 32))
  k = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(ValueError, match="kv_len"):
    flash_attention(q, k, k, mask="prefix", block_k=k[:, :4], block_v=k[:, :4], interpret=True)
  with pytest.raises(ValueError, match="query heads 4 are not a multiple of kv heads 3"):
    flash_attention(q, jnp.zeros((1, 64, 3, 32)), jnp.zeros((1, 64, 3, 32)), mask="causal",
                    interpret=True)
  with pytest.raises(ValueError, match="key length 60 is not a multiple of 8"):
    flash_attention(q, k[:, :60], k[:, :60], mask="causal", interpret=True)


def test_default_tiling_fits_hopper_shared_memory_at_nld_head_dim_only():
  from dllm_jax.kernels import flash_attention_mgpu as m
  # By hand, bf16: Q 64x128 + K/V ring 2x2x128x128 + P 64x128 (x2 bytes) + fp32 O and LSE
  # 64x129x4 = 196,864 bytes <= 227 KiB; at head_dim 256 the same tiles need 377,088 bytes.
  assert m.smem_bytes(64, 128, 2, 128, 2) == 196_864
  assert m.default_tiling_fits(128, 2)
  assert not m.default_tiling_fits(256, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("mask,t,bs", [
    ("causal", 1, BlockSizes()), ("causal", 32, BlockSizes()),
    ("causal", 32, BlockSizes(block_rows=64, block_kv=128, stages=2)),
    ("prefix", 32, BlockSizes(num_splits=8)),
])
def test_compiled_on_hopper_matches_numpy(mask, t, bs):
  """The compiled kernel (no interpret) at NLD-8B head geometry, bf16, ragged rows."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a Hopper GPU")
  rng = np.random.default_rng(4)
  b, h, g, d, s = 3, 32, 8, 128, 1024
  q, k, v, bk, bv = _inputs(rng, b, t, h, g, d, s, jnp.bfloat16)
  lens = jnp.array([0, 333, s - t], jnp.int32)
  kw = ({"q_offset": lens} if mask == "causal" else
        {"kv_len": lens, "block_k": bk, "block_v": bv})
  out = flash_attention(q, k, v, mask=mask, block_sizes=bs, **kw)
  np_kw = {key: (np.asarray(val) if val.dtype == jnp.int32 else val) for key, val in kw.items()}
  want = numpy_attention(q, k, v, mask=mask, **np_kw)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=BF16_ATOL, rtol=0)
