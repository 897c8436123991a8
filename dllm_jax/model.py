"""The NLD decoder (Ministral-3 shaped) as Flax NNX modules.

The module tree mirrors the checkpoint: `encoder.{embed_tokens, layers, norm}` and `diffusion_head`,
with each layer's `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` kernels stored
[in, out] (the transpose of PyTorch's [out, in]); a projection named in `LoRAConfig.targets` also
holds its adapter factors `lora_a` / `lora_b`. Every layer is its own module with its own
buffers (`encoder.layers[i]`), read in place by the forward. Parameters carry logical axis names in
their `axes` metadata for dllm_jax.sharding.

One forward serves every decoding mode (docs/model.md §4); `pattern` picks the attention pattern,
decided once per forward (`attention_pattern`), and what happens to the cache:
  "causal"         with a cache: K/V appended at each row's length, causal attention over the
                   cache. Without: plain causal attention over the input.
  "bidirectional"  with a cache: the input block attends to the read-only cached prefix and
                   bidirectionally to itself; the cache is returned unchanged (unless `append`).
                   Without: full bidirectional attention.
  "quadratic"      a quadratic self-speculation round (docs/model.md §5.6): B sub-blocks
                   [d_i, MASK x B] under `attention.quadratic_mask` against the read-only cached
                   prefix, each token at its own position (cache length + i + m); only the K/V of
                   the B drafts d_i (causal K/V) are then written at the cache length.
  "block_diff"     training dual stream [noisy ; clean] (docs/model.md §4.4), no cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax import attention as attn_lib
from dllm_jax import quantize as quant_lib
from dllm_jax.config import ModelConfig
from dllm_jax.kv_cache import KVCache, write_layer

PATTERNS = ("causal", "bidirectional", "block_diff", "quadratic")


# Linear modules an adapter may target (PEFT `target_modules` names) -> the layer submodule
# holding them. The order is the canonical order of `LoRAConfig.targets`.
LORA_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters on the layer projections named by `targets` (PEFT module names).

  The NLD draft LoRA is o_proj only, rank 128, alpha 512. Targets are kept in the canonical
  `LORA_TARGETS` order, so configs compare equal whatever order they were listed in.
  """
  rank: int
  alpha: float
  targets: tuple[str, ...] = ("o_proj",)

  def __post_init__(self):
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
      culprit = f" ({unknown[0]!r} is unknown)" if unknown else ""
      raise ValueError(f"LoRA targets {list(targets)}: expected a non-empty subset of "
                       f"{list(LORA_TARGETS)}{culprit}")
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank={self.rank!r}: expected a positive int")
    object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


