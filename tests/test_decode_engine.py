"""Engine properties beyond the reference: batching, speculation == greedy AR, no recompilation,
streaming, argument errors, and the commit rules in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import decode_reference as ref
from dllm_jax.decode import AR, Diffusion, Spec, generate, settings_for
from dllm_jax.decode.sampling import select_threshold, transfer_schedule

N, EOS = 32, 63
# Mixed lengths in one bucket (16); with EOS the rows finish at different times.
BATCH = ([5, 9, 20, 33, 41], [60, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17])


@pytest.fixture(scope="module")
def model():
  return ref.structured_model()


@pytest.mark.parametrize("settings", [
    AR(max_new_tokens=N, eos_token_ids=EOS),
    Diffusion(max_new_tokens=N, block_length=4, threshold=0.9, eos_token_ids=EOS),
    Diffusion(max_new_tokens=N, block_length=4, fixed_schedule=True, eos_token_ids=EOS),
    Spec(max_new_tokens=N, block_length=8, threshold=0.0, eos_token_ids=EOS)])
def test_batched_rows_equal_rows_alone(model, settings):
  batched = generate(model, BATCH, settings)
  alone = [generate(model, [p], settings) for p in BATCH]
  for b, single in enumerate(alone):
    assert batched.tokens[b] == single.tokens[0], b
    assert batched.nfe[b] == single.nfe[0], b
  lengths = {len(t) for t in batched.tokens}
  assert len(lengths) > 1 and min(lengths) < N  # rows did finish at different times


def _same_as_greedy(spec_tokens, ar_tokens):
  """Speculation emits the greedy AR sequence; it may overshoot max_new_tokens by up to B - 1
  tokens (docs/model.md §5.3), never past an EOS."""
  if ar_tokens[-1] == EOS:
    return spec_tokens == ar_tokens
  return spec_tokens[:len(ar_tokens)] == ar_tokens and len(spec_tokens) < N + 8


@pytest.mark.parametrize("draft_lora", [False, True])
def test_greedy_speculation_emits_greedy_autoregressive_output(model, draft_lora):
  prompts = BATCH
  spec = Spec(max_new_tokens=N, block_length=8, draft_lora=draft_lora, eos_token_ids=EOS)
  want = generate(model, prompts, AR(max_new_tokens=N, eos_token_ids=EOS)).tokens
  for b, prompt in enumerate(prompts):
    assert _same_as_greedy(generate(model, [prompt], spec).tokens[0], want[b]), b
  got = generate(model, prompts, spec)
  for b, tokens in enumerate(got.tokens):
    assert _same_as_greedy(tokens, want[b]), b
  assert max(max(a, default=0) for a in got.accepted_lengths) > 1  # several drafts per round
  assert len({tuple(a) for a in got.accepted_lengths}) > 1  # and different lengths per row


def test_speculation_stays_greedy_when_the_seed_is_the_mask_id():
  # A token of every row's greedy output doubles as the mask id: the verifier emits it as a seed.
  model = ref.structured_model()
  want = generate(model, BATCH, AR(max_new_tokens=N, eos_token_ids=())).tokens
  in_every_row = set.intersection(*(set(row[:-1]) for row in want))
  assert in_every_row
  got = generate(model, BATCH, Spec(max_new_tokens=N, block_length=8, eos_token_ids=(),
                                    mask_token_id=min(in_every_row)))
  for b, tokens in enumerate(got.tokens):  # no EOS: speculation may overshoot by up to B - 1
    assert tokens[:N] == want[b] and len(tokens) < N + 8, b


def test_lora_changes_the_draft(model):
  kw = dict(max_new_tokens=N, block_length=8, eos_token_ids=())
  with_lora = generate(model, BATCH, Spec(draft_lora=True, **kw))
  without = generate(model, BATCH, Spec(draft_lora=False, **kw))
  assert with_lora.accepted_lengths != without.accepted_lengths


def test_no_recompilation_for_a_new_batch_in_the_same_bucket(model):
  compiles = []

  def listen(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  kw = dict(max_new_tokens=N, block_length=4, eos_token_ids=EOS)
  generate(model, BATCH, Diffusion(**kw))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    second = generate(model, [[9, 8, 7, 6, 5, 4, 3, 2, 1, 12, 13], [30, 31], [40]],
                      Diffusion(fixed_schedule=True, seed=1, **kw))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []
  assert second.compile_seconds == 0.0


@pytest.mark.parametrize("mode,block_length,eos", [("ar", None, EOS), ("diffusion", 4, EOS),
                                                    ("spec", 8, ())])
def test_streaming_delivers_the_same_tokens(model, mode, block_length, eos):
  received = {}
  settings = settings_for(mode, skip_other_modes=True, max_new_tokens=N,
                          block_length=block_length, eos_token_ids=eos)
  prompts = BATCH
  def on_tokens(row, ids):
    received.setdefault(row, []).append(ids)

  streamed = generate(model, prompts, settings, on_tokens=on_tokens)
  compiled = generate(model, prompts, settings)
  assert streamed.tokens == compiled.tokens and streamed.nfe == compiled.nfe
  for b, tokens in enumerate(compiled.tokens):
    assert sum(received[b], []) == tokens
  # whole blocks / accepted runs arrive in one call; AR ids a few at a time (docs/decoding.md)
  assert any(len(chunk) > 1 for chunks in received.values() for chunk in chunks)
  if mode == "ar":
    assert max(len(chunk) for chunks in received.values() for chunk in chunks) <= 4
    assert all(len(chunks) >= N // 4 for b, chunks in received.items()
               if len(compiled.tokens[b]) == N)


def test_argument_errors(model):
  no_lora = ref.structured_model(lora=False)
  cases = [
      (lambda: settings_for("beam"), "mode"),
      (lambda: settings_for("ar", threshold=0.5), "threshold is not a setting of ar"),
      (lambda: Diffusion(max_new_tokens=30, block_length=8), "multiple of block_length"),
      (lambda: Diffusion(max_new_tokens=30), "multiple of block_length"),  # the model's block 32
      (lambda: Diffusion(block_length=0), "block_length"),
      (lambda: AR(max_new_tokens=2000), "max_position_embeddings"),
      (lambda: AR(eos_token_ids=(999,)), "outside the vocabulary"),
  ]
  for make, words in cases:
    with pytest.raises(ValueError, match=words):
      generate(model, [[1, 2]], make())
  with pytest.raises(ValueError, match="empty"):
    generate(model, [[1, 2], []])
  with pytest.raises(ValueError, match="vocab_size"):
    generate(model, [[1, 999]])
  with pytest.raises(ValueError, match="no LoRA"):
    generate(no_lora, [[1, 2]], Spec(draft_lora=True))


def test_threshold_is_compared_in_the_confidence_dtype():
  # bf16(0.9) = 0.8984375: a bf16 confidence of exactly that clears tau = 0.9 (docs/model.md §9.2
  # item 4).
  conf = jnp.array([[0.8984375, 0.5, 0.89453125, 0.2]], jnp.bfloat16)
  is_mask = jnp.array([[True, True, True, False]])
  got = select_threshold(conf, is_mask, jnp.float32(0.9))
  assert got.tolist() == [[True, False, False, False]]
  # Exactly one guaranteed commit even on ties, none outside the mask (docs/model.md §9.2 item 5).
  conf = jnp.array([[0.3, 0.3, -jnp.inf]], jnp.float32)
  got = select_threshold(conf, jnp.array([[True, True, False]]), jnp.float32(0.9))
  assert got.tolist() == [[True, False, False]]


def test_transfer_schedule_front_loads_the_remainder():
  got = np.asarray(transfer_schedule(jnp.array([31, 70]), 32))
  assert got[0].tolist() == [1] * 31 + [0]
  assert got[1].tolist() == [3] * 6 + [2] * 26
