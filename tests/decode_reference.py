"""Plain-Python transcriptions of the reference decoding loops (docs/model.md §5.1-5.3, §5.6),
batch size 1.

Written from docs/model.md §5 loop by loop, with Python lists and numpy; the only shared pieces with
the engine are the model forward and the definition of the random noise (the same draws must be used
to compare sampled outputs). Forward calls are jitted for speed but issued one by one, exactly where
the reference issues them, each with its own cache update or crop.

Sampling: greedy = argmax; with temperature T the reference's float64 Gumbel-max
argmax exp(l) / (-log u)^T (docs/model.md §5.1), also used for the `multinomial` draws of §5.2/§5.3,
with u = uniform(fold_in(fold_in(PRNGKey(seed), event), row 0)) and the event numbers of the
engine's documented sampling order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax import LoRAConfig, NLDModel, preset
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import forward, llama4_query_scale, rope_cos_sin, rope_inv_freq

# Every explicit-mask forward is padded to this many tokens, so that it compiles once.
MASKED_FORWARD_LENGTH = 384


@functools.partial(jax.jit, static_argnames=("graphdef", "pattern", "lora", "append"))
def _call(graphdef, state, tokens, cache, n_new, key_valid=None, *, pattern, lora=False, append=False):
  return forward(graphdef, state, tokens, pattern=pattern, cache=cache, n_new=n_new, lora=lora,
                 append=append, key_valid=key_valid)


class Eager:
  """One model forward per call on one sequence: token list -> (logits [T, V] numpy, cache)."""

  def __init__(self, model: NLDModel):
    self.graphdef, self.state = nnx.split(model)
    self.cfg = model.cfg

  def __call__(self, tokens, cache, *, pattern, lora=False, append=False):
    logits, cache = _call(self.graphdef, self.state, jnp.asarray([tokens], jnp.int32), cache,
                          None, pattern=pattern, lora=lora, append=append)
    return np.asarray(logits[0]), cache

  def prefill(self, prompt, cache, pad_to, bidirectional=False):
    """Prefill of the prompt right-padded to `pad_to` tokens (only the prompt is appended).

    Causal, or with `bidirectional` (causal_context=False) every prompt token sees the whole
    prompt and no padding.

    Padding changes no value the prompt tokens see, but it gives the prefill the same shape as
    the engine's bucketed one, so that both run the same float operations: the confidences of
    MASK positions differ by ~1e-6 from one another, and shape-dependent rounding could otherwise
    reorder them.
    """
    tokens = jnp.asarray([list(prompt) + [0] * (pad_to - len(prompt))], jnp.int32)
    n_new = jnp.asarray([len(prompt)], jnp.int32)
    if bidirectional:
      valid = jnp.arange(pad_to)[None, :] < len(prompt)
      logits, cache = _call(self.graphdef, self.state, tokens, cache, n_new, valid,
                            pattern="bidirectional", append=True)
    else:
      logits, cache = _call(self.graphdef, self.state, tokens, cache, n_new, pattern="causal")
    return np.asarray(logits[0, :len(prompt)]), cache


def sample(logits: np.ndarray, temperature: float, seed: int, event: int) -> list[int]:
  """logits [T, V] -> T token ids."""
  if temperature == 0:
    return [int(t) for t in np.argmax(logits, axis=-1)]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), event), 0)
  u = np.asarray(jax.random.uniform(key, logits.shape, jnp.float32,
                                    minval=np.finfo(np.float32).tiny, maxval=1.0), np.float64)
  scores = np.exp(logits.astype(np.float64)) / (-np.log(u)) ** temperature
  return [int(t) for t in np.argmax(scores, axis=-1)]


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax in the logits dtype (fp32 here), as the reference's confidence."""
  return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def first_index(xs: list[int], value: int) -> int | None:
  return xs.index(value) if value in xs else None


