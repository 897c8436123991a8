"""Building blocks of scripts/bench.py: random weights, timed jitted forwards, rooflines, tables.

Everything here is JAX/numpy only (the PyTorch side lives in scripts/torch_reference_decode.py).
Times are wall-clock seconds around calls that block on their results; warm-up calls (which
include compilation) are never part of a reported median.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.checkpoint import hf_tensor_shapes
from dllm_jax.config import ModelConfig
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import NLDModel, forward, param_count

def json_safe(x: Any) -> Any:
  """JSON-safe values for the reports: numpy scalars to Python, NaN and infinities to null."""
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


# --- timing and memory ----------------------------------------------------------------------------


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int,
          sync: Callable[[Any], Any] = jax.block_until_ready) -> list[float]:
  """Seconds of `repeats` calls of fn() after `warmup` unrecorded ones; `sync` waits for results."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


def run_header(**settings: Any) -> str:
  """The line a probe prints above its table: when, on what, how busy, and the run's settings."""
  env = environment()
  return (f"{env['date_utc']} UTC, {env['cpu']}, threads {env['cpu_threads']}, "
          f"load average (1 min) {env['load_average_1m']:.1f}, jax {env['jax']}; "
          + " ".join(f"{k}={v}" for k, v in settings.items()))


def alternating_rows(rates: dict[str, list[float]], ids: dict[str, list[int]], base: str
                     ) -> list[dict[str, Any]]:
  """Rows of a comparison whose variants ran in turn, one call each per round: per variant its
  median rate, the ratio to `base`'s, the rounds it was faster than `base` in ("-" for `base`)
  and whether its ids equal `base`'s."""
  rounds = len(rates[base])
  return [{"variant": name, "tps": median(r), "ratio": median(r) / median(rates[base]),
           "won": "-" if name == base else f"{sum(a > b for a, b in zip(r, rates[base]))}/{rounds}",
           "same": "yes" if ids[name] == ids[base] else "no"}
          for name, r in rates.items()]


def peak_memory() -> tuple[float, str]:
  """(peak MiB, what it measures): device peak on accelerators, else the process's peak RSS."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, f"{device.platform} peak_bytes_in_use"
  with open("/proc/self/status") as f:  # VmHWM: high-water mark of resident memory
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024, "process peak RSS (VmHWM)"
  return float("nan"), "unavailable"


def cpu_threads() -> int:
  """CPUs this process may run on: what XLA:CPU sizes its thread pool by."""
  return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment() -> dict[str, Any]:
  """Date, device and versions: the header every recorded table carries."""
  device = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "jax_backend": jax.default_backend(),
      "device": getattr(device, "device_kind", device.platform),
      "device_count": jax.device_count(),
      "cpu": _cpu_model(),
      "cpu_threads": cpu_threads(),
      # Other processes on the machine skew every number: record how busy it was.
      "load_average_1m": os.getloadavg()[0],
      "python": platform.python_version(),
      **{p: _version(p) for p in ("jax", "jaxlib", "flax", "torch", "transformers")},
  }


# --- random models --------------------------------------------------------------------------------

def random_llama_tensors(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
  """Random fp32 weights under HF Llama names (`model.*`, `lm_head.weight`), PyTorch [out, in].

  Linear weights ~ N(0, 0.02²) like HF's initializer; norm weights 1 + N(0, 0.1²) so that both
  implementations must apply them.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hf_tensor_shapes(cfg, naming="llama").items():
    x = rng.standard_normal(shape, dtype=np.float32)
    out[name] = (1.0 + 0.1 * x) if name.endswith("norm.weight") else 0.02 * x
  return out


