"""The whole model on a GPU with the compiled kernels: bf16 logits of every attention pattern the
model uses, against an fp32 XLA run of the same (bf16-rounded) weights.

Bound: a kernel may be at most twice as far from the fp32 logits as XLA's own bf16 path is (plus a
bf16 ulp at the logits' scale); both paths round the same activations, so a kernel bug (a wrong
mask, a dropped split, a misread offset) shows up as an error far above that.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.config import preset
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import NLDModel, forward, with_attention_impl

pytestmark = pytest.mark.gpu

# NLD-8B head geometry (32 q heads, 8 kv heads, head_dim 128), two layers, small vocabulary.
_SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_layers=2,
              num_heads=32, num_kv_heads=8, head_dim=128, block_size=32)


def _run_patterns(model, impl, training=True):
  """Logits of: a ragged causal prefill, 3 decode steps, a 32-token denoising block against the
  cache (prefix), a 32-token causal commit at an offset, and (training) the block_diff forward."""
  graphdef, state = nnx.split(with_attention_impl(model, impl))
  run = jax.jit(functools.partial(forward, graphdef), static_argnames=("pattern", "append"))
  cfg, rng = model.cfg, np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 96)), jnp.int32)
  lengths = jnp.array([96, 17, 64], jnp.int32)
  cache = KVCache.init(cfg, 3, 256, model.dtype)
  out = []
  logits, cache = run(state, prompts, pattern="causal", cache=cache, n_new=lengths)
  out.append(jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1))
  for step in range(3):
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 1)), jnp.int32)
    logits, cache = run(state, tok, pattern="causal", cache=cache)
    out.append(logits)
  block = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 32)), jnp.int32)
  block = block.at[:, 5:].set(cfg.mask_token_id)
  out.append(run(state, block, pattern="bidirectional", cache=cache)[0])
  out.append(run(state, block, pattern="causal", cache=cache)[0])
  if training:
    seq = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 4 * cfg.block_size)), jnp.int32)
    out.append(run(state, seq, pattern="block_diff")[0])
  return [np.asarray(x, np.float32) for x in out]


@pytest.mark.parametrize("impl", ["pallas", "triton"])
def test_model_kernels_match_fp32_within_xla_bf16_error(impl):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a CUDA GPU")
  if impl == "triton":
    pytest.importorskip("jax_triton")
  cfg = preset("nld-3b").replace(**_SHAPE)
  bf16 = NLDModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  f32 = NLDModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(1))
  nnx.update(f32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(bf16)))
  with jax.default_matmul_precision("highest"):  # fp32 means fp32, not tf32
    want = _run_patterns(f32, "xla")
  xla = _run_patterns(bf16, "xla")
  got = _run_patterns(bf16, impl, training=impl != "triton")  # triton: decoding patterns only
  names = ["prefill", "decode1", "decode2", "decode3", "prefix", "commit", "block_diff"]
  for i, name in enumerate(names[:len(got)]):
    ref_err = np.max(np.abs(xla[i] - want[i]))
    err = np.max(np.abs(got[i] - want[i]))
    ulp = np.max(np.abs(want[i])) * 2.0**-8
    assert err <= 2 * ref_err + ulp, f"{impl} {name}: {err:.3g} vs xla bf16 {ref_err:.3g}"
