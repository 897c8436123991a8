"""The training objective against plain-numpy transcriptions of docs/model.md §6 and the block_diff
forward against the decoding forwards it must agree with (docs/model.md §4.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dllm_jax import KVCache, LoRAConfig, NLDModel, preset
from dllm_jax.model import forward, lora_linears
from dllm_jax.training import objective as obj_lib

BLOCK = 8
CFG = preset("tiny").replace(block_size=BLOCK)
MASK = CFG.mask_token_id


@pytest.fixture(scope="module")
def model():
  return NLDModel(CFG, rngs=nnx.Rngs(0))


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_block_diff_loss(noisy_logits, clean_logits, x, masked, p, ar_w, dlm_w):
  """Spec §6.2 block_diff, written out loop by loop."""
  b, n = x.shape
  lp_noisy, lp_clean = np_log_softmax(noisy_logits), np_log_softmax(clean_logits)
  l_diff = sum(-lp_noisy[i, t, x[i, t]] / p[i] for i in range(b) for t in range(n) if masked[i, t])
  l_ar = sum(-lp_clean[i, t, x[i, t + 1]] for i in range(b) for t in range(n - 1))
  return dlm_w * l_diff + ar_w * l_ar, masked.sum() + ar_w * n * b


def tokens_and_prompt_mask(rng, b, n, prompt_len):
  x = rng.integers(0, CFG.vocab_size, size=(b, n)).astype(np.int32)
  x[x == MASK] = 7
  loss_mask = np.ones((b, n), np.int32)
  loss_mask[:, :prompt_len] = 0
  return x, loss_mask


def test_block_diff_loss_matches_numpy(model, rng):
  b, n = 3, 24
  x, loss_mask = tokens_and_prompt_mask(rng, b, n, 5)
  masked = (rng.random((b, n)) < 0.5) & (loss_mask > 0)
  p = np.array([0.3, 0.7, 0.5], np.float32)
  noisy = np.where(masked, MASK, x)
  logits, _ = model(jnp.asarray(np.concatenate([noisy, x], 1)), pattern="block_diff")
  logits = np.asarray(logits)
  total, norm, _ = obj_lib.block_diff_loss(logits[:, :n], logits[:, n:], x, masked, p,
                                           ar_loss_weight=0.5, dlm_loss_weight=0.3)
  want_total, want_norm = np_block_diff_loss(logits[:, :n], logits[:, n:], x, masked, p, 0.5, 0.3)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  np.testing.assert_allclose(float(norm), want_norm, rtol=1e-6)


def test_compute_loss_block_diff_end_to_end(model, rng):
  """compute_loss = numpy §6.2 on the logits of [noisy ; clean] with the masks its key draws."""
  b, n = 2, 16
  x, loss_mask = tokens_and_prompt_mask(rng, b, n, 4)
  key = jax.random.PRNGKey(3)
  obj = obj_lib.Objective.from_model_config(CFG, paradigm="block_diff", ar_loss_weight=0.7)
  total, norm, _ = obj_lib.compute_loss(model, obj, jnp.asarray(x), jnp.asarray(loss_mask), key)
  noisy, masked, p = (np.asarray(a) for a in obj_lib.forward_process(
      key, jnp.asarray(x), jnp.asarray(loss_mask), MASK, 1e-3))
  logits = np.asarray(model(jnp.asarray(np.concatenate([noisy, x], 1)), pattern="block_diff")[0])
  want_total, want_norm = np_block_diff_loss(logits[:, :n], logits[:, n:], x, masked, p, 0.7, 1.0)
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
  np.testing.assert_allclose(float(norm), want_norm, rtol=1e-6)


def test_bidirectional_and_autoregressive_losses_match_numpy(model, rng):
  b, n = 2, 16
  x, loss_mask = tokens_and_prompt_mask(rng, b, n, 6)
  key = jax.random.PRNGKey(5)
  bi = obj_lib.Objective.from_model_config(CFG, paradigm="bidirectional", dlm_loss_weight=0.3)
  total, norm, _ = obj_lib.compute_loss(model, bi, jnp.asarray(x), jnp.asarray(loss_mask), key)
  noisy, masked, p = (np.asarray(a) for a in obj_lib.forward_process(
      key, jnp.asarray(x), jnp.asarray(loss_mask), MASK, 1e-3))
  lp = np_log_softmax(model(jnp.asarray(noisy), pattern="bidirectional")[0])
  want = 0.3 * sum(-lp[i, t, x[i, t]] / p[i] for i in range(b) for t in range(n) if masked[i, t])
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(norm) == masked.sum()

  ar = obj_lib.Objective.from_model_config(CFG, paradigm="autoregressive")
  total, norm, _ = obj_lib.compute_loss(model, ar, jnp.asarray(x), jnp.asarray(loss_mask), key)
  lp = np_log_softmax(model(jnp.asarray(x), pattern="causal")[0])
  want = sum(-lp[i, t, x[i, t + 1]] for i in range(b) for t in range(n - 1) if loss_mask[i, t + 1])
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(norm) == loss_mask[:, 1:].sum()


def test_forward_process_statistics(rng):
  b, n, eps = 64, 2048, 1e-3
  x, loss_mask = tokens_and_prompt_mask(rng, b, n, 100)
  noisy, masked, p = (np.asarray(a) for a in obj_lib.forward_process(
      jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(loss_mask), MASK, eps))
  assert not masked[:, :100].any()  # prompt positions are never masked
  np.testing.assert_array_equal(noisy, np.where(masked, MASK, x))
  assert (p >= eps).all() and (p <= 1.0).all()
  frac = masked[:, 100:].mean(1)
  np.testing.assert_allclose(frac, p, atol=0.05)  # per-sequence masking ratio is p
  assert np.std(p) > 0.15  # p varies across sequences (t ~ U(0,1) per sequence)


def jitted(model):
  """model(tokens, **kw) compiled once per shape (eager calls re-trace the layer scan each time)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, tokens, **kw: forward(graphdef, st, tokens, **kw),
               static_argnames=("pattern", "lora"))
  return lambda tokens, **kw: fn(state, jnp.asarray(tokens), **kw)