def block_diffusion(model: Eager, prompt, *, max_new_tokens, block_length, threshold, temperature,
                    seed, eos, max_thinking_tokens, end_think, cache_len, pad_to, mask_id,
                    causal_context=True):
  """docs/model.md §5.1. Returns (generated ids, nfe).

  causal_context=False: the prefill runs bidirectionally (still writing the cache), no seed is
  used, every block starts all-MASK and is committed by a bidirectional forward (step 2e: the
  commit's mask is causal iff causal_context).
  """
  size, p_len = block_length, len(prompt)
  cache = KVCache.init(model.cfg, 1, cache_len)
  logits, cache = model.prefill(prompt, cache, pad_to, bidirectional=not causal_context)
  seed_tok = sample(logits[-1:], temperature, seed, 0)[0]
  x, nfe = list(prompt), 0
  for k in range(max_new_tokens // size):
    start = p_len + k * size
    x += ([seed_tok] if causal_context else [mask_id]) + [mask_id] * (size - 1)
    if end_think is not None and max_thinking_tokens is not None:
      if (k + 1) * size > max_thinking_tokens and end_think not in x[p_len:start]:
        x[start + max(0, max_thinking_tokens - k * size)] = end_think
    m = x[start:start + size].count(mask_id)
    schedule = [m // size + (1 if i < m % size else 0) for i in range(size)]
    for i in range(size):
      block = x[start:start + size]
      is_mask = [t == mask_id for t in block]
      if not any(is_mask):
        break
      nfe += 1
      logits, _ = model(block, cache, pattern="bidirectional")
      cand = sample(logits, temperature, seed, 1 + k * (size + 1) + i)
      p = softmax(logits)
      conf = np.array([p[t, cand[t]] if is_mask[t] else -np.inf for t in range(size)], p.dtype)
      order = [int(j) for j in np.argsort(-conf, kind="stable")]  # ties: lower position first
      if threshold is None:
        chosen = order[:schedule[i]]
      else:
        n_masked = sum(is_mask)
        chosen = [order[0]] + [j for j in order[1:n_masked] if conf[j] >= np.float32(threshold)]
      for j in chosen:
        if is_mask[j]:
          x[start + j] = cand[j]
      if eos is not None:
        block = x[start:start + size]
        first = first_index(block, eos)
        if first is not None and mask_id not in block[:first]:
          break
    if causal_context:
      logits, cache = model(x[start:start + size], cache, pattern="causal")
      seed_tok = sample(logits[-1:], temperature, seed, 1 + k * (size + 1) + size)[0]
    else:
      _, cache = model(x[start:start + size], cache, pattern="bidirectional", append=True)
    nfe += 1
    if eos is not None and eos in x[p_len:]:
      return x[p_len:p_len + first_index(x[p_len:], eos) + 1], nfe
  return x[p_len:], nfe


def autoregressive(model: Eager, prompt, *, max_new_tokens, temperature, seed, eos,
                   max_thinking_tokens, end_think, cache_len, pad_to):
  """docs/model.md §5.2. Returns (generated ids, nfe)."""
  cache = KVCache.init(model.cfg, 1, cache_len)
  logits, cache = model.prefill(prompt, cache, pad_to)
  logit = logits[-1:]
  generated, nfe = [], 0
  for step in range(max_new_tokens):
    nfe += 1
    tok = sample(logit, temperature, seed, step)[0]
    if end_think is not None and max_thinking_tokens is not None:
      if step >= max_thinking_tokens and end_think not in generated:
        tok = end_think
    generated.append(tok)
    if eos is not None and tok == eos:
      break
    if step < max_new_tokens - 1:
      logits, cache = model([tok], cache, pattern="causal")
      logit = logits[-1:]
  return generated, nfe


def self_speculation(model: Eager, prompt, *, max_new_tokens, block_length, threshold,
                     temperature, seed, eos, max_thinking_tokens, end_think, cache_len, pad_to,
                     mask_id, lora):
  """docs/model.md §5.3. Returns (generated ids, nfe, acceptance lengths).

  Two documented deviations of the engine are transcribed: the draft loop stops after B forwards,
  and a forced end-think seed replaces the bonus token it follows in the output.
  """
  size = block_length
  cache = KVCache.init(model.cfg, 1, cache_len)
  logits, cache = model.prefill(prompt, cache, pad_to)
  nfe = 1
  tok = sample(logits[-1:], temperature, seed, 0)[0]
  if eos is not None and tok == eos:
    return [tok], nfe, []
  generated, total, rnd, accepted_lengths = [tok], 1, 0, []
  while total < max_new_tokens:
    c = int(cache.lengths[0])
    block = [tok] + [mask_id] * (size - 1)
    j = 0
    # The seed (position 0) is the verifier's token and never a draft slot, even if it equals the
    # mask id: the one place where this transcription deliberately departs from the reference.
    while mask_id in block[1:] and j < size:
      is_mask = [i > 0 and t == mask_id for i, t in enumerate(block)]
      logits, _ = model(block, cache, pattern="bidirectional", lora=lora)
      nfe += 1
      cand = sample(logits, temperature, seed, 1 + rnd * (size + 1) + j)
      j += 1
      if threshold > 0:
        probs = softmax(logits / np.float32(temperature) if temperature > 0 else logits)
        conf = np.array([probs[t, cand[t]] if is_mask[t] else -np.inf for t in range(size)],
                        probs.dtype)
        unmask = [bool(is_mask[t] and conf[t] >= np.float32(threshold)) for t in range(size)]
        if not any(unmask):
          unmask[int(np.argmax(conf))] = True
        block = [cand[t] if unmask[t] else block[t] for t in range(size)]
      else:
        block = [cand[t] if is_mask[t] else block[t] for t in range(size)]
        break
    logits, cache = model(block, cache, pattern="causal")
    nfe += 1
    ar = sample(logits, temperature, seed, 1 + rnd * (size + 1) + size)
    a = 0
    while a < size - 1 and ar[a] == block[a + 1]:
      a += 1
    accepted = a + 1
    accepted_lengths.append(accepted)
    emitted = ar[:accepted]
    generated += emitted
    total += accepted
    cache = cache.crop(jnp.asarray([c + accepted]))
    tok = ar[accepted - 1]
    if eos is not None and eos in emitted:
      cut = len(emitted) - (emitted.index(eos) + 1)
      generated = generated[:len(generated) - cut]
      total -= cut
      break
    if end_think is not None and max_thinking_tokens is not None:
      # The forced seed matters (and replaces the bonus token) only if another round follows.
      if max_thinking_tokens < total < max_new_tokens and end_think not in generated:
        tok = end_think
        generated[-1] = end_think
    rnd += 1
    if total >= max_new_tokens:
      break
  return generated, nfe, accepted_lengths


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _masked_forward(graphdef, state, tokens, positions, allowed):
  """The model's layers over a whole sequence with an explicit [T, T] attention mask and no cache:
  its own projections, norms and RoPE, but a dense softmax over the keys `allowed` lets each
  query see (no attention pattern, dispatcher or cache of the library)."""
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  cos, sin = rope_cos_sin(positions[None], *rope_inv_freq(cfg), model.dtype)
  qscale = (llama4_query_scale(positions[None], cfg)
            if cfg.llama_4_scaling_beta is not None else None)
  h = model.encoder.embed_tokens(tokens[None])
  group = cfg.num_heads // cfg.num_kv_heads
  for layer in model.encoder.layers:
    q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin, qscale)
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
    scores = jnp.where(allowed[None, None], scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    h = h + layer.self_attn.out(o)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
  z = model.encoder.norm(h)
  return (model.encoder.embed_tokens.attend(z) if cfg.tie_word_embeddings
          else model.diffusion_head(z))[0]


def masked_forward(model: Eager, tokens, positions, allowed) -> np.ndarray:
  """One forward of `tokens` at `positions` where query q sees key k iff allowed[q][k]; logits
  [len(tokens), V]. Padding to MASKED_FORWARD_LENGTH: padding keys are seen by no real query."""
  n, pad = len(tokens), MASKED_FORWARD_LENGTH - len(tokens)
  assert pad >= 0, n
  full = np.eye(MASKED_FORWARD_LENGTH, dtype=bool)
  full[:n, :n] = allowed
  logits = _masked_forward(model.graphdef, model.state, jnp.asarray(list(tokens) + [0] * pad),
                           jnp.asarray(list(positions) + [0] * pad, jnp.int32), jnp.asarray(full))
  return np.asarray(logits[:n])


def quadratic_speculation(model: Eager, prompt, *, max_new_tokens, block_length, eos,
                          max_thinking_tokens, end_think, mask_id, ar_mix_weight=None):
  """docs/model.md §5.6, greedy. Returns (generated ids, nfe, accepted lengths).

  No cache: every forward runs the whole sequence so far (the prompt and the accepted tokens, each
  causal over what precedes it, which is what the reference's cropped cache holds) followed by the
  round's tokens, under a mask built here position by position from the text.
  """
  size, p_len = block_length, len(prompt)
  x = list(prompt) + [mask_id] * (max_new_tokens + 2 * size)
  nfe = 1
  # First forward: the prompt (causal) and B MASKs that see the whole prompt and one another.
  n = p_len + size
  allowed = [[k <= q if q < p_len else True for k in range(n)] for q in range(n)]
  logits = masked_forward(model, x[:n], range(n), allowed)
  rows = logits[p_len - 1:p_len + size].copy()
  rows[1] = rows[0]  # the first draft position takes the causal prediction after the prompt
  x[p_len:p_len + size] = [int(t) for t in np.argmax(rows[1:], axis=-1)]
  generated, total, accepted_lengths = [], 0, []
  while True:
    nfe += 1
    c = p_len + total
    d = x[c:c + size]
    tokens, positions, where = list(x[:c]), list(range(c)), [("context", k) for k in range(c)]
    for i in range(size):
      for m in range(size + 1):
        tokens.append(d[i] if m == 0 else mask_id)
        positions.append(c + i + m)
        where.append((i, m))

    def sees(query, key):
      if query[0] == "context":
        return key[0] == "context" and key[1] <= query[1]
      if key[0] == "context":
        return True
      (i, m), (j, n) = query, key
      return (n == 0 and j <= i) or (m > 0 and j == i)

    allowed = [[sees(q, k) for k in where] for q in where]
    logits = masked_forward(model, tokens, positions, allowed)[c:].reshape(size, size + 1, -1)
    logits = logits.copy()
    if ar_mix_weight is None:
      logits[:, 1] = logits[:, 0]
    else:
      w = np.float32(ar_mix_weight)
      mixed = w * logits[:, 0] + (np.float32(1) - w) * logits[:, 1]
      logits[:, 0] = mixed
      logits[:, 1] = mixed
    pred = np.argmax(logits, axis=-1)
    accept, following = 1, [int(t) for t in pred[0, 1:]]
    while accept < size and pred[accept - 1, 0] == d[accept]:
      following = [int(t) for t in pred[accept, 1:]]
      accept += 1
    accepted_lengths.append(accept)
    emitted = d[:accept]
    if eos is not None and eos in emitted:
      generated += emitted[:emitted.index(eos) + 1]
      return generated[:max_new_tokens], nfe, accepted_lengths
    generated += emitted
    x[c + accept:c + accept + size] = following
    if end_think is not None and max_thinking_tokens is not None:
      if total + accept > max_thinking_tokens and end_think not in generated:
        x.insert(c + accept, end_think)
    total += accept
    if total >= max_new_tokens:
      return generated[:max_new_tokens], nfe, accepted_lengths


def structured_model(seed: int = 22, lora: bool = True) -> NLDModel:
  """The `tiny` model with structure, so that decoding is not degenerate.

  Random weights alone almost never let a diffusion draft agree with the causal verifier nor lift
  confidences over 0.9. Here every embedding row (MASK included) shares one direction c, the
  context-specific part is shrunk, and four output tokens {7, 22, 41, 63} read c strongly and
  separate from one another along random directions orthogonal to c: the model mostly emits one
  of them, confidently, with the choice depending on context. Whether the choice varies enough
  depends on the draw; the default seed is one whose model the parity grids find exercising
  multi-token commits and mid-block EOS (the tests assert both).
  """
  cfg = preset("tiny")
  model = NLDModel(cfg, lora=LoRAConfig(4, 8) if lora else None, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  d = cfg.hidden_size
  c = rng.normal(size=d)
  c /= np.linalg.norm(c)
  emb = np.asarray(model.encoder.embed_tokens.embedding[...])
  model.encoder.embed_tokens.embedding[...] = jnp.asarray(
      0.3 * emb + c * np.sqrt(d) * emb.std(), jnp.float32)
  head = np.array(model.diffusion_head.kernel[...])
  favoured = [7, 22, 41, 63]
  spread = rng.normal(size=(d, len(favoured)))
  spread -= np.outer(c, c @ spread)
  spread /= np.linalg.norm(spread, axis=0)
  head[:, favoured] = 3.0 * c[:, None] + 5.0 * spread
  model.diffusion_head.kernel[...] = jnp.asarray(head, jnp.float32)
  if lora:
    # Every rank of the adapter writes along the direction that separates token 41 from 63, so
    # drafts with the LoRA differ from drafts without it (the untrained adapter is the identity).
    toward = head[:, 41] - head[:, 63]
    for layer in model.encoder.layers:
      o_proj = layer.self_attn.o_proj
      o_proj.lora_b[...] = jnp.broadcast_to(
          jnp.asarray(1.0 * toward / np.linalg.norm(toward), jnp.float32), o_proj.lora_b[...].shape)
  return model
