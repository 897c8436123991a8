"""Quadratic self-speculation (docs/model.md §5.6): the quadratic attention pattern (mask table, XLA
reference, the Mosaic GPU kernel in interpret mode, the model's cache handling) and the compiled
mode against the plain-Python transcription in decode_reference, which runs each of the
reference's forwards as one explicit-mask forward without a cache."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import decode_reference as ref
from dllm_jax import LoRAConfig, NLDModel, preset
from dllm_jax.attention import attention_reference, quadratic_mask, quadratic_offsets
from dllm_jax.decode import AR, Quadratic, generate, settings_for
from dllm_jax.kv_cache import KVCache

N, EOS, END_THINK, MASK = 32, 63, 22, 100
# 5, 3 and 11 tokens: none a multiple of the block lengths, so rounds straddle block boundaries.
PROMPTS = ([5, 9, 20, 33, 41], [60, 2, 3], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80])
BATCH = ([5, 9, 20, 33, 41], [60, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17])
EOS_THINK = [(None, None), (EOS, None), (None, 6), (EOS, 6)]


@pytest.fixture(scope="module")
def model():
  return ref.structured_model()  # its LoRA is never used: quadratic speculation has no adapter


@pytest.fixture(scope="module")
def eager(model):
  return ref.Eager(model)


# --- the pattern ----------------------------------------------------------------------------------

def test_quadratic_mask_table():
  # B = 2: sub-block 0 = [d0, M, M], sub-block 1 = [d1, M, M]; rows are queries, columns keys.
  want = np.array([
      # d0 M  M  d1 M  M
      [1, 0, 0, 0, 0, 0],  # d0: itself only
      [1, 1, 1, 0, 0, 0],  # MASK of sub-block 0: d0 and its own sub-block
      [1, 1, 1, 0, 0, 0],
      [1, 0, 0, 1, 0, 0],  # d1: the drafts d0, d1 (causal over the draft)
      [1, 0, 0, 1, 1, 1],  # MASK of sub-block 1: d0, and all of its own sub-block
      [1, 0, 0, 1, 1, 1],
  ], bool)
  np.testing.assert_array_equal(quadratic_mask(2), want)
  np.testing.assert_array_equal(quadratic_offsets(2), [0, 1, 2, 1, 2, 3])
  assert quadratic_mask(1).tolist() == [[True, False], [True, True]]


def _numpy_quadratic(q, k, v, kv_len, block_k, block_v):
  """float64 loops: query (i, m) over cache slots < kv_len, drafts j <= i, own sub-block if m>0."""
  q, k, v, block_k, block_v = (np.asarray(x, np.float64) for x in (q, k, v, block_k, block_v))
  b_, t_, h_, d_ = q.shape
  g_ = k.shape[2]
  size = int((np.sqrt(4 * t_ + 1) - 1) / 2)
  out = np.zeros_like(q)
  for b, t in itertools.product(range(b_), range(t_)):
    i, m = divmod(t, size + 1)
    seen = [(j * (size + 1) + n) for j in range(size) for n in range(size + 1)
            if (n == 0 and j <= i) or (m > 0 and j == i)]
    for h in range(h_):
      g = h // (h_ // g_)
      keys = np.concatenate([k[b, :kv_len[b], g], block_k[b, seen, g]])
      vals = np.concatenate([v[b, :kv_len[b], g], block_v[b, seen, g]])
      w = np.exp(keys @ q[b, t, h] / np.sqrt(d_) - (keys @ q[b, t, h] / np.sqrt(d_)).max())
      out[b, t, h] = (w / w.sum()) @ vals
  return out


def _attention_inputs(size, s_len, kv_len, seed=0):
  rng = np.random.default_rng(seed)
  b, t, h, g, d = len(kv_len), size * (size + 1), 4, 2, 32
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (arr(b, t, h, d), arr(b, s_len, g, d), arr(b, s_len, g, d),
          jnp.asarray(kv_len, jnp.int32), arr(b, t, g, d), arr(b, t, g, d))


def test_xla_reference_matches_numpy():
  q, k, v, kv_len, bk, bv = _attention_inputs(3, 24, [0, 17])
  got = attention_reference(q, k, v, mask="quadratic", kv_len=kv_len, block_k=bk, block_v=bv)
  want = _numpy_quadratic(q, k, v, np.asarray(kv_len), bk, bv)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, rtol=0)


def test_mosaic_gpu_kernel_matches_numpy_in_interpret_mode():
  from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import reset_gpu_interpret_mode_state
  from dllm_jax.kernels.flash_attention_mgpu import BlockSizes, flash_attention
  reset_gpu_interpret_mode_state()
  # Ragged cache lengths (empty, mid-tile, full), several key tiles per split: T = 12 queries x
  # R = 2 heads = 24 rows in one 64-row tile.
  q, k, v, kv_len, bk, bv = _attention_inputs(3, 64, [0, 37, 64], seed=1)
  got = flash_attention(q, k, v, mask="quadratic", kv_len=kv_len, block_k=bk, block_v=bv,
                        block_sizes=BlockSizes(block_kv=16, num_splits=2, stages=2),
                        interpret=True)
  want = _numpy_quadratic(q, k, v, np.asarray(kv_len), bk, bv)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="B\\(B\\+1\\) tokens for a block length B, got 10"):
    flash_attention(q[:, :10], k, v, mask="quadratic", kv_len=kv_len, block_k=bk[:, :10],
                    block_v=bv[:, :10], interpret=True)


def test_model_round_writes_only_the_drafts_causal_kv(model, eager):
  """Row (i, 0) of a round is the causal prediction after d_i, and the cache gains exactly the
  drafts' K/V, as a causal forward of the drafts would write them."""
  size, drafts = 4, [7, 22, 41, 63]
  _, cache = eager([5, 9, 20, 33, 41], KVCache.init(model.cfg, 1, 64), pattern="causal")
  round_tokens = [t for d in drafts for t in [d] + [MASK] * size]
  got, got_cache = eager(round_tokens, cache, pattern="quadratic")
  want, want_cache = eager(drafts, cache, pattern="causal")
  np.testing.assert_allclose(got.reshape(size, size + 1, -1)[:, 0], want, atol=1e-5)
  assert int(got_cache.lengths[0]) == 5 + size
  for layer in range(model.cfg.num_layers):
    np.testing.assert_allclose(got_cache.k[layer][:, :9], want_cache.k[layer][:, :9], atol=1e-6)
    np.testing.assert_allclose(got_cache.v[layer][:, :9], want_cache.v[layer][:, :9], atol=1e-6)


