"""The three NLD decoding modes as compiled JAX programs: `generate(model, prompts, mode=...)`.

  "ar"         autoregressive (spec §5.2)
  "diffusion"  block diffusion with a causal commit per block (spec §5.1)
  "spec"       linear self-speculation: diffusion draft (LoRA on), causal verify (spec §5.3)

Prompts of any lengths share one batch: they are right-padded to a power-of-two bucket and every
row keeps its own cache length, so no row attends to padding and rows finish independently. Each
mode compiles to a prefill program and one decode program (`lax.while_loop` over blocks/rounds/
tokens, inner `lax.while_loop` over denoising steps, cache donated); programs are cached by
(settings, batch, bucket), so a new batch in the same bucket does not recompile. With `on_tokens`
the same step function runs jitted from a Python loop and ids are streamed as they are committed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dllm_jax.decode import ar, block_diffusion, speculative
from dllm_jax.decode.common import (MAX_EOS, NO_BUDGET, Ctx, GenerateResult, Settings,
                                    bucket_length, cache_length, pad_prompts, prefill)
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import unstack_layers
from dllm_jax.sharding import gather

MODES = {"ar": ar, "diffusion": block_diffusion, "spec": speculative}
_DEFAULT = object()  # threshold not given: 0.9 for diffusion, 0.0 for spec (the reference defaults)

__all__ = ["generate", "GenerateResult", "MODES", "bucket_length", "cache_length",
           "unroll_layers_by_default", "LAYER_LAYOUTS"]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, mode: str = "diffusion",
             max_new_tokens: int = 512, block_length: int | None = None,
             threshold: Any = _DEFAULT, temperature: float = 0.0, seed: int = 0,
             eos_token_ids: Any = None,
             max_thinking_tokens: int | None = None, end_think_token_id: int | None = None,
             causal_context: bool = True, draft_lora: bool | None = None,
             mesh: jax.sharding.Mesh | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None,
             unroll_layers: bool | None = None) -> GenerateResult:
  """Generates up to `max_new_tokens` ids per prompt with one of the three NLD decoding modes.

  block_length: diffusion block / speculative draft length; None = the model's block_size (the
    block it was trained with: 32 for NLD).
  threshold: diffusion: commit every masked position with confidence >= threshold besides the
    most confident one (None: the fixed transfer schedule); spec: draft confidence threshold
    (0 = fill the whole draft in one forward). Default 0.9 (diffusion) / 0.0 (spec).
  eos_token_ids: int or ids; default model.cfg.eos_token_ids; () disables EOS stopping.
  max_thinking_tokens, end_think_token_id: the thinking budget, active only when both are given.
  causal_context: diffusion only. False prefills the prompt bidirectionally and starts every block
    all-MASK instead of with the causally predicted seed (spec §5.1); commits stay causal.
  draft_lora: use the model's draft LoRA in spec drafts; None = use it if the model has one.
  mesh: a ("data", "model") mesh from dllm_jax.sharding.make_mesh with the model already placed on
    it (sharding.shard_model): prompts and cache are split over "data", kv heads over "model".
  on_tokens: streaming callback (row, new ids), called as ids are committed.
  unroll_layers: run the layers as an unrolled loop over per-layer copies of their weights instead
    of a scan over the stacked ones (see `dllm_jax.model.unstack_layers`); None = on CPU without a
    mesh, where it makes decoding ~1.4x faster at the cost of one copy of the layer weights.
  """
  settings, eos_ids, knobs = _settings(
      model, prompts, mode=mode, max_new_tokens=max_new_tokens, block_length=block_length,
      threshold=threshold, temperature=temperature, seed=seed, eos_token_ids=eos_token_ids,
      max_thinking_tokens=max_thinking_tokens, end_think_token_id=end_think_token_id,
      causal_context=causal_context, draft_lora=draft_lora)
  cfg = model.cfg
  bucket = bucket_length(max(len(p) for p in prompts))
  tokens, lengths = pad_prompts(prompts, bucket, cfg.pad_token_id or 0)
  graphdef, state = nnx.split(model)
  if unroll_layers is None:
    unroll_layers = unroll_layers_by_default(mesh)
  params = (state, unstack_layers(model) if unroll_layers else None)
  cache_sharding, tokens, lengths, knobs = _place(cfg, mesh, tokens, lengths, knobs)
  cache_len = cache_length(bucket, settings.max_new_tokens, settings.block_length)
  runner = _Runner(graphdef, settings, cache_len, cache_sharding, mesh)

  start = time.perf_counter()
  last_logits, cache = runner.call("prefill", params, tokens, lengths)
  jax.block_until_ready(last_logits)
  prefill_seconds = time.perf_counter() - start - runner.take_compile_seconds()

  start = time.perf_counter()
  if on_tokens is None:
    carry = runner.call("decode", params, last_logits, cache, knobs)
  else:
    carry = _stream(runner, params, last_logits, cache, knobs, eos_ids, on_tokens)
  jax.block_until_ready(carry["out"])
  decode_seconds = time.perf_counter() - start - runner.take_compile_seconds()
  return _result(carry, settings, eos_ids, len(prompts), prefill_seconds, decode_seconds,
                 runner.compile_seconds_total)


# --- arguments ------------------------------------------------------------------------------------

def _settings(model, prompts, *, mode, max_new_tokens, block_length, threshold, temperature, seed,
              eos_token_ids, max_thinking_tokens, end_think_token_id, causal_context, draft_lora
              ) -> tuple[Settings, tuple[int, ...], dict[str, np.ndarray]]:
  """Validates the arguments (one-line ValueErrors) and splits them into static and traced parts."""
  cfg = model.cfg
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts: expected a non-empty sequence of token-id sequences")
  for b, p in enumerate(prompts):
    if not len(p):
      raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"prompts[{b}] holds ids outside [0, vocab_size={cfg.vocab_size})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  if block_length is None:
    block_length = cfg.block_size
  if block_length < 1:
    raise ValueError(f"block_length={block_length}: must be >= 1")
  if mode == "diffusion" and max_new_tokens % block_length:
    raise ValueError(f"max_new_tokens={max_new_tokens} is not a multiple of "
                     f"block_length={block_length} (diffusion decodes whole blocks)")
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0")
  reach = max(len(p) for p in prompts) + max_new_tokens + (block_length if mode == "spec" else 0)
  if reach > cfg.max_position_embeddings:
    raise ValueError(f"longest prompt + max_new_tokens{' + block_length' if mode == 'spec' else ''}"
                     f" = {reach} exceeds max_position_embeddings={cfg.max_position_embeddings}")
  if mode != "ar" and cfg.mask_token_id is None:
    raise ValueError(f"mode={mode!r} needs a mask token, but the model config has "
                     "mask_token_id=None")
  if threshold is _DEFAULT:
    threshold = 0.0 if mode == "spec" else 0.9
  if mode != "diffusion":  # AR ignores it; spec: None means 0 (fill the draft in one forward)
    threshold = 0.0 if threshold is None else threshold
    if threshold < 0:
      raise ValueError(f"threshold={threshold}: must be >= 0 in {mode} mode")
  has_lora = getattr(model, "lora", None) is not None
  if draft_lora and not has_lora and mode == "spec":
    raise ValueError("draft_lora=True but the model has no LoRA (build it with lora=LoRAConfig or "
                     "pass draft_lora=False)")
  if eos_token_ids is None:
    eos_token_ids = cfg.eos_token_ids or ()
  elif isinstance(eos_token_ids, int):
    eos_token_ids = (eos_token_ids,)
  thinking = max_thinking_tokens is not None and end_think_token_id is not None
  if thinking and max_thinking_tokens < 0:
    raise ValueError(f"max_thinking_tokens={max_thinking_tokens}: must be >= 0")
  if len(eos_token_ids) > MAX_EOS:
    raise ValueError(f"eos_token_ids: at most {MAX_EOS} ids, got {len(eos_token_ids)}")
  settings = Settings(
      mode=mode, max_new_tokens=max_new_tokens,
      block_length=1 if mode == "ar" else block_length,  # AR has no blocks: keep one program
      greedy=temperature == 0,
      mask_id=-1 if cfg.mask_token_id is None else int(cfg.mask_token_id),
      draft_lora=mode == "spec" and (has_lora if draft_lora is None else bool(draft_lora)),
      causal_context=mode != "diffusion" or bool(causal_context))
  eos = np.full((MAX_EOS,), -1, np.int32)
  eos[:len(eos_token_ids)] = eos_token_ids
  use_threshold = (threshold is not None) if mode == "diffusion" else threshold > 0
  knobs = dict(threshold=np.float32(0.0 if threshold is None else threshold),
               use_threshold=np.bool_(use_threshold),
               temperature=np.float32(temperature if temperature > 0 else 1.0),
               seed=np.uint32(seed), eos_ids=eos,
               think_budget=np.int32(max_thinking_tokens if thinking else NO_BUDGET),
               end_think_id=np.int32(end_think_token_id if thinking else -1))
  return settings, tuple(int(e) for e in eos_token_ids), knobs


def _place(cfg, mesh, tokens, lengths, knobs):
  """Puts the prompt arrays on the mesh (batch over "data"); returns the cache sharding too."""
  if mesh is None:
    return None, jnp.asarray(tokens), jnp.asarray(lengths), jax.tree.map(jnp.asarray, knobs)
  from dllm_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.validate_mesh(cfg, mesh, batch=tokens.shape[0])
  rules = sharding.mesh_rules(cfg, mesh)
  replicated = sharding.logical_sharding(mesh, ())
  cache = sharding.cache_shardings(mesh, cfg)
  return ((cache.k, cache.v, cache.lengths),
          sharding.put(tokens, sharding.logical_sharding(mesh, ("batch", None), rules)),
          sharding.put(lengths, sharding.logical_sharding(mesh, ("batch",), rules)),
          jax.tree.map(lambda k: sharding.put(k, replicated), knobs))


# Names of the layer layouts for configs and flags -> generate's `unroll_layers`.
LAYER_LAYOUTS = {"auto": None, "scan": False, "unrolled": True}


def unroll_layers_by_default(mesh=None) -> bool:
  """The engine's layer layout when not asked: per-layer weight buffers on CPU without a mesh,
  where XLA would otherwise copy every layer's weights out of the stack on each forward
  (`dllm_jax.model.unstack_layers`); the scanned stack everywhere else."""
  return mesh is None and jax.default_backend() == "cpu"


# --- compiled programs ----------------------------------------------------------------------------

def _ctx(graphdef, settings, params, knobs) -> Ctx:
  k = dict(knobs)
  state, layer_states = params
  return Ctx(graphdef, state, settings, seed_key=jax.random.PRNGKey(k.pop("seed")),
             layer_states=layer_states, **k)


def _prefill(graphdef, cache_len, cache_sharding, bidirectional, params, tokens, lengths):
  state, layer_states = params
  return prefill(graphdef, state, tokens, lengths, cache_len, cache_sharding, bidirectional,
                 layer_states)


def _decode(graphdef, settings, params, last_logits, cache, knobs):
  ctx = _ctx(graphdef, settings, params, knobs)
  m = MODES[settings.mode]
  return jax.lax.while_loop(lambda c: m.running(ctx, c), lambda c: m.step(ctx, c),
                            m.init(ctx, last_logits, cache))


def _init(graphdef, settings, params, last_logits, cache, knobs):
  ctx = _ctx(graphdef, settings, params, knobs)
  m = MODES[settings.mode]
  carry = m.init(ctx, last_logits, cache)
  return carry, m.running(ctx, carry)


def _step(graphdef, settings, params, carry, knobs):
  ctx = _ctx(graphdef, settings, params, knobs)
  m = MODES[settings.mode]
  carry = m.step(ctx, carry)
  return carry, m.running(ctx, carry)


_PROGRAMS = {  # name -> (function, static_argnums, donate_argnums); the cache is always donated
    "prefill": (_prefill, (0, 1, 2, 3), ()),
    "decode": (_decode, (0, 1), (4,)),
    "init": (_init, (0, 1), (4,)),
    "step": (_step, (0, 1), (3,)),
}
_JITTED = {name: jax.jit(fn, static_argnums=static, donate_argnums=donate)
           for name, (fn, static, donate) in _PROGRAMS.items()}
_COMPILED: dict[tuple, Any] = {}


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


class _Runner:
  """Compiles each program once per (settings, shapes, shardings) and times the compilations."""

  def __init__(self, graphdef, settings: Settings, cache_len: int, cache_sharding, mesh):
    self.mesh, self.cache_sharding = mesh, cache_sharding
    self.statics = {"prefill": (graphdef, cache_len, cache_sharding, not settings.causal_context),
                    "decode": (graphdef, settings), "init": (graphdef, settings),
                    "step": (graphdef, settings)}
    self._pending = 0.0
    self.compile_seconds_total = 0.0

  def call(self, name: str, *args):
    jitted = _JITTED[name]
    statics = self.statics[name]
    key = (name, statics, _signature(args))
    exe = _COMPILED.get(key)
    if exe is None:
      start = time.perf_counter()
      # Under the mesh context, attention kernels run in shard_map on local shards only.
      with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
        if self.mesh is not None:
          jitted = self._sharded_jit(name, statics, args)
        exe = jitted.lower(*statics, *args).compile()
      spent = time.perf_counter() - start
      self._pending += spent
      self.compile_seconds_total += spent
      _COMPILED[key] = exe
    return exe(*args)

  def _sharded_jit(self, name: str, statics: tuple, args: tuple):
    """The program jitted with explicit shardings: inputs as placed; outputs: the cache on its
    cache sharding, per-row arrays (leading batch axis) over "data", scalars replicated."""
    fn, static, donate = _PROGRAMS[name]
    out = jax.eval_shape(functools.partial(fn, *statics), *args)
    batch = self.cache_sharding[2]  # the lengths' sharding: [batch] over "data"

    def out_sharding(x):
      if isinstance(x, KVCache):
        return KVCache(*self.cache_sharding)
      if x.ndim == 0:
        return NamedSharding(self.mesh, PartitionSpec())
      return NamedSharding(self.mesh, PartitionSpec(*batch.spec, *([None] * (x.ndim - 1))))

    return jax.jit(fn, static_argnums=static, donate_argnums=donate,
                   in_shardings=jax.tree.map(lambda x: x.sharding, args),
                   out_shardings=jax.tree.map(out_sharding, out,
                                              is_leaf=lambda x: isinstance(x, KVCache)))

  def take_compile_seconds(self) -> float:
    spent, self._pending = self._pending, 0.0
    return spent


# --- streaming and results ------------------------------------------------------------------------

def _stream(runner, params, last_logits, cache, knobs, eos_ids, on_tokens):
  """Python loop over the jitted step; reports each row's newly committed ids after every step."""
  carry, running = runner.call("init", params, last_logits, cache, knobs)
  sent = np.zeros(last_logits.shape[0], np.int64)
  while True:
    # A finished row's count stops moving, so nothing past its EOS is ever sent.
    out, count = gather(carry["out"]), gather(carry["count"])
    for b in range(out.shape[0]):
      new = _cut_at_eos(out[b, sent[b]:count[b]].tolist(), eos_ids)
      if new:
        on_tokens(b, new)
      sent[b] = count[b]
    if not bool(gather(running)):
      return carry
    carry, running = runner.call("step", params, carry, knobs)


