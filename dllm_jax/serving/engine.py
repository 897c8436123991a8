"""Continuous batching over a fixed set of slots: requests of all four decoding modes in flight at
once, each decoded exactly as `generate(model, [prompt], settings)` would decode it alone.

    engine = Engine(model, EngineConfig(slots=8))
    engine.start()                                    # compiles every program, starts the loop
    request = engine.submit(prompt_ids, Spec(max_new_tokens=64))
    request.wait(); request.tokens, request.finish_reason, request.nfe
    engine.stop()

Layout (docs/serving.md): one preallocated KV cache of `slots` rows; a slot holds one request. A
request's decoding "group" is what shapes its programs: (mode, block length, greedy or sampled;
quadratic self-speculation is greedy only).
Each group keeps a carry for every slot (the mode's batch-1 carry with a leading slot axis) in which
slots that are not its own are marked done, so they stay untouched. By default each live slot runs
the mode's batch-1 `step` with its own knobs (seed, threshold, temperature, EOS ids), so a slot's
sampling events, row index, event counter and float rounding are exactly those of a batch-1
`generate`: its output depends neither on its slot nor on its neighbours. `batched=True` runs the
step under `jax.vmap` over all slots at once instead (more throughput; batched matrix products
round differently, so near-ties may resolve otherwise; docs/serving.md).

The loop thread alternates: admit queued requests into free slots (one prefill program per prompt
bucket, then the group's init program), then one step of every group that has live slots. Finished,
stopped and cancelled requests free their slot at the end of that round. Every program is compiled
in `start()` for fixed shapes and called as a compiled executable afterwards, so nothing compiles
while serving (a wrong shape raises instead of recompiling).

The module is over 600 lines because the engine is one piece of shared state (slots, queue, cache,
compiled programs, the loop thread): split across files, each part would reach into the others.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dllm_jax.decode import engine as decode  # the engine behind generate: its modes and helpers
from dllm_jax.decode.common import MIN_BUCKET, Settings, bucket_length, cache_length
from dllm_jax.decode.settings import AR, DecodeSettings, Diffusion, Quadratic, Spec
from dllm_jax.kv_cache import KVCache
from dllm_jax.sharding import gather

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


class QueueFull(Exception):
  """The bounded queue holds `queue_size` waiting requests already."""


class PromptTooLong(ValueError):
  """The prompt does not fit the slots' cache."""