# --- the mode against the transcription -----------------------------------------------------------

def _engine_knobs(eos, think):
  return dict(eos_token_ids=() if eos is None else eos, max_thinking_tokens=think,
              end_think_token_id=END_THINK if think else None)


@pytest.mark.parametrize("block_length", [4, 8, 16])
def test_matches_reference(model, eager, block_length):
  multi_token_rounds = 0
  for i, prompt in enumerate(PROMPTS):
    eos, think = EOS_THINK[(i + block_length) % len(EOS_THINK)]
    want, want_nfe, want_acc = ref.quadratic_speculation(
        eager, prompt, max_new_tokens=N, block_length=block_length, eos=eos,
        max_thinking_tokens=think, end_think=END_THINK if think else None, mask_id=MASK)
    got = generate(model, [prompt], Quadratic(max_new_tokens=N, block_length=block_length,
                                              **_engine_knobs(eos, think)))
    case = (block_length, len(prompt), eos, think)
    assert got.tokens[0] == want, case
    assert got.nfe[0] == want_nfe and got.decode_nfe[0] == want_nfe - 1 == len(want_acc), case
    assert got.accepted_lengths[0] == want_acc, case
    multi_token_rounds += sum(a > 1 for a in want_acc)
  assert multi_token_rounds >= 3  # several tokens accepted per forward