def random_lora(cfg: ModelConfig, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Draft LoRA factors a [layers, heads*head_dim, rank], b [layers, rank, hidden], N(0, 0.02²).

  b is non-zero (unlike a fresh PEFT adapter) so that the draft differs from the base model.
  """
  rng = np.random.default_rng(seed)
  q = cfg.num_heads * cfg.head_dim
  a = 0.02 * rng.standard_normal((cfg.num_layers, q, rank), dtype=np.float32)
  b = 0.02 * rng.standard_normal((cfg.num_layers, rank, cfg.hidden_size), dtype=np.float32)
  return a, b


def set_lora(model: NLDModel, a: np.ndarray, b: np.ndarray) -> None:
  """Writes the o_proj draft LoRA factors into a model built with `lora=LoRAConfig(...)`."""
  for i, layer in enumerate(model.encoder.layers):
    for name, value in (("lora_a", a[i]), ("lora_b", b[i])):
      param = getattr(layer.self_attn.o_proj, name)
      if tuple(param.value.shape) != tuple(value.shape):
        raise ValueError(f"LoRA factor {name} has shape {value.shape}, "
                         f"the model expects {tuple(param.value.shape)}")
      param.value = jnp.asarray(value, param.value.dtype)


# --- single forwards (the unit every decoding round is made of) -----------------------------------

# kind -> (attention pattern, draft LoRA on): the forwards of docs/model.md §5. "ar" is a 1-token
# step; the others run a whole block.
FORWARD_KINDS = {
    "ar": ("causal", False),
    "denoise": ("bidirectional", False),
    "commit": ("causal", False),
    "draft": ("bidirectional", True),
    "verify": ("causal", False),
    "quadratic": ("quadratic", False),  # a B(B+1)-token round of quadratic self-speculation
}


@dataclasses.dataclass(frozen=True)
class ForwardShape:
  batch: int
  tokens: int  # tokens per row in this forward (1 for an AR step, B(B+1) for a quadratic round,
  # the block length otherwise)
  context: int  # cached tokens the forward attends to
  cache_len: int  # allocated cache slots (as the decoding engine allocates them)


def time_forward(model: NLDModel, kind: str, shape: ForwardShape, *, warmup: int,
                 repeats: int) -> list[float]:
  """Seconds per jitted forward of `kind` at `shape`, cache donated and reset to `context` each call.

  This is the forward alone, as the engine runs it inside its loops: everything a decoding round
  spends beyond these times is engine overhead.
  """
  pattern, lora = FORWARD_KINDS[kind]
  graphdef, state = nnx.split(model)
  cfg = model.cfg
  cache = KVCache.init(cfg, shape.batch, shape.cache_len, model.dtype)
  tokens = jnp.full((shape.batch, shape.tokens), cfg.mask_token_id or 0, jnp.int32)

  def step(state, tokens, cache):
    logits, cache = forward(graphdef, state, tokens, pattern=pattern, cache=cache, lora=lora)
    # Reset the length so every call sees the same context (a causal forward appended `tokens`).
    return logits, cache.with_lengths(jnp.full((shape.batch,), shape.context, jnp.int32))

  step = jax.jit(step, donate_argnums=(2,))
  holder = {"cache": cache.with_lengths(jnp.full((shape.batch,), shape.context, jnp.int32))}

  def call():
    logits, holder["cache"] = step(state, tokens, holder["cache"])
    return logits

  return timed(call, warmup=warmup, repeats=repeats)


def copy_bandwidth(nbytes: int, *, repeats: int, dtype=jnp.bfloat16) -> float:
  """Device-to-device bandwidth in bytes/s: a jitted elementwise pass that reads and writes
  `nbytes` (an add, so XLA cannot alias the output to the input)."""
  n = nbytes // jnp.dtype(dtype).itemsize
  x = jnp.ones((n,), dtype)
  f = jax.jit(lambda x: x + jnp.asarray(1, dtype))
  seconds = median(timed(lambda: f(x), warmup=2, repeats=repeats))
  return 2 * n * jnp.dtype(dtype).itemsize / seconds


def bytes_per_forward(cfg: ModelConfig, shape: ForwardShape, dtype) -> dict[str, int]:
  """Bytes one forward must read from memory at least: every weight but the embedding table (only
  `batch*tokens` rows of it are gathered) and the K/V of the context, all layers."""
  item = jnp.dtype(dtype).itemsize
  params = param_count(cfg)
  table = cfg.vocab_size * cfg.hidden_size
  if cfg.tie_word_embeddings:
    table = 0  # the tied table is read whole as the output head
  weights = (params - table + shape.batch * shape.tokens * cfg.hidden_size) * item
  kv = 2 * cfg.num_layers * shape.batch * shape.context * cfg.num_kv_heads * cfg.head_dim * item
  return {"weight_bytes": weights, "kv_bytes": kv}


# --- reporting ------------------------------------------------------------------------------------

def _cell(x: Any) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if math.isnan(x):
      return "-"
    if x == 0:
      return "0"
    a = abs(x)
    return f"{x:.3g}" if a < 100 else f"{x:.0f}"
  return str(x)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
  """A Markdown table of `rows` with (key, header) columns; absent/NaN values print as '-', keys
  ending in `_frac` as percentages."""
  header = [h for _, h in columns]
  body = [[_percent(r.get(k)) if k.endswith("_frac") else _cell(r.get(k)) for k, _ in columns]
          for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
            for i, h in enumerate(header)]

  def line(cells):
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

  sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
  return "\n".join([line(header), sep, *(line(b) for b in body)])


def _percent(x: Any) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