# --- RoPE (docs/model.md §3.5, §3.6) --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """fp32 inverse frequencies [head_dim/2] and the cos/sin attention factor, as HF computes them."""
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(cfg.rope_theta), exponents, dtype=np.float32)
  if cfg.rope_type == "default":
    return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
  factor = cfg.rope_factor
  n0 = cfg.original_max_position_embeddings
  if factor is None:
    factor = cfg.max_position_embeddings / n0

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = cfg.rope_attention_factor
  if attention_factor is None:
    if cfg.mscale and cfg.mscale_all_dim:
      attention_factor = get_mscale(factor, cfg.mscale) / get_mscale(factor, cfg.mscale_all_dim)
    else:
      attention_factor = get_mscale(factor)

  def correction_dim(rotations):
    return dim * math.log(n0 / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as HF: avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  extrapolation = np.float32(1.0) / pos_freqs
  interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  keep = np.float32(1.0) - ramp  # weight of the unscaled (high-frequency) band
  inv_freq = interpolation * (np.float32(1.0) - keep) + extrapolation * keep
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float, dtype):
  """cos/sin [B, T, head_dim] for integer positions [B, T]: fp32 angles, cast to `dtype`
  (docs/model.md §3.5)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)  # duplicated halves (rotate-half layout)
  return ((jnp.cos(angles) * attention_factor).astype(dtype),
          (jnp.sin(angles) * attention_factor).astype(dtype))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, N, D]; rotate-half convention: x*cos + [-x2, x1]*sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def llama4_query_scale(positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """s(p) = 1 + beta * ln(1 + floor(p / N0)) at absolute positions [B, T] (fp32)."""
  p = positions.astype(jnp.float32)
  n0 = jnp.float32(cfg.original_max_position_embeddings)
  return 1.0 + cfg.llama_4_scaling_beta * jnp.log(1.0 + jnp.floor(p / n0))


# --- modules ------------------------------------------------------------------------------------

def _normal(rngs, shape, dtype):
  return jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * 0.02


class Linear(nnx.Module):
  """y = x @ kernel, kernel [in, out]; no bias anywhere in NLD.

  With `quantize` ("int8" or "fp8"), `kernel` holds the quantized values and `kernel_scale` [out]
  their float32 per-output-channel scales (dllm_jax.quantize); the adapter stays float32.

  With `lora`, the module also holds a low-rank adapter (docs/model.md §2.3): fp32 `lora_a` [in, r]
  and `lora_b` [r, out], both nnx.LoRAParam. As PEFT initialises a fresh adapter, `lora_a` is
  kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), and `lora_b` is zero, so an
  untrained adapter changes nothing while both factors still get gradients. The factors' logical
  axes extend the kernel's, so they shard along with it.
  """

  def __init__(self, d_in, d_out, axes, *, dtype, param_dtype, rngs,
               lora: LoRAConfig | None = None):
    self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), param_dtype), axes=axes)
    self.dtype = dtype
    self.quantize = None
    self.lora_scale = lora.scale if lora else None
    if lora:
      bound = 1.0 / math.sqrt(d_in)
      self.lora_a = nnx.LoRAParam(
          jax.random.uniform(rngs.params(), (d_in, lora.rank), jnp.float32, -bound, bound),
          axes=(axes[0], "lora_rank"))
      self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, d_out), jnp.float32),
                                  axes=("lora_rank", axes[1]))

  def quantize_kernel(self, mode: str) -> None:
    """Replaces the kernel by its `mode` ("int8" or "fp8") values and adds their scales."""
    axes = self.kernel.get_metadata()["axes"]
    values, scale = quant_lib.quantize_kernel(self.kernel[...], mode)
    self.kernel = nnx.Param(values, axes=axes)
    # Named after the output axis, so the scale shards with the kernel's output dimension.
    self.kernel_scale = nnx.Param(scale, axes=(axes[1],))
    self.quantize = mode

  def __call__(self, x, lora: bool = False):
    """lora: add scale * (x @ a) @ b in fp32; a Linear without an adapter ignores it (the model's
    flag switches on every adapted projection at once)."""
    if self.quantize:
      y = quant_lib.quantized_matmul(x, self.kernel[...], self.kernel_scale[...], self.dtype)
    else:
      y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                     preferred_element_type=jnp.float32).astype(self.dtype)
    if lora and self.lora_scale is not None:
      delta = (x.astype(jnp.float32) @ self.lora_a[...]) @ self.lora_b[...]
      y = (y.astype(jnp.float32) + self.lora_scale * delta).astype(self.dtype)
    return y


class Embed(nnx.Module):
  def __init__(self, vocab, dim, *, dtype, param_dtype, rngs):
    self.embedding = nnx.Param(_normal(rngs, (vocab, dim), param_dtype), axes=("vocab", "embed"))
    self.dtype = dtype

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x):
    """Tied output head: x @ embedding.T."""
    return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.dtype)


class RMSNorm(nnx.Module):
  """fp32 statistics, normalised value cast back to the activation dtype, then scaled (docs/model.md
  §3.3)."""

  def __init__(self, dim, eps, *, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def _for(target: str, lora: LoRAConfig | None) -> LoRAConfig | None:
  """The adapter config for one projection: `lora` if it targets it, else None."""
  return lora if lora is not None and target in lora.targets else None


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None, *, dtype, param_dtype, rngs):
    d, q_width, kv_width = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(d, q_width, ("embed", "q_heads"), **kw, lora=_for("q_proj", lora))
    self.k_proj = Linear(d, kv_width, ("embed", "kv_heads"), **kw, lora=_for("k_proj", lora))
    self.v_proj = Linear(d, kv_width, ("embed", "kv_heads"), **kw, lora=_for("v_proj", lora))
    self.o_proj = Linear(q_width, d, ("q_heads", "embed"), **kw, lora=_for("o_proj", lora))
    self.cfg, self.dtype = cfg, dtype

  def qkv(self, x, cos, sin, qscale, lora: bool = False):
    b, t, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x, lora).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x, lora).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x, lora).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if qscale is not None:  # Llama-4 query temperature, after RoPE, keys unscaled
      q = q * qscale.astype(q.dtype)[:, :, None, None]
    return q, k, v

  def out(self, o, lora: bool = False):
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, -1), lora)


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None = None, *, dtype, param_dtype,
               rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, ("embed", "ffw"), **kw, lora=_for("gate_proj", lora))
    self.up_proj = Linear(d, f, ("embed", "ffw"), **kw, lora=_for("up_proj", lora))
    self.down_proj = Linear(f, d, ("ffw", "embed"), **kw, lora=_for("down_proj", lora))

  def __call__(self, x, lora: bool = False):
    return self.down_proj(jax.nn.silu(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, lora, *, dtype, param_dtype, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                            param_dtype=param_dtype)
    self.mlp = MLP(cfg, lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, rope, attend: Attend, kbuf, vbuf, lora: bool):
    """One pre-norm layer; `attend` is the attention pattern, resolved once per forward."""
    with jax.named_scope("attention_block"):
      q, k, v = self.self_attn.qkv(self.input_layernorm(h), *rope, lora)
      o, kbuf, vbuf = attend(q, k, v, kbuf, vbuf)
      h = h + self.self_attn.out(o, lora)
    with jax.named_scope("mlp_block"):
      h = h + self.mlp(self.post_attention_layernorm(h), lora)
    return h, kbuf, vbuf


class Encoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, lora, *, dtype, param_dtype, rngs):
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    # One module, hence one set of buffers, per layer: the forward reads each layer's weights in
    # place. A stacked [layers, ...] array scanned with lax.scan would be sliced into a copy of
    # every layer's weights on each forward, by XLA:CPU and XLA:GPU alike (docs/benchmarks.md).
    self.layers = nnx.List([DecoderLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


# attend(q, k, v, kbuf, vbuf) -> (o, kbuf, vbuf): one layer's attention with its cache buffers.
Attend = Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None]]


def attention_pattern(pattern: str, cache: KVCache | None, *, append: bool, impl: str,
                      block_size: int, key_valid: jax.Array | None) -> Attend:
  """The per-layer attention for one forward (see the module docstring), decided once."""
  if pattern not in PATTERNS:
    raise ValueError(f"unknown attention pattern {pattern!r}; expected one of {PATTERNS}")
  if cache is None:
    if append:
      raise ValueError("append=True needs a cache")
    if pattern == "quadratic":
      raise ValueError("the quadratic pattern needs a cache")
    extra = dict(block_size=block_size) if pattern == "block_diff" else {}

    def attend(q, k, v, kbuf, vbuf):
      return (attn_lib.attention(q, k, v, mask=pattern, key_valid=key_valid, impl=impl, **extra),
              kbuf, vbuf)
    return attend
  if pattern == "block_diff":
    raise ValueError("block_diff is a training pattern and takes no cache")
  offsets = cache.lengths
  if pattern == "quadratic":
    def attend(q, k, v, kbuf, vbuf):
      o = attn_lib.attention(q, kbuf, vbuf, mask="quadratic", kv_len=offsets, block_k=k,
                             block_v=v, impl=impl)
      # Draft d_i is token i(B+1): strided slices of the round's K/V, scattered into the cache.
      step = attn_lib.quadratic_block_length(q.shape[1]) + 1
      return o, write_layer(kbuf, k[:, ::step], offsets), write_layer(vbuf, v[:, ::step], offsets)
    return attend
  if pattern == "causal":
    def attend(q, k, v, kbuf, vbuf):
      kbuf, vbuf = write_layer(kbuf, k, offsets), write_layer(vbuf, v, offsets)
      return (attn_lib.attention(q, kbuf, vbuf, mask="causal", q_offset=offsets, impl=impl),
              kbuf, vbuf)
    return attend

  def attend(q, k, v, kbuf, vbuf):  # the block against the read-only prefix (slots < offsets)
    o = attn_lib.attention(q, kbuf, vbuf, mask="prefix", kv_len=offsets, block_k=k, block_v=v,
                           key_valid=key_valid, impl=impl)
    if append:
      kbuf, vbuf = write_layer(kbuf, k, offsets), write_layer(vbuf, v, offsets)
    return o, kbuf, vbuf
  return attend


class NLDModel(nnx.Module):
  """Embedding, decoder layers, final norm and the (untied) `diffusion_head`."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None,
               lora: LoRAConfig | None = None, quantize: str | None = None, rngs: nnx.Rngs):
    """quantize: None, or "int8" / "fp8" for every Linear's kernel (dllm_jax.quantize)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    self.cfg, self.dtype, self.lora = cfg, dtype, lora
    self.quantize = quant_lib.check_mode(quantize)
    self.encoder = Encoder(cfg, lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.diffusion_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if quantize:
      self._quantize_linears(quantize)

  def _quantize_linears(self, mode: str) -> None:
    for _, module in self.iter_modules():
      if isinstance(module, Linear):
        module.quantize_kernel(mode)
    self.quantize = mode

  def __call__(self, tokens: jax.Array, *, pattern: str = "causal", cache: KVCache | None = None,
               append: bool = False, n_new: jax.Array | None = None,
               key_valid: jax.Array | None = None, lora: bool = False,
               logits_at: jax.Array | None = None, positions: jax.Array | None = None,
               qscale_positions: jax.Array | None = None):
    """tokens [B, T] -> (logits [B, T, V] in the compute dtype, cache).

    pattern: "causal", "bidirectional", "quadratic" or "block_diff" (module docstring).
    cache: with "causal", the input's K/V are appended at each row's length; with
      "bidirectional", the input attends to the cached prefix read-only, unless `append`.
    append: "bidirectional" with a cache only: also write the input's K/V, like a causal call
      (the bidirectional prefill of `causal_context=False`).
    n_new: [B] number of leading input tokens per row that count as appended (ragged prefill;
      default T). All T are written, only n_new[b] become visible.
    key_valid: [B, T] key-padding mask for the input's own keys.
    lora: add the adapters' deltas on every targeted projection (the draft forward).
    logits_at: [B, K] input indices: return logits [B, K, V] at those positions only (a prefill
      needs one row per sequence; the full [B, T, V] would dwarf the activations at vocab 131k).
    positions: absolute positions [B, T]; default: cache length + arange(T) (0.. without cache;
      for block_diff both halves get 0..n-1; for quadratic cache length + i + m).
    qscale_positions: positions for the Llama-4 query scale when they differ from the RoPE
      positions (training uses 0..2n-1 over both halves).
    """
    cfg = self.cfg
    if lora and self.lora is None:
      raise ValueError("lora=True but the model was built without a LoRA adapter")
    b, t = tokens.shape
    if pattern == "block_diff" and t % 2:
      raise ValueError(f"block_diff input must be [noisy ; clean] of even length, got {t}")
    attend = attention_pattern(pattern, cache, append=append, impl=cfg.attention_impl,
                               block_size=cfg.block_size, key_valid=key_valid)
    offsets = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
    if positions is None:
      if pattern == "block_diff":
        half = jnp.arange(t // 2, dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.concatenate([half, half])[None], (b, t))
        if qscale_positions is None:
          qscale_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
      elif pattern == "quadratic":
        size = attn_lib.quadratic_block_length(t)
        positions = offsets[:, None] + jnp.asarray(attn_lib.quadratic_offsets(size))[None, :]
      else:
        positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if qscale_positions is None:
      qscale_positions = positions
    # A trace-time constant, never module state (HF: a non-persistent buffer).
    inv_freq, attention_factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, self.dtype)
    qscale = (llama4_query_scale(qscale_positions, cfg)
              if cfg.llama_4_scaling_beta is not None else None)

    h = self.encoder.embed_tokens(tokens)
    ks, vs = [], []
    for i, layer in enumerate(self.encoder.layers):
      kbuf, vbuf = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
      layer_def, layer_state = nnx.split(layer)
      h, kbuf, vbuf = _run_layer(layer_def, attend, lora, layer_state, h, (cos, sin, qscale),
                                 kbuf, vbuf)
      ks.append(kbuf)
      vs.append(vbuf)
    z = self.encoder.norm(h)
    if logits_at is not None:
      z = jnp.take_along_axis(z, logits_at[:, :, None], axis=1)
    if cfg.tie_word_embeddings:
      logits = self.encoder.embed_tokens.attend(z)
    else:
      logits = self.diffusion_head(z)
    if cache is not None and pattern == "quadratic":
      cache = KVCache(tuple(ks), tuple(vs), offsets + attn_lib.quadratic_block_length(t))
    elif cache is not None and (pattern == "causal" or append):
      appended = jnp.full((b,), t, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
      cache = KVCache(tuple(ks), tuple(vs), offsets + appended)
    return logits, cache


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_layer(layer_def, attend, lora, layer_state, h, rope, kbuf, vbuf):
  """One decoder layer. Every layer has the same structure, so within one forward the layer is
  traced and lowered once and reused: the program still reads each layer's own buffers (XLA
  inlines the call), but tracing no longer grows with depth."""
  return nnx.merge(layer_def, layer_state)(h, rope, attend, kbuf, vbuf, lora)


def quantized(model: NLDModel, mode: str) -> NLDModel:
  """A copy of an unquantized `model` with every Linear kernel quantized to `mode` ("int8" or
  "fp8"); the other arrays are shared, not copied."""
  if model.quantize:
    raise ValueError(f"the model is already {model.quantize}-quantized")
  out = nnx.clone(model)
  out._quantize_linears(quant_lib.check_mode(mode))  # pylint: disable=protected-access
  return out


def lora_linears(model: NLDModel) -> list[tuple[str, int, Linear]]:
  """(target name, layer index, the Linear carrying that adapter), targets in canonical order,
  each over all layers; empty without a LoRA."""
  if model.lora is None:
    return []
  return [(t, i, getattr(getattr(layer, LORA_TARGETS[t]), t))
          for t in model.lora.targets for i, layer in enumerate(model.encoder.layers)]


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None,
                   lora: LoRAConfig | None = None, quantize: str | None = None) -> NLDModel:
  """The model with ShapeDtypeStruct leaves: shapes/dtypes/axes without allocating anything."""
  return nnx.eval_shape(lambda: NLDModel(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora,
                                         quantize=quantize, rngs=nnx.Rngs(0)))


def with_attention_impl(model: NLDModel, impl: str) -> NLDModel:
  """The same parameter arrays (shared, not copied) in a model whose attention runs with `impl`
  (see dllm_jax.config.ATTENTION_IMPLS)."""
  graphdef, _ = nnx.split(abstract_model(model.cfg.replace(attention_impl=impl), dtype=model.dtype,
                                         lora=model.lora, quantize=model.quantize))
  return nnx.merge(graphdef, nnx.state(model))


def param_count(cfg: ModelConfig) -> int:
  """Parameter count of a model for `cfg`, from the abstract shapes (no allocation)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens, **kw):
  """Pure forward over an `nnx.split` model: usable inside jit / while_loop with array state only."""
  return nnx.merge(graphdef, state)(tokens, **kw)