def test_eos_mid_round_thinking_budget_and_mix_weight_match_reference(model, eager):
  seen = {"mid_round_eos": False, "end_think": False, "mix_changes_output": False}
  for prompt, (eos, think), mix in [(PROMPTS[0], (EOS, 6), None), (PROMPTS[1], (EOS, None), None),
                                    (PROMPTS[2], (None, 3), None), (PROMPTS[0], (None, None), 0.3),
                                    (PROMPTS[1], (EOS, 6), 0.7)]:
    want, want_nfe, want_acc = ref.quadratic_speculation(
        eager, prompt, max_new_tokens=N, block_length=8, eos=eos, max_thinking_tokens=think,
        end_think=END_THINK if think else None, mask_id=MASK, ar_mix_weight=mix)
    got = generate(model, [prompt], Quadratic(max_new_tokens=N, block_length=8, ar_mix_weight=mix,
                                              **_engine_knobs(eos, think)))
    assert (got.tokens[0], got.nfe[0], got.accepted_lengths[0]) == (want, want_nfe, want_acc)
    seen["mid_round_eos"] |= eos is not None and want[-1] == eos and sum(want_acc) > len(want)
    seen["end_think"] |= bool(think) and END_THINK in want[:think + 8]
    if mix is not None:
      plain = ref.quadratic_speculation(
          eager, prompt, max_new_tokens=N, block_length=8, eos=eos, max_thinking_tokens=think,
          end_think=END_THINK if think else None, mask_id=MASK)
      seen["mix_changes_output"] |= plain[0] != want
  assert all(seen.values()), seen


def test_plain_random_model_matches_reference():
  # Built like the structured model (same config and adapter shapes), so the engine's and the
  # transcription's compiled programs are reused; only the weights differ.
  model = NLDModel(preset("tiny"), lora=LoRAConfig(4, 8), rngs=nnx.Rngs(3))
  want, want_nfe, want_acc = ref.quadratic_speculation(
      ref.Eager(model), PROMPTS[2], max_new_tokens=N, block_length=8, eos=None,
      max_thinking_tokens=None, end_think=None, mask_id=MASK)
  got = generate(model, [PROMPTS[2]], Quadratic(max_new_tokens=N, block_length=8,
                                                eos_token_ids=()))
  assert (got.tokens[0], got.nfe[0], got.accepted_lengths[0]) == (want, want_nfe, want_acc)


# --- engine properties ----------------------------------------------------------------------------

def test_greedy_output_is_greedy_autoregressive_output_batched(model):
  settings = Quadratic(max_new_tokens=N, block_length=8, eos_token_ids=EOS)
  want = generate(model, BATCH, AR(max_new_tokens=N, eos_token_ids=EOS)).tokens
  got = generate(model, BATCH, settings)
  assert got.tokens == want
  for b, prompt in enumerate(BATCH):
    assert generate(model, [prompt], settings).tokens[0] == want[b], b
  assert len({tuple(a) for a in got.accepted_lengths}) > 1  # rows accept different lengths
  assert len({len(t) for t in got.tokens}) > 1  # and finish at different times


def test_streaming_no_recompile_and_settings(model):
  settings = Quadratic(max_new_tokens=N, block_length=8, eos_token_ids=EOS)
  whole = generate(model, BATCH, settings)
  streamed = {b: [] for b in range(len(BATCH))}
  generate(model, BATCH, settings, on_tokens=lambda b, ids: streamed[b].extend(ids))
  assert [streamed[b] for b in range(len(BATCH))] == whole.tokens
  # Other prompts in the same bucket, another EOS, budget and mix weight: the same programs.
  rerun = generate(model, [[4, 4, 4], [9, 8], [1]],
                   Quadratic(max_new_tokens=N, block_length=8, eos_token_ids=(EOS, 7),
                             max_thinking_tokens=4, end_think_token_id=END_THINK,
                             ar_mix_weight=0.5))
  assert rerun.compile_seconds == 0.0
  assert settings_for("quadratic", block_length=4, ar_mix_weight=0.5) == Quadratic(
      block_length=4, ar_mix_weight=0.5)
  for kw, culprit in [(dict(temperature=0.7), "temperature"),
                      (dict(max_new_tokens=30, block_length=8), "max_new_tokens=30"),
                      (dict(ar_mix_weight=1.5), "ar_mix_weight")]:
    with pytest.raises(ValueError, match=culprit):
      Quadratic(**kw)
  with pytest.raises(ValueError, match="threshold is not a setting of quadratic"):
    settings_for("quadratic", threshold=0.5)
  # The last sub-block's MASKs reach 2B - 1 positions past a round's start: 10 + 1000 + 15 > 1024.
  with pytest.raises(ValueError, match=r"\+ 2 \* block_length - 1 = 1025 exceeds"):
    generate(model, [[1] * 10], Quadratic(max_new_tokens=1000, block_length=8))