class EngineStopped(Exception):
  """The engine is stopping or stopped: no new requests."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """What the engine preallocates and compiles at start-up.

  slots: requests decoded at once (rows of the KV cache).
  max_prompt_tokens: longest prompt accepted; prompts are prefilled in power-of-two buckets from
    16 up to the bucket of this length (one prefill program each).
  max_new_tokens: the most ids one request may ask for.
  modes: decoding modes served; diffusion needs a mask token.
  block_lengths: diffusion / speculative block lengths served (None: the checkpoint's block_size).
  sampling: compile the sampled (temperature > 0) programs as well as the greedy ones (quadratic
    self-speculation is greedy only: it has no sampled programs).
  batched: False (default) steps each live slot with the batch-1 program: every request's ids are
    exactly those of `generate(model, [prompt], settings)`. True steps all slots of a group in one
    vmapped program: one forward per round for the whole group (throughput), same sampling events,
    but the arithmetic of a batch, whose rounding can flip a near-tie (docs/serving.md).
  queue_size: requests waiting for a slot at most; beyond it `submit` raises QueueFull.
  spec_mask_token_id: the id speculative drafts (spec and quadratic) start from (None: the
    checkpoint's mask token).
  """
  slots: int = 4
  max_prompt_tokens: int = 256
  max_new_tokens: int = 256
  modes: tuple[str, ...] = ("ar", "diffusion", "spec", "quadratic")
  block_lengths: tuple[int, ...] | None = None
  sampling: bool = True
  batched: bool = False
  queue_size: int = 64
  spec_mask_token_id: int | None = None

  def __post_init__(self):
    for name in ("slots", "max_prompt_tokens", "max_new_tokens", "queue_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    unknown = [m for m in self.modes if m not in decode.MODES]
    if unknown or not self.modes:
      raise ValueError(f"modes={self.modes!r}: expected a non-empty subset of "
                       f"{', '.join(decode.MODES)}")
    if self.block_lengths is not None:
      for b in self.block_lengths:
        if isinstance(b, bool) or not isinstance(b, int) or b < 2:
          raise ValueError(f"block_lengths={self.block_lengths!r}: expected integers >= 2")


@dataclasses.dataclass(frozen=True)
class Group:
  """What shapes a request's programs."""
  mode: str
  block_length: int  # 1 for AR
  greedy: bool

  def __str__(self):
    if self.mode == "ar":
      return "ar"
    return f"{self.mode}(block {self.block_length}, {'greedy' if self.greedy else 'sampled'})"


class Request:
  """One request's state, updated by the engine thread.

  tokens: ids generated so far, cut after the first EOS (and at `max_tokens`).
  finish_reason: None while running; "stop" (EOS or stop id), "length", "cancelled" or "error".
  nfe: forwards counted as `generate` counts them. listener: called from the engine thread after
  every change (new ids or the finish); it must not block.
  """

  def __init__(self, request_id: int, prompt: list[int], settings: DecodeSettings, group: Group,
               knobs: dict[str, np.ndarray], max_tokens: int,
               listener: Callable[[Request], None] | None):
    self.id, self.prompt, self.settings, self.group = request_id, prompt, settings, group
    self.knobs, self.max_tokens, self.listener = knobs, max_tokens, listener
    self.tokens: list[int] = []
    self.nfe = 0
    self.finish_reason: str | None = None
    self.error: str | None = None
    self.submitted = time.perf_counter()
    self.first_token_at: float | None = None
    self.finished_at: float | None = None
    self.slot: int | None = None
    self._cancelled = False
    self._done = threading.Event()

  @property
  def finished(self) -> bool:
    return self._done.is_set()

  @property
  def tokens_per_forward(self) -> float:
    return len(self.tokens) / self.nfe if self.nfe else 0.0

  def cancel(self) -> None:
    """Stops the request; its slot is freed at the end of the current round."""
    self._cancelled = True

  @property
  def cancelled(self) -> bool:
    return self._cancelled

  def wait(self, timeout: float | None = None) -> bool:
    return self._done.wait(timeout)

  def _notify(self) -> None:
    if self.listener is not None:
      try:
        self.listener(self)
      except Exception:  # pylint: disable=broad-except
        log.exception("request %d: listener failed", self.id)

  def _finish(self, reason: str, error: str | None = None) -> None:
    if self.finished:
      return
    self.finish_reason, self.error = reason, error
    self.finished_at = time.perf_counter()
    self._done.set()
    self._notify()


# --- the programs ----------------------------------------------------------------------------------

def _flat_params(fn, params_def):
  """`fn` taking its parameters, its first argument, as the flat list of their arrays: the loop
  thread calls a program for every step of every slot, and flattening an nnx State runs Python for
  each variable (0.7 ms per call for SmolLM2's 272 arrays on a quiet 2-core CPU,
  docs/benchmarks.md), on the cores the step runs on."""
  def call(param_leaves, *args):
    return fn(jax.tree.unflatten(params_def, param_leaves), *args)
  return call


def _slot_cache(k, v, length) -> KVCache:
  """One slot's view of the shared cache as a batch-1 cache (a reshape, not a copy)."""
  return KVCache(tuple(x[None] for x in k), tuple(x[None] for x in v), length[None])


def _prefill(graphdef, params, cache: KVCache, slot, tokens, length):
  """Causal prefill of one prompt [1, bucket] into row `slot` of the shared cache; returns the
  logits at its last token [1, V] and the cache. As `decode.common.prefill`, on the slot's row."""
  model = nnx.merge(graphdef, params)
  take = lambda buf: jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=0)
  row = KVCache(tuple(map(take, cache.k)), tuple(map(take, cache.v)), jnp.zeros((1,), jnp.int32))
  logits, row = model(tokens, pattern="causal", cache=row, n_new=length,
                      logits_at=(length - 1)[:, None])
  put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, slot, axis=0)
  cache = KVCache(tuple(map(put, cache.k, row.k)), tuple(map(put, cache.v, row.v)),
                  cache.lengths.at[slot].set(row.lengths[0]))
  return logits[:, 0], cache


def _init(graphdef, settings: Settings, params, cache: KVCache, carry, slot, last_logits, knobs):
  """The mode's batch-1 init for the request admitted to `slot`, written into the group carry.
  Quadratic self-speculation drafts its first block against the slot's prompt cache (read only:
  the cache that forward returns is dropped)."""
  row = lambda buf: jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=0)
  prompt = KVCache(tuple(map(row, cache.k)), tuple(map(row, cache.v)),
                   jax.lax.dynamic_slice_in_dim(cache.lengths, slot, 1))
  new = decode.MODES[settings.mode].init(decode._ctx(graphdef, settings, params, knobs),  # pylint: disable=protected-access
                                         last_logits, prompt)
  del new["cache"]
  return jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one), carry, new)


