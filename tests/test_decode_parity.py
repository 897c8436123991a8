"""The compiled decoding engine against plain-Python transcriptions of the reference loops.

Batch size 1 (the reference's own setting), identical tokens and identical NFE over a grid of
prompt lengths, block lengths, thresholds, EOS and thinking-budget settings, greedy and sampled.
"""

import dataclasses
import itertools

import pytest

import decode_reference as ref
from dllm_jax.decode import AR, Diffusion, Spec, bucket_length, cache_length, generate

PROMPTS = ([5, 9, 20, 33, 41], [60, 2, 3], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80])
N = 32
EOS = 63        # a favoured token of the structured model: it turns up mid-block
END_THINK = 22  # another one, so that injected and natural end-think tokens both occur
MASK = 100


@pytest.fixture(scope="module")
def model():
  return ref.structured_model()


@pytest.fixture(scope="module")
def eager(model):
  return ref.Eager(model)


def _shapes(prompt, block_length):
  """The engine's padded prompt and cache lengths, so that the reference rounds like it."""
  bucket = bucket_length(len(prompt))
  return dict(pad_to=bucket, cache_len=cache_length(bucket, N, block_length))


def _knobs(eos, think):
  return dict(eos=eos, max_thinking_tokens=think, end_think=END_THINK if think else None)


def _engine_knobs(eos, think):
  return dict(eos_token_ids=() if eos is None else eos, max_thinking_tokens=think,
              end_think_token_id=END_THINK if think else None)


def _diffusion(threshold, **kw):
  """The engine's settings for the reference's threshold (None: the fixed transfer schedule)."""
  if threshold is None:
    return Diffusion(fixed_schedule=True, **kw)
  return Diffusion(threshold=threshold, **kw)


# (eos, max_thinking_tokens) combinations
EOS_THINK = [(None, None), (EOS, None), (None, 6), (EOS, 6)]


def _grid(*axes):
  """The product of `axes`, each case with the next EOS/thinking combination in turn: every
  combination meets every block length and threshold, at a quarter of the full product's time."""
  return [(*case, EOS_THINK[i % len(EOS_THINK)])
          for i, case in enumerate(itertools.product(*axes))]