def test_block_diff_forward_equals_causal_and_cached_diffusion(model, rng):
  """Clean half = causal forward of the clean sequence (Llama-4 scale at positions n..2n-1);
  noisy block k = diffusion forward of block k against the causal cache of clean blocks < k."""
  run = jitted(model)
  b, n = 2, 48  # 2n = 96 > 64: the tiny preset's Llama-4 query scale is active on the clean half
  x = rng.integers(0, CFG.vocab_size, size=(b, n)).astype(np.int32)
  noisy = np.where(rng.random((b, n)) < 0.5, MASK, x).astype(np.int32)
  logits = np.asarray(run(np.concatenate([noisy, x], 1), pattern="block_diff")[0])

  qpos = jnp.broadcast_to(n + jnp.arange(n)[None], (b, n))
  causal = np.asarray(run(x, pattern="causal", qscale_positions=qpos)[0])
  np.testing.assert_allclose(logits[:, n:], causal, atol=1e-4)
  plain_causal = np.asarray(run(x, pattern="causal")[0])
  # The Llama-4 scale at positions >= 64 changes these logits by far more than the tolerance.
  assert np.abs(logits[:, n + 40:] - plain_causal[:, 40:]).max() > 3e-4

  # Every block against the cache of the whole clean sequence cropped to its start (as decoding
  # crops), and one block against a cache filled by a prefill of exactly its prefix.
  _, full = run(x, pattern="causal", cache=KVCache.init(CFG, b, n))
  for k in range(n // BLOCK):
    blk = slice(k * BLOCK, (k + 1) * BLOCK)
    cache = full.with_lengths(jnp.full((b,), k * BLOCK, jnp.int32))
    want = np.asarray(run(noisy[:, blk], pattern="bidirectional", cache=cache)[0])
    np.testing.assert_allclose(logits[:, blk], want, atol=1e-4, err_msg=f"block {k}")
    if k == 3:
      _, prefix = run(x[:, :k * BLOCK], pattern="causal", cache=KVCache.init(CFG, b, n))
      np.testing.assert_allclose(logits[:, blk], run(noisy[:, blk], pattern="bidirectional",
                                                     cache=prefix)[0], atol=1e-4)
      # Seeing its own clean block (one block too many) is a large difference, not noise.
      leak = full.with_lengths(jnp.full((b,), (k + 1) * BLOCK, jnp.int32))
      leaked = run(noisy[:, blk], pattern="bidirectional", cache=leak)[0]
      assert np.abs(logits[:, blk] - leaked).max() > 1e-2


@pytest.mark.parametrize("blocks_per_pass", [None, 1])
def test_draft_logits_equal_per_block_drafts(rng, blocks_per_pass):
  lora = LoRAConfig(4, 8, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
  lora_model = NLDModel(CFG, lora=lora, rngs=nnx.Rngs(1))
  for i, (_, _, linear) in enumerate(lora_linears(lora_model)):
    linear.lora_b[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(2 + i), linear.lora_b.shape)
  run = jitted(lora_model)
  b, n = 2, 16
  x = rng.integers(0, CFG.vocab_size, size=(b, n)).astype(np.int32)
  noisy, masked = obj_lib.draft_corruption(jnp.asarray(x), jnp.ones((b, n), jnp.int32), MASK, BLOCK)
  noisy, masked = np.asarray(noisy), np.asarray(masked)
  np.testing.assert_array_equal(masked, np.tile(np.arange(n) % BLOCK != 0, (b, 1)))
  np.testing.assert_array_equal(noisy[:, ::BLOCK], x[:, ::BLOCK])
  got = np.asarray(obj_lib.draft_logits(lora_model, jnp.asarray(x), jnp.asarray(noisy), BLOCK,
                                        lora=True, blocks_per_pass=blocks_per_pass))
  for k in range(n // BLOCK):
    blk = slice(k * BLOCK, (k + 1) * BLOCK)
    cache = KVCache.init(CFG, b, n)
    if k:  # the prefix K/V come from a causal forward without the adapter, as at inference
      _, cache = run(x[:, :k * BLOCK], pattern="causal", cache=cache)
    want = np.asarray(run(noisy[:, blk], pattern="bidirectional", cache=cache, lora=True)[0])
    np.testing.assert_allclose(got[:, blk], want, atol=1e-4, err_msg=f"block {k}")


def test_objective_rejects_bad_settings(model):
  with pytest.raises(ValueError, match="paradigm"):
    obj_lib.Objective.from_model_config(CFG, paradigm="sbd")
  obj = obj_lib.Objective.from_model_config(CFG, paradigm="block_diff", block_size=16)
  x = jnp.zeros((1, 32), jnp.int32)
  with pytest.raises(ValueError, match="block_size"):
    obj_lib.compute_loss(model, obj, x, jnp.ones_like(x), jax.random.PRNGKey(0))