def _step_slot(graphdef, settings: Settings, params, cache: KVCache, carry, knobs, slot):
  """One step of the mode for the request in `slot`: exactly the batch-1 `generate` step (the same
  shapes, hence the same arithmetic), on the slot's cache row and carry."""
  take = lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)
  row = lambda buf: jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=0)
  c = jax.tree.map(take, carry)
  c["cache"] = KVCache(tuple(map(row, cache.k)), tuple(map(row, cache.v)),
                       jax.lax.dynamic_slice_in_dim(cache.lengths, slot, 1))
  c = decode.MODES[settings.mode].step(
      decode._ctx(graphdef, settings, params, jax.tree.map(take, knobs)), c)  # pylint: disable=protected-access
  new = c.pop("cache")
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x, slot, axis=0)
  cache = KVCache(tuple(map(put, cache.k, new.k)), tuple(map(put, cache.v, new.v)),
                  put(cache.lengths, new.lengths))
  return cache, jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one), carry, c)


def _step_batched(graphdef, settings: Settings, params, cache: KVCache, carry, knobs, live):
  """One step of the mode for every slot at once, each slot a vmapped batch-1 step with its own
  knobs (the same sampling events and row index as alone; the arithmetic of a batch).
  Slots not `live` (other groups, free, finished, cancelled) are marked done first: a done row
  does not change its carry, and whatever it writes into the cache lies past its length."""
  mode = decode.MODES[settings.mode]
  carry = dict(carry, done=carry["done"] | ~live[:, None])

  def one(c, k, v, length, kn):
    c = mode.step(decode._ctx(graphdef, settings, params, kn),  # pylint: disable=protected-access
                  dict(c, cache=_slot_cache(k, v, length)))
    row = c.pop("cache")
    return c, tuple(x[0] for x in row.k), tuple(x[0] for x in row.v), row.lengths[0]

  carry, k, v, lengths = jax.vmap(one)(carry, cache.k, cache.v, cache.lengths, knobs)
  return KVCache(k, v, lengths), carry


_DRAFTING = ("spec", "quadratic")  # the modes whose drafts start from `spec_mask_token_id`


