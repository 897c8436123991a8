"""The decoding engine: `generate(model, prompts, settings)` compiles and runs the mode that the
settings pick (dllm_jax.decode.settings; the per-mode steps are dllm_jax.decode.ar,
block_diffusion, speculative and quadratic).

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

from dllm_jax.decode import ar, block_diffusion, quadratic, speculative
from dllm_jax.decode.common import (NO_BUDGET, Ctx, GenerateResult, Settings, bucket_length,
                                    cache_length, pad_prompts, prefill)
from dllm_jax.decode.settings import MAX_EOS, DecodeSettings, Diffusion, Quadratic, Spec
from dllm_jax.kv_cache import KVCache
from dllm_jax.sharding import gather

MODES = {"ar": ar, "diffusion": block_diffusion, "spec": speculative, "quadratic": quadratic}

__all__ = ["generate", "GenerateResult", "MODES", "bucket_length", "cache_length",
           "lower_programs"]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]],
             settings: DecodeSettings | None = None, *, mesh: jax.sharding.Mesh | None = None,
             on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerateResult:
  """Generates up to `settings.max_new_tokens` ids per prompt; `settings` (default `Diffusion()`)
  is an `AR`, `Diffusion`, `Spec` or `Quadratic` from dllm_jax.decode.settings and picks the
  mode.

  mesh: a ("data", "model") mesh from dllm_jax.sharding.make_mesh with the model already placed on
    it (sharding.shard_model): prompts and cache are split over "data", kv heads over "model".
  on_tokens: streaming callback (row, new ids), called as ids are committed.
  """
  settings, static, knobs = _prepare(model, prompts, settings)
  cfg = model.cfg
  bucket = bucket_length(max(len(p) for p in prompts))
  tokens, lengths = pad_prompts(prompts, bucket, cfg.pad_token_id or 0)
  graphdef, params = nnx.split(model)
  cache_sharding, tokens, lengths, knobs = _place(cfg, mesh, tokens, lengths, knobs)
  cache_len = cache_length(bucket, static.max_new_tokens, static.block_length)
  runner = _Runner(graphdef, static, cache_len, cache_sharding, mesh, jax.tree.structure(params))

  start = time.perf_counter()
  last_logits, cache = runner.call("prefill", params, tokens, lengths)
  jax.block_until_ready(last_logits)
  prefill_seconds = time.perf_counter() - start - runner.take_compile_seconds()

  start = time.perf_counter()
  eos_ids = settings.eos_token_ids
  if on_tokens is None:
    carry = runner.call("decode", params, last_logits, cache, knobs)
  else:
    carry = _stream(runner, params, last_logits, cache, knobs, eos_ids, on_tokens)
  jax.block_until_ready(carry["out"])
  decode_seconds = time.perf_counter() - start - runner.take_compile_seconds()
  return _result(carry, static, eos_ids, len(prompts), prefill_seconds, decode_seconds,
                 runner.compile_seconds_total)


def lower_programs(model: nnx.Module, batch: int, prompt_length: int,
                   settings: DecodeSettings | None = None) -> dict[str, jax.stages.Lowered]:
  """The engine's programs for `generate(model, <batch prompts of prompt_length ids>, settings)`,
  lowered and ready to `.compile()`: "prefill", "decode" (the whole loop) and the streaming "init"
  and "step". `model` may be abstract (`dllm_jax.model.abstract_model`): nothing is allocated, so
  compile time and memory of full-size programs can be measured on any host. No mesh.
  """
  _, static, knobs = _prepare(model, [[0] * prompt_length] * batch, settings)
  bucket = bucket_length(prompt_length)
  graphdef, params = nnx.split(model)
  cache_len = cache_length(bucket, static.max_new_tokens, static.block_length)
  statics = _Runner(graphdef, static, cache_len, None, None, jax.tree.structure(params)).statics
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  args = {"prefill": (params, jax.ShapeDtypeStruct((batch, bucket), jnp.int32),
                      jax.ShapeDtypeStruct((batch,), jnp.int32))}
  last_logits, cache = jax.eval_shape(functools.partial(_prefill, *statics["prefill"]),
                                      *args["prefill"])
  args["decode"] = args["init"] = (params, last_logits, cache, jax.tree.map(spec, knobs))
  carry, _, _ = jax.eval_shape(functools.partial(_init, *statics["init"]), *args["init"])
  args["step"] = (jax.tree.leaves(params), carry, args["init"][3])
  return {name: _JITTED[name].lower(*statics[name], *a) for name, a in args.items()}


# --- arguments ------------------------------------------------------------------------------------

def _prepare(model, prompts, settings: DecodeSettings | None
             ) -> tuple[DecodeSettings, Settings, dict[str, np.ndarray]]:
  """Checks prompts and settings against the model (one-line ValueErrors); returns the resolved
  settings, the static part that shapes the programs and the traced knobs."""
  cfg = model.cfg
  settings = Diffusion() if settings is None else settings
  if not isinstance(settings, DecodeSettings):
    raise ValueError(f"settings={settings!r}: expected AR(), Diffusion(), Spec() or Quadratic() "
                     "from dllm_jax.decode.settings")
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts: expected a non-empty sequence of token-id sequences")
  for b, p in enumerate(prompts):
    if not len(p):
      raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"prompts[{b}] holds ids outside [0, vocab_size={cfg.vocab_size})")
  s = settings.resolve(cfg, [len(p) for p in prompts])
  has_lora = getattr(model, "lora", None) is not None
  draft_lora = False
  if isinstance(s, Spec):
    if s.draft_lora and not has_lora:
      raise ValueError("draft_lora=True but the model has no LoRA (build it with lora=LoRAConfig "
                       "or set Spec(draft_lora=False))")
    draft_lora = has_lora if s.draft_lora is None else s.draft_lora
  mask_id = s.mask_token_id if isinstance(s, (Spec, Quadratic)) else cfg.mask_token_id
  static = Settings(
      mode=s.mode, max_new_tokens=s.max_new_tokens, block_length=s.block, greedy=s.temperature == 0,
      mask_id=-1 if mask_id is None else int(mask_id), draft_lora=draft_lora,
      causal_context=not isinstance(s, Diffusion) or s.causal_context)
  eos = np.full((MAX_EOS,), -1, np.int32)
  eos[:len(s.eos_token_ids)] = s.eos_token_ids
  threshold = getattr(s, "threshold", 0.0)
  mix = getattr(s, "ar_mix_weight", None)
  use_threshold = (not s.fixed_schedule) if isinstance(s, Diffusion) else threshold > 0
  knobs = dict(threshold=np.float32(threshold), use_threshold=np.bool_(use_threshold),
               temperature=np.float32(s.temperature if s.temperature > 0 else 1.0),
               seed=np.uint32(s.seed), eos_ids=eos,
               think_budget=np.int32(s.max_thinking_tokens if s.thinking_budget else NO_BUDGET),
               end_think_id=np.int32(s.end_think_token_id if s.thinking_budget else -1),
               ar_mix_weight=np.float32(1.0 if mix is None else mix))
  return s, static, knobs


def _place(cfg, mesh, tokens, lengths, knobs):
  """Puts the prompt arrays on the mesh (batch over "data"); returns the cache sharding too."""
  if mesh is None:
    return None, jnp.asarray(tokens), jnp.asarray(lengths), jax.tree.map(jnp.asarray, knobs)
  from dllm_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.validate_mesh(cfg, mesh, batch=tokens.shape[0])
  rules = sharding.mesh_rules(cfg, mesh)
  replicated = sharding.logical_sharding(mesh, ())
  return (sharding.cache_shardings(mesh, cfg),
          sharding.put(tokens, sharding.logical_sharding(mesh, ("batch", None), rules)),
          sharding.put(lengths, sharding.logical_sharding(mesh, ("batch",), rules)),
          jax.tree.map(lambda k: sharding.put(k, replicated), knobs))


# --- compiled programs ----------------------------------------------------------------------------

def _ctx(graphdef, settings, params, knobs) -> Ctx:
  k = dict(knobs)
  return Ctx(graphdef, params, settings, seed_key=jax.random.PRNGKey(k.pop("seed")), **k)


def _prefill(graphdef, cache_len, cache_sharding, bidirectional, params, tokens, lengths):
  return prefill(graphdef, params, tokens, lengths, cache_len, cache_sharding, bidirectional)


def _decode(graphdef, settings, params, last_logits, cache, knobs):
  ctx = _ctx(graphdef, settings, params, knobs)
  m = MODES[settings.mode]
  return jax.lax.while_loop(lambda c: m.running(ctx, c), lambda c: m.step(ctx, c),
                            m.init(ctx, last_logits, cache))


def _progress(carry) -> tuple[jax.Array, jax.Array]:
  """What the streaming host reads: ids so far and each row's count, as outputs of their own
  (copies), so they stay readable after the carry is donated to the next step."""
  return carry["out"], carry["count"]


def _init(graphdef, settings, params, last_logits, cache, knobs):
  ctx = _ctx(graphdef, settings, params, knobs)
  m = MODES[settings.mode]
  carry = m.init(ctx, last_logits, cache)
  return carry, m.running(ctx, carry), _progress(carry)


# Iterations of the decode loop per streamed step: an AR iteration is one token, and dispatching a
# step costs the host ~2 ms (~350 arrays) on the cores that run it, 7% of a SmolLM2 token on a
# 2-core CPU (docs/benchmarks.md); 4 tokens per step make that ~2%, and the text still arrives
# every ~130 ms at 30 tokens/s. A block of the other modes is already several forwards.
_STREAM_AR_TOKENS = 4


def _step(graphdef, settings, params_def, param_leaves, carry, knobs):
  """Up to `_STREAM_AR_TOKENS` iterations of the AR loop, one of the other modes, or none once
  the loop has stopped running: the streaming host queues the next step before it has read
  whether this one was the last.

  The parameters come as the flat list of their arrays (`params_def` rebuilds the tree): the host
  calls this once per step, and flattening an nnx State runs Python for every variable, host time
  taken from the cores the step runs on (a call took 5.4 ms with SmolLM2's State and 2.3 ms with
  the list on a 2-core CPU, docs/benchmarks.md).
  """
  ctx = _ctx(graphdef, settings, jax.tree.unflatten(params_def, param_leaves), knobs)
  m = MODES[settings.mode]
  trips = _STREAM_AR_TOKENS if settings.mode == "ar" else 1
  # A while_loop (not lax.cond): the cache is updated in place, as in "decode".
  carry, _ = jax.lax.while_loop(lambda c: (c[1] < trips) & m.running(ctx, c[0]),
                                lambda c: (m.step(ctx, c[0]), c[1] + 1),
                                (carry, jnp.int32(0)))
  return carry, m.running(ctx, carry), _progress(carry)


_PROGRAMS = {  # name -> (function, static_argnums, donate_argnums); the cache is always donated
    "prefill": (_prefill, (0, 1, 2, 3), ()),
    "decode": (_decode, (0, 1), (4,)),
    "init": (_init, (0, 1), (4,)),
    "step": (_step, (0, 1, 2), (4,)),
}
_JITTED = {name: jax.jit(fn, static_argnums=static, donate_argnums=donate)
           for name, (fn, static, donate) in _PROGRAMS.items()}
_COMPILED: dict[tuple, Any] = {}


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


class _Runner:
  """Compiles each program once per (settings, shapes, shardings) and times the compilations."""

  def __init__(self, graphdef, settings: Settings, cache_len: int, cache_sharding, mesh,
               params_def):
    self.mesh, self.cache_sharding = mesh, cache_sharding
    self.statics = {"prefill": (graphdef, cache_len, cache_sharding, not settings.causal_context),
                    "decode": (graphdef, settings), "init": (graphdef, settings),
                    "step": (graphdef, settings, params_def)}
    self._pending = 0.0
    self.compile_seconds_total = 0.0

  def call(self, name: str, *args):
    return self.executable(name, *args)(*args)

  def executable(self, name: str, *args):
    """The program compiled for these arguments' shapes and shardings (compiled on first use)."""
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
    return exe

  def _sharded_jit(self, name: str, statics: tuple, args: tuple):
    """The program jitted with explicit shardings: inputs as placed; outputs: the cache on its
    cache sharding, per-row arrays (leading batch axis) over "data", scalars replicated."""
    fn, static, donate = _PROGRAMS[name]
    out = jax.eval_shape(functools.partial(fn, *statics), *args)
    batch = self.cache_sharding.lengths  # [batch] over "data"

    def out_sharding(x):
      if isinstance(x, KVCache):
        return self.cache_sharding
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
  """Python loop over the jitted step; reports each row's newly committed ids after every step.

  Step k + 1 is queued before the ids of step k are read, so the device never waits for the host
  (reading, the callback, dispatching); a step queued after the last one changes nothing. The
  executable is looked up once and the parameters are flattened once: both walk the whole
  parameter tree.
  """
  carry, running, progress = runner.call("init", params, last_logits, cache, knobs)
  leaves = jax.tree.leaves(params)
  step = runner.executable("step", leaves, carry, knobs)
  sent = np.zeros(last_logits.shape[0], np.int64)
  while True:
    carry, next_running, next_progress = step(leaves, carry, knobs)
    # A finished row's count stops moving, so nothing past its EOS is ever sent.
    out, count = (gather(x) for x in progress)
    for b in range(out.shape[0]):
      new = _cut_at_eos(out[b, sent[b]:count[b]].tolist(), eos_ids)
      if new:
        on_tokens(b, new)
      sent[b] = count[b]
    if not bool(gather(running)):
      return carry
    running, progress = next_running, next_progress


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
  prefill_nfe = 1 if settings.mode in ("spec", "quadratic") else 0
  nfe_list = [int(n) for n in nfe]
  decode_nfe = [n - prefill_nfe for n in nfe_list]
  accepted = None
  if settings.mode in ("spec", "quadratic"):
    acc = gather(carry["accepted"])
    accepted = [[int(a) for a in row if a > 0] for row in acc]
  return GenerateResult(
      tokens=tokens, nfe=nfe_list, decode_nfe=decode_nfe,
      tokens_per_forward=[len(t) / n if n else 0.0 for t, n in zip(tokens, nfe_list)],
      decode_tokens_per_forward=[len(t) / n if n else 0.0 for t, n in zip(tokens, decode_nfe)],
      prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
      compile_seconds=compile_seconds, accepted_lengths=accepted)
