"""The Triton split-KV kernel body, run on CPU in Triton's interpreter with torch tensors.

`triton_call` needs a CUDA device, so the CPU test launches the same `@triton.jit` function on torch
CPU tensors with the launch plan the JAX wrapper uses, then combines the partials with the shared
XLA step. The oracle is tests/attention_oracle.py. Triton fixes interpret mode when triton.language
is imported (TRITON_INTERPRET=1), so the interpreted cases run in a child pytest with that set.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("triton")

import jax
import jax.numpy as jnp
import triton

from dllm_jax.kernels import decode_attention_triton as dat
from dllm_jax.kernels import split_kv

from attention_oracle import numpy_attention


def _run_interpreted(q, k, v, *, mask, q_offset=None, kv_len=None, block_k=None, block_v=None,
                     block_sizes=dat.BlockSizes()):
  # Imported here, not at the top: collecting this file for its GPU case (scripts/gpu_check.py's
  # child pytest) would otherwise pay torch's ~2 s import for nothing.
  torch = pytest.importorskip("torch")
  b, t, h, d = q.shape
  g = k.shape[2]
  scale = d ** -0.5
  lp = dat.plan(q.shape, k.shape, mask=mask, scale=scale, block_sizes=block_sizes)
  base, hi = dat.row_bounds(mask, b, t, q_offset, kv_len)
  as_torch = lambda x: torch.from_numpy(np.array(x))  # a writable host copy
  o = torch.zeros((b, g, lp.num_splits, lp.rows, d), dtype=torch.float32)
  lse = torch.zeros((b, g, lp.num_splits, lp.rows), dtype=torch.float32)
  q_rows = split_kv.fold_queries(q, g, lp.rows)
  dat.split_kernel[lp.grid](as_torch(q_rows), as_torch(k), as_torch(v), as_torch(base),
                            as_torch(hi), o, lse, **lp.constexprs)
  return np.asarray(split_kv.finish(jnp.asarray(o.numpy()), jnp.asarray(lse.numpy()), q,
                                    block_k=block_k, block_v=block_v, scale=scale), np.float64)


INTERPRETED = triton.knobs.runtime.interpret


@pytest.mark.slow
def test_interpreted_cases_in_child_process():
  if INTERPRETED:
    pytest.skip("this process already runs Triton's interpreter")
  env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                      "-k", "interpreter"], env=env, capture_output=True, text=True, timeout=600,
                     check=False)
  assert r.returncode == 0 and "3 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton is imported")
@pytest.mark.parametrize("mask,b,t,h,g,s,lens,bs", [
    ("causal", 2, 1, 4, 2, 64, [0, 37], dat.BlockSizes(block_kv=16, num_splits=3)),
    ("causal", 2, 32, 8, 2, 96, [0, 60], dat.BlockSizes(block_rows=32, block_kv=32, num_splits=2)),
    ("prefix", 3, 8, 4, 1, 64, [0, 13, 64], dat.BlockSizes(block_kv=16, num_splits=4)),
])
def test_interpreter_split_kernel_matches_numpy(mask, b, t, h, g, s, lens, bs):
  rng = np.random.default_rng(0)
  d = 32
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = arr(b, t, h, d), arr(b, s, g, d), arr(b, s, g, d)
  bk, bv = arr(b, t, g, d), arr(b, t, g, d)
  lens = jnp.asarray(lens, jnp.int32)
  if mask == "causal":
    got = _run_interpreted(q, k, v, mask=mask, q_offset=lens, block_sizes=bs)
    want = numpy_attention(q, k, v, mask=mask, q_offset=np.asarray(lens))
  else:
    got = _run_interpreted(q, k, v, mask=mask, kv_len=lens, block_k=bk, block_v=bv,
                           block_sizes=bs)
    want = numpy_attention(q, k, v, mask=mask, kv_len=np.asarray(lens), block_k=bk, block_v=bv)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_plan_errors_name_the_argument():
  with pytest.raises(ValueError, match="head_dim=24"):
    dat.plan((1, 1, 4, 24), (1, 64, 2, 24), mask="causal", scale=1.0,
             block_sizes=dat.BlockSizes())
  with pytest.raises(ValueError, match="block_diff"):
    dat.plan((1, 8, 4, 32), (1, 8, 2, 32), mask="block_diff", scale=1.0,
             block_sizes=dat.BlockSizes())


@pytest.mark.gpu
def test_triton_call_on_gpu_matches_numpy():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  pytest.importorskip("jax_triton")
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 32, 8, 64)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((2, 256, 2, 64)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((2, 256, 2, 64)), jnp.bfloat16)
  offs = jnp.array([0, 200], jnp.int32)
  got = dat.decode_attention(q, k, v, mask="causal", q_offset=offs)
  want = numpy_attention(np.asarray(q, np.float32), np.asarray(k, np.float32),
                         np.asarray(v, np.float32), mask="causal", q_offset=np.asarray(offs))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2)