class Engine:
  """Slots, queue and loop thread over one model (module docstring)."""

  def __init__(self, model: nnx.Module, config: EngineConfig = EngineConfig(), *,
               mesh: jax.sharding.Mesh | None = None):
    self.model, self.config, self.mesh = model, config, mesh
    cfg = model.cfg
    self.cfg = cfg
    has_lora = getattr(model, "lora", None) is not None
    modes = tuple(config.modes)
    if "diffusion" in modes and cfg.mask_token_id is None:
      raise ValueError("modes: diffusion needs a mask token, but the model config has "
                       "mask_token_id=None")
    spec_mask = cfg.mask_token_id if config.spec_mask_token_id is None else config.spec_mask_token_id
    for mode in ("spec", "quadratic"):
      if mode in modes and spec_mask is None:
        raise ValueError(f"modes: {mode} needs a mask id to draft from (set spec_mask_token_id)")
    self.spec_mask_token_id = spec_mask
    blocks = tuple(config.block_lengths or (cfg.block_size,))
    self.block_lengths = blocks
    self.groups: list[Group] = []
    for mode in modes:
      for block in ((1,) if mode == "ar" else blocks):
        for greedy in ((True, False) if config.sampling and mode != "quadratic" else (True,)):
          self.groups.append(Group(mode, block, greedy))
    self.max_bucket = bucket_length(config.max_prompt_tokens)
    self.buckets = [b for b in itertools.takewhile(
        lambda b: b <= self.max_bucket, (MIN_BUCKET << i for i in range(64)))]
    max_block = max(blocks) if set(modes) - {"ar"} else 1
    self.cache_len = cache_length(self.max_bucket, config.max_new_tokens, max_block)
    self.statics: dict[Group, Settings] = {}
    for g in self.groups:
      # Diffusion decodes whole blocks: the program's budget is rounded up to one; a request's own
      # max_tokens is enforced by the engine, which leaves a request's ids unchanged.
      budget = -(-config.max_new_tokens // g.block_length) * g.block_length
      self.statics[g] = Settings(
          mode=g.mode, max_new_tokens=budget, block_length=g.block_length, greedy=g.greedy,
          mask_id=(-1 if g.mode == "ar" else int(spec_mask if g.mode in _DRAFTING
                                                 else cfg.mask_token_id)),
          draft_lora=g.mode == "spec" and has_lora, causal_context=True)
    self._graphdef, self._params = nnx.split(model)
    self._param_leaves, self._params_def = jax.tree.flatten(self._params)
    self._programs: dict[tuple, Any] = {}
    self._cache_sharding = None
    self._queue: collections.deque[Request] = collections.deque()
    self._slots: list[Request | None] = [None] * config.slots
    self._cv = threading.Condition()
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._accepting = False
    self._stopping = False
    self.compile_seconds = 0.0

  # --- placement ----------------------------------------------------------------------------------

  def _slot_sharding(self, ndim: int):
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, PartitionSpec(*self._cache_sharding.lengths.spec,
                                                  *([None] * (ndim - 1))))

  def _replicated(self):
    return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  def _put(self, x, sharding):
    if sharding is None:
      return jnp.asarray(x)
    from dllm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    return sharding_lib.put(x, sharding)

  # --- start-up -----------------------------------------------------------------------------------

  def start(self, progress: bool = False) -> None:
    """Allocates the cache and carries, compiles every program, starts the loop thread."""
    cfg, slots = self.cfg, self.config.slots
    if self.mesh is not None:
      from dllm_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
      sharding_lib.validate_mesh(cfg, self.mesh, batch=slots)
      self._cache_sharding = sharding_lib.cache_shardings(self.mesh, cfg)
    self._cache = self._fresh_cache()
    _, _, template = decode._prepare(self.model, [[0]], AR(max_new_tokens=1))  # pylint: disable=protected-access
    self._knobs = {k: np.zeros((slots, *np.shape(v)), np.asarray(v).dtype)
                   for k, v in template.items()}
    logits_spec = jax.ShapeDtypeStruct((1, cfg.vocab_size), self.model.dtype)
    self._carries, self._carry_shapes = {}, {}
    jobs = [("prefill", b) for b in self.buckets] + [(kind, g) for g in self.groups
                                                      for kind in ("init", "step")]
    bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=len(jobs), desc="compiling", unit="program", leave=False)
    start = time.perf_counter()
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      for g in self.groups:
        st = self.statics[g]
        one = jax.eval_shape(
            lambda lg, kn, st=st: decode.MODES[st.mode].init(
                decode._ctx(self._graphdef, st, self._params, kn), lg, None),  # pylint: disable=protected-access
            logits_spec, template)
        del one["cache"]
        self._carry_shapes[g] = {name: (x.shape, x.dtype) for name, x in one.items()}
        self._carries[g] = self._fresh_carry(g)
      # Lowering traces Python, one program at a time; XLA compiles them side by side (it releases
      # the GIL), which divides start-up time by up to the number of cores.
      with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pending = {pool.submit(self._lower(kind, what, logits_spec).compile): (kind, what)
                   for kind, what in jobs}
        for future in concurrent.futures.as_completed(pending):
          self._programs[pending[future]] = future.result()
          if bar is not None:
            bar.update(1)
    if bar is not None:
      bar.close()
    self.compile_seconds = time.perf_counter() - start
    self._accepting = True
    self._thread = threading.Thread(target=self._loop, name="dllm-engine", daemon=True)
    self._thread.start()

  def _lower(self, kind: str, what, logits_spec) -> jax.stages.Lowered:
    slots = self.config.slots
    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                          sharding=getattr(x, "sharding", None))
    host = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated())
    cache = jax.tree.map(spec, self._cache)
    slot = host((), np.int32)
    if kind == "prefill":
      fn = functools.partial(_prefill, self._graphdef)
      args = (self._param_leaves, cache, slot, host((1, what), np.int32), host((1,), np.int32))
      donate, outs = (1,), (self._replicated(), self._cache_sharding)
    elif kind == "init":
      fn = functools.partial(_init, self._graphdef, self.statics[what])
      carry = jax.tree.map(spec, self._carries[what])
      knobs = {k: host(v.shape[1:], v.dtype) for k, v in self._knobs.items()}
      args = (self._param_leaves, cache, carry, slot,
              host(logits_spec.shape, logits_spec.dtype), knobs)
      donate = (2,)
      outs = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, carry)
    else:
      step = _step_batched if self.config.batched else _step_slot
      fn = functools.partial(step, self._graphdef, self.statics[what])
      carry = jax.tree.map(spec, self._carries[what])
      knobs = {k: host(v.shape, v.dtype) for k, v in self._knobs.items()}
      which = host((slots,), np.bool_) if self.config.batched else slot
      args = (self._param_leaves, cache, carry, knobs, which)
      donate = (1, 2)
      outs = None if self.mesh is None else (self._cache_sharding,
                                              jax.tree.map(lambda x: x.sharding, carry))
    kw = {} if self.mesh is None else dict(out_shardings=outs)
    return jax.jit(_flat_params(fn, self._params_def), donate_argnums=donate,
                   **kw).lower(*args)

  # --- requests -----------------------------------------------------------------------------------

  def group_of(self, settings: Settings) -> Group:
    block = 1 if settings.mode == "ar" else settings.block_length
    group = Group(settings.mode, block, settings.greedy)
    if group not in self.statics:
      if settings.mode not in self.config.modes:
        raise ValueError(f"mode={settings.mode!r} is not served (served: "
                         f"{', '.join(self.config.modes)})")
      if block not in self.block_lengths:
        raise ValueError(f"block_length={block} is not served (served: "
                         f"{', '.join(map(str, self.block_lengths))})")
      raise ValueError("temperature: only greedy decoding (temperature=0) is served")
    if settings.mode in _DRAFTING and settings.mask_id != self.statics[group].mask_id:
      raise ValueError(f"mask_token_id={settings.mask_id}: this server drafts from "
                       f"{self.statics[group].mask_id}")
    if settings.draft_lora != self.statics[group].draft_lora:
      raise ValueError(f"draft_lora={settings.draft_lora}: this server drafts "
                       f"{'with' if self.statics[group].draft_lora else 'without'} the LoRA")
    return group

  def submit(self, prompt: Sequence[int], settings: DecodeSettings, *,
             max_tokens: int | None = None,
             listener: Callable[[Request], None] | None = None) -> Request:
    """Queues a request. Raises ValueError (bad settings, one line naming the field),
    PromptTooLong, QueueFull or EngineStopped.

    max_tokens: stop after this many ids (default: settings.max_new_tokens); lets a diffusion
      request ask for a count that is not a whole number of blocks.
    """
    prompt = [int(t) for t in prompt]
    if len(prompt) > self.config.max_prompt_tokens:
      raise PromptTooLong(f"prompt has {len(prompt)} tokens; this server takes at most "
                          f"{self.config.max_prompt_tokens}")
    if isinstance(settings, Diffusion) and not settings.causal_context:
      raise ValueError("causal_context=False is not served")
    if isinstance(settings, (Spec, Quadratic)) and settings.mask_token_id is None and \
        self.spec_mask_token_id is not None:
      settings = dataclasses.replace(settings, mask_token_id=self.spec_mask_token_id)
    resolved, static, knobs = decode._prepare(self.model, [prompt], settings)  # pylint: disable=protected-access
    group = self.group_of(static)
    if settings.max_new_tokens > self.statics[group].max_new_tokens:
      raise ValueError(f"max_new_tokens={settings.max_new_tokens}: this server generates at most "
                       f"{self.config.max_new_tokens}")
    limit = resolved.max_new_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= limit <= resolved.max_new_tokens:
      raise ValueError(f"max_tokens={limit}: expected an integer in [1, "
                       f"{resolved.max_new_tokens}]")
    with self._cv:
      if not self._accepting:
        raise EngineStopped("the server is shutting down")
      if len(self._queue) >= self.config.queue_size:
        raise QueueFull(f"the queue is full ({self.config.queue_size} requests waiting)")
      request = Request(next(self._ids), prompt, resolved, group, knobs, limit, listener)
      self._queue.append(request)
      self._cv.notify()
    return request

  def stats(self) -> dict[str, int]:
    with self._cv:
      return dict(slots=self.config.slots, busy=sum(r is not None for r in self._slots),
                  queued=len(self._queue))

  def stop(self, *, cancel: bool = False, timeout: float | None = None) -> None:
    """Stops accepting; finishes what is queued and in flight (or cancels it), ends the loop."""
    with self._cv:
      self._accepting = False
      if cancel:
        for r in list(self._queue) + [r for r in self._slots if r is not None]:
          r.cancel()
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  # --- the loop -----------------------------------------------------------------------------------

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._queue and not any(self._slots) and not self._stopping:
          self._cv.wait()
        if self._stopping and not self._queue and not any(self._slots):
          return
      try:
        self._admit()
        self._round()
      except Exception as e:  # pylint: disable=broad-except
        # A failure inside a program leaves the donated buffers unusable: fail what is in flight
        # and start over with fresh buffers, so the engine keeps serving.
        log.exception("engine round failed")
        for s, r in enumerate(self._slots):
          if r is not None:
            r._finish(FINISH_ERROR, f"{type(e).__name__}: {e}")  # pylint: disable=protected-access
            self._slots[s] = None
        self._reset_buffers()

  def _fresh_cache(self) -> KVCache:
    init = functools.partial(KVCache.init, self.cfg, self.config.slots, self.cache_len,
                             self.model.dtype)
    if self.mesh is None:
      return init()
    return jax.jit(init, out_shardings=self._cache_sharding)()

  def _fresh_carry(self, g: Group) -> dict[str, jax.Array]:
    """Every slot done: a group's carry before any of its requests arrives."""
    carry = {}
    for name, (shape, dtype) in self._carry_shapes[g].items():
      value = np.full((self.config.slots, *shape), name == "done", dtype)
      carry[name] = self._put(value, self._slot_sharding(value.ndim))
    return carry

  def _reset_buffers(self) -> None:
    self._cache = self._fresh_cache()
    self._carries = {g: self._fresh_carry(g) for g in self._carries}

  def _admit(self) -> None:
    while True:
      with self._cv:
        free = [s for s, r in enumerate(self._slots) if r is None]
        if not free or not self._queue:
          return
        request = self._queue.popleft()
      if request.cancelled:
        request._finish(FINISH_CANCELLED)  # pylint: disable=protected-access
        continue
      slot = free[0]
      with self._cv:
        self._slots[slot] = request
      request.slot = slot
      self._prefill_into(slot, request)

  def _prefill_into(self, slot: int, request: Request) -> None:
    bucket = bucket_length(len(request.prompt))
    tokens = np.full((1, bucket), self.cfg.pad_token_id or 0, np.int32)
    tokens[0, :len(request.prompt)] = request.prompt
    length = np.array([len(request.prompt)], np.int32)
    slot_arr = np.int32(slot)
    logits, self._cache = self._programs[("prefill", bucket)](self._param_leaves, self._cache,
                                                               slot_arr, tokens, length)
    for k, v in request.knobs.items():
      self._knobs[k][slot] = v
    g = request.group
    self._carries[g] = self._programs[("init", g)](self._param_leaves, self._cache, self._carries[g],
                                                    slot_arr, logits, request.knobs)
    self._collect(g, [slot])

  def _round(self) -> None:
    """One step of every group with live slots, then what each slot committed."""
    for g in self.groups:
      with self._cv:
        owned = [s for s, r in enumerate(self._slots) if r is not None and r.group == g]
      if not owned:
        continue
      live = [s for s in owned if not self._slots[s].cancelled]
      step = self._programs[("step", g)]
      if self.config.batched and live:
        mask = np.zeros((self.config.slots,), np.bool_)
        mask[live] = True
        self._cache, self._carries[g] = step(self._param_leaves, self._cache, self._carries[g],
                                             self._knobs, mask)
      else:
        for s in live:
          self._cache, self._carries[g] = step(self._param_leaves, self._cache, self._carries[g],
                                               self._knobs, np.int32(s))
      self._collect(g, owned)

  def _collect(self, g: Group, slots: list[int]) -> None:
    """Reports newly committed ids of `slots` and frees the slots whose request ended."""
    carry = self._carries[g]
    out, count, nfe, done = (gather(carry[k]) for k in ("out", "count", "nfe", "done"))
    for s in slots:
      request = self._slots[s]
      if request is None:
        continue
      reason = None
      if request.cancelled:
        reason = FINISH_CANCELLED
      else:
        ids = out[s, 0, :count[s, 0]].tolist()
        eos = request.settings.eos_token_ids
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
        ids = ids[:min(cut or len(ids), request.max_tokens)]
        request.nfe = int(nfe[s, 0])
        grew = len(ids) > len(request.tokens)
        if grew:
          if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
          request.tokens = ids
        if cut is not None and len(ids) == cut:
          reason = FINISH_STOP
        elif len(ids) >= request.max_tokens or done[s, 0]:
          reason = FINISH_LENGTH
        elif grew:
          request._notify()  # pylint: disable=protected-access
      if reason is not None:
        with self._cv:
          self._slots[s] = None
        request._finish(reason)  # pylint: disable=protected-access