def _cut_at_eos(ids: list[int], eos_ids: tuple[int, ...]) -> list[int]:
  for i, t in enumerate(ids):
    if t in eos_ids:
      return ids[:i + 1]
  return ids


def _result(carry, settings: Settings, eos_ids: tuple[int, ...], batch: int,
            prefill_seconds: float, decode_seconds: float, compile_seconds: float
            ) -> GenerateResult:
  out, count, nfe = (gather(carry[k]) for k in ("out", "count", "nfe"))
  tokens = [_cut_at_eos(out[b, :count[b]].tolist(), eos_ids) for b in range(batch)]
  prefill_nfe = 1 if settings.mode == "spec" else 0
  nfe_list = [int(n) for n in nfe]
  decode_nfe = [n - prefill_nfe for n in nfe_list]
  accepted = None
  if settings.mode == "spec":
    acc = gather(carry["accepted"])
    accepted = [[int(a) for a in row if a > 0] for row in acc]
  return GenerateResult(
      tokens=tokens, nfe=nfe_list, decode_nfe=decode_nfe,
      tokens_per_forward=[len(t) / n if n else 0.0 for t, n in zip(tokens, nfe_list)],
      decode_tokens_per_forward=[len(t) / n if n else 0.0 for t, n in zip(tokens, decode_nfe)],
      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
      compile_seconds=compile_seconds, accepted_lengths=accepted)