@pytest.mark.slow
def test_block_diffusion_matches_reference(model, eager):
  stats = {"multi_commit_steps": 0, "mid_block_eos": 0}
  for block_length, threshold, prompt, (eos, think) in _grid((4, 8, 32), (None, 0.5, 0.9),
                                                             PROMPTS):
    want, want_nfe = ref.block_diffusion(
        eager, prompt, max_new_tokens=N, block_length=block_length, threshold=threshold,
        temperature=0.0, seed=0, **_shapes(prompt, block_length), mask_id=MASK,
        **_knobs(eos, think))
    got = generate(model, [prompt], _diffusion(threshold, max_new_tokens=N,
                                               block_length=block_length,
                                               **_engine_knobs(eos, think)))
    case = (block_length, threshold, len(prompt), eos, think)
    assert got.tokens[0] == want, case
    assert got.nfe[0] == want_nfe, case
    blocks = -(-len(want) // block_length)
    if eos is None and think is None:  # then each block holds exactly B - 1 MASKs to fill
      stats["multi_commit_steps"] += want_nfe - blocks < len(want) - blocks
    stats["mid_block_eos"] += eos is not None and len(want) % block_length != 0
  # The grid must exercise what it claims: steps that commit several tokens, EOS inside blocks.
  assert stats["multi_commit_steps"] >= 2, stats
  assert stats["mid_block_eos"] >= 2, stats


@pytest.mark.slow
def test_block_diffusion_without_causal_context_matches_reference(model, eager):
  differs = []
  for block_length, threshold, prompt in [(8, 0.9, PROMPTS[0]), (4, None, PROMPTS[2]),
                                          (32, 0.5, PROMPTS[1])]:
    kw = dict(max_new_tokens=N, block_length=block_length, threshold=threshold)
    want, want_nfe = ref.block_diffusion(
        eager, prompt, temperature=0.0, seed=0, **_shapes(prompt, block_length), mask_id=MASK,
        causal_context=False, **_knobs(EOS, None), **kw)
    got = generate(model, [prompt], _diffusion(causal_context=False, **_engine_knobs(EOS, None),
                                               **kw))
    assert (got.tokens[0], got.nfe[0]) == (want, want_nfe), (block_length, threshold)
    with_context = generate(model, [prompt], _diffusion(**_engine_knobs(EOS, None), **kw))
    differs.append((got.tokens[0], got.nfe[0]) != (with_context.tokens[0], with_context.nfe[0]))
  assert any(differs)  # the switch really changes the decode


def test_autoregressive_matches_reference(model, eager):
  for prompt, (eos, think) in itertools.product(PROMPTS, EOS_THINK):
    want, want_nfe = ref.autoregressive(eager, prompt, max_new_tokens=N, temperature=0.0, seed=0,
                                        **_shapes(prompt, 1), **_knobs(eos, think))
    got = generate(model, [prompt], AR(max_new_tokens=N, **_engine_knobs(eos, think)))
    assert got.tokens[0] == want, (len(prompt), eos, think)
    assert got.nfe[0] == want_nfe == len(want)


@pytest.mark.parametrize("block_length,lora", [(4, False), (8, True)])
def test_self_speculation_matches_reference(model, eager, block_length, lora):
  longest_accept = 0
  for threshold, prompt, (eos, think) in _grid((0.0, 0.9), PROMPTS + PROMPTS[:1]):
    want, want_nfe, want_acc = ref.self_speculation(
        eager, prompt, max_new_tokens=N, block_length=block_length, threshold=threshold,
        temperature=0.0, seed=0, **_shapes(prompt, block_length), mask_id=MASK,
        lora=lora, **_knobs(eos, think))
    got = generate(model, [prompt], Spec(max_new_tokens=N, block_length=block_length,
                                         threshold=threshold, draft_lora=lora,
                                         **_engine_knobs(eos, think)))
    case = (threshold, len(prompt), eos, think)
    assert got.tokens[0] == want, case
    assert got.nfe[0] == want_nfe, case
    assert got.decode_nfe[0] == want_nfe - 1
    assert got.accepted_lengths[0] == want_acc, case
    longest_accept = max([longest_accept, *want_acc])
  assert longest_accept >= block_length // 2  # drafts do get accepted in runs


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_sampling_matches_reference_with_same_noise(model, eager, mode):
  temperature, seed, block_length = 1.5, 3, 8
  streams = set()
  for prompt in PROMPTS[:2]:
    kw = dict(max_new_tokens=N, temperature=temperature, seed=seed, eos=None,
              max_thinking_tokens=None, end_think=None)
    if mode == "ar":
      want, want_nfe = ref.autoregressive(eager, prompt, **_shapes(prompt, 1), **kw)
    elif mode == "diffusion":
      want, want_nfe = ref.block_diffusion(
          eager, prompt, block_length=block_length, threshold=0.9, mask_id=MASK,
          **_shapes(prompt, block_length), **kw)
    else:
      want, want_nfe, _ = ref.self_speculation(
          eager, prompt, block_length=block_length, threshold=0.5, mask_id=MASK, lora=True,
          **_shapes(prompt, block_length), **kw)
    settings = {"ar": AR(max_new_tokens=N, eos_token_ids=()),
                "diffusion": Diffusion(max_new_tokens=N, block_length=block_length, threshold=0.9,
                                       eos_token_ids=()),
                "spec": Spec(max_new_tokens=N, block_length=block_length, threshold=0.5,
                             eos_token_ids=())}[mode]
    got = generate(model, [prompt], dataclasses.replace(settings, temperature=temperature,
                                                        seed=seed))
    assert got.tokens[0] == want
    assert got.nfe[0] == want_nfe
    greedy = generate(model, [prompt], settings)
    streams.add(tuple(want) != tuple(greedy.tokens[0]))
  assert True in streams  # sampling actually departs from greedy decoding
