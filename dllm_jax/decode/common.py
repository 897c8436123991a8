"""Pieces shared by the decoding modes: static settings, per-call arrays, prefill, prompt buckets.

A mode is three pure functions over a carry dict of arrays (one entry per per-row quantity):
`init(ctx, last_logits, cache)` after the causal prefill, `step(ctx, carry)` (one AR token, one
diffusion block or one (linear or quadratic) speculative round for every row still running) and `running(ctx, carry)`.
The compiled engine runs `lax.while_loop(running, step, init(...))` in one executable; streaming
runs the same `step` jitted on its own from a Python loop. Every carry holds at least
  out   [B, W] int32  generated ids, -1 where nothing was written; W = max_new_tokens + B
  count [B] int32     ids written per row (the row's output is out[b, :count[b]] cut after its EOS)
  nfe   [B] int32     forward calls counted for the row as the reference counts them
  done  [B] bool      finished rows: they stop changing and stop counting
  cache KVCache
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.kv_cache import KVCache
from dllm_jax.model import forward

MIN_BUCKET = 16
UNWRITTEN = -1
CACHE_ROUND = 64
NO_BUDGET = 2**30  # a thinking budget no generation reaches


@dataclasses.dataclass(frozen=True)
class Settings:
  """What shapes the compiled program (hashable: a jit static argument). Everything else
  (threshold, temperature, seed, EOS ids, thinking budget) is traced, so changing it does not
  recompile."""
  mode: str
  max_new_tokens: int
  block_length: int
  greedy: bool
  mask_id: int
  draft_lora: bool
  causal_context: bool = True  # diffusion only: False = bidirectional prefill, blocks start all-MASK

  @property
  def out_width(self) -> int:
    return self.max_new_tokens + self.block_length


@dataclasses.dataclass(frozen=True)
class Ctx:
  """What a step needs: the split model, the static settings and the traced per-call knobs.

  use_threshold: diffusion: threshold rule (else the transfer schedule); spec: threshold > 0.
  ar_mix_weight: quadratic: the AR row's weight in the mixed logits (1 when unset).
  eos_ids: [settings.MAX_EOS] int32 padded with -1. think_budget: max_thinking_tokens, or NO_BUDGET when
  the budget is off (end_think_id is then -1 and matches nothing).
  """
  graphdef: nnx.GraphDef
  state: Any
  settings: Settings
  threshold: jax.Array    # fp32 scalar
  use_threshold: jax.Array
  temperature: jax.Array  # fp32 scalar, 1 when greedy
  seed_key: jax.Array
  eos_ids: jax.Array
  think_budget: jax.Array
  end_think_id: jax.Array
  ar_mix_weight: jax.Array  # fp32 scalar

  def model(self, tokens: jax.Array, **kw):
    return forward(self.graphdef, self.state, tokens, **kw)


@dataclasses.dataclass
class GenerateResult:
  """Per-row outputs and statistics of one `generate` call.

  tokens: generated ids per row, cut after the row's first EOS (inclusive).
  nfe: forward calls per row counted as the reference counts them (docs/model.md §5: the
    prefill counts in "spec" mode only; in "quadratic" mode the prefill and the first draft are
    the reference's one first forward). decode_nfe: the same without that first forward.
  tokens_per_forward: len(tokens) / nfe; decode_tokens_per_forward: len(tokens) / decode_nfe.
  accepted_lengths: "spec" and "quadratic" modes only: per row, the acceptance length of every
    round (spec: matched drafts + 1 bonus; quadratic: accepted drafts), before EOS truncation.
  compile_seconds: time spent compiling in this call (0.0 when every program was cached).
  """
  tokens: list[list[int]]
  nfe: list[int]
  decode_nfe: list[int]
  tokens_per_forward: list[float]
  decode_tokens_per_forward: list[float]
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  accepted_lengths: list[list[int]] | None = None


def bucket_length(n: int) -> int:
  """Padded prompt length: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], width: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [B, width] int32 tokens and [B] int32 true lengths."""
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def cache_length(bucket: int, max_new_tokens: int, block_length: int) -> int:
  """Cache slots: the padded prompt plus room for every id a row can write (speculation may
  overshoot by a block), rounded up to a multiple of CACHE_ROUND so that modes and block lengths
  share one prefill program."""
  return bucket + -(-(max_new_tokens + block_length) // CACHE_ROUND) * CACHE_ROUND


def prefill(graphdef: nnx.GraphDef, state: Any, tokens: jax.Array, lengths: jax.Array,
            cache_len: int, cache_sharding: KVCache | None, bidirectional: bool = False
            ) -> tuple[jax.Array, KVCache]:
  """Prefill of right-padded prompts: (logits at each row's last prompt token [B, V], cache).

  Causal by default; `bidirectional` (diffusion with causal_context=False) lets every prompt token
  see the whole prompt, padding excluded. Padding slots are written but stay beyond each row's
  length, so no later query sees them. cache_sharding: the KVCache of shardings (hashable: this is
  a jit static argument).
  """
  model = nnx.merge(graphdef, state)
  cache = KVCache.init(model.cfg, tokens.shape[0], cache_len, model.dtype)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  if bidirectional:
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    logits, cache = model(tokens, pattern="bidirectional", cache=cache, n_new=lengths,
                          append=True, key_valid=valid, logits_at=(lengths - 1)[:, None])
  else:
    logits, cache = model(tokens, pattern="causal", cache=cache, n_new=lengths,
                          logits_at=(lengths - 1)[:, None])
  return logits[:, 0], cache
