r"""Decoding benchmarks: JAX engine per mode, against PyTorch on the same weights, in one run.

  python scripts/bench.py --config=configs/bench_cpu.py --json=/tmp/bench.json
  python scripts/bench.py --config=configs/bench_gpu.py --gpu_shapes   # on a CUDA machine

For every (model, mode, batch) case it reports forwards/s, ms per forward (denoising step, commit,
draft, verify, AR step), NFE, tokens per forward, output tokens/s, compile seconds and peak memory,
with the warm-up (compiling) call excluded and medians over repeats. Output tokens only: prompts
are never counted. The same case then runs on the PyTorch baseline holding the same weights
(transformers `generate` for AR, the straightforward loops of scripts/torch_reference_decode.py for
diffusion and spec; quadratic self-speculation has no PyTorch baseline) and the ratio is reported,
with the fraction of positions where both produced the same greedy tokens. `quantize` (e.g.
("int8", "fp8")) adds, per case, the same model with its linear kernels quantized
(docs/quantization.md), JAX only, its "same tokens" taken against the unquantized JAX engine.

Engine overhead: each kind of forward is also timed alone (jitted, same shapes, same cache size);
overhead = 1 - (sum over forwards of their isolated times) / decode time.

--gpu_shapes adds the hardware section: per-forward time of NLD 3B/8B shapes with random weights
against the bandwidth roofline (bytes read / measured device copy bandwidth) and against
transformers (SDPA) on the same GPU. It is skipped, with a message, when JAX has no GPU.
"""

from __future__ import annotations

import os

# JAX and PyTorch share the accelerator within one run: allocate on demand instead of grabbing 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import torch

from dllm_jax import loader
from dllm_jax.atomic_files import write_text_atomic
from dllm_jax.checkpoint import model_from_state_dict
from dllm_jax.config import ModelConfig, preset
from dllm_jax.decode import DecodeSettings, generate, settings_for
from dllm_jax.decode.common import bucket_length
from dllm_jax.model import LoRAConfig, NLDModel, param_count, quantized

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils as bu  # pylint: disable=g-import-not-at-top,wrong-import-position
import llama_cpp_baseline as lcpp  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference_decode as tref  # pylint: disable=g-import-not-at-top,wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ("ar", "diffusion", "spec", "quadratic")
# Forward kinds each mode is made of (see bench_utils.FORWARD_KINDS).
MODE_FORWARDS = {"ar": ("ar",), "diffusion": ("denoise", "commit"), "spec": ("draft", "verify"),
                 "quadratic": ("quadratic",)}


# --- models ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Models:
  """One model under both frameworks, holding the same weights."""
  name: str
  cfg: ModelConfig
  jax_model: NLDModel
  torch_model: Any  # transformers model, or None without baselines
  lora: tuple[np.ndarray, np.ndarray, float] | None  # draft adapter (a, b, scale)
  torch_lora: tref.TorchLoRA | None
  gguf_path: str | None = None  # the GGUF both frameworks loaded (llama.cpp runs on its copies)


def model_config(name: str, spec: ml_collections.ConfigDict) -> ModelConfig:
  """A random-weight model: an NLD preset with `spec.overrides` applied."""
  try:
    return preset(spec.base).replace(**dict(spec.get("overrides", {})))
  except TypeError as e:
    raise ValueError(f"--config.models.{name}.overrides: {e}") from None


def load_models(name: str, spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                dtype, torch_dtype, torch_device: str, need_lora: bool) -> Models:
  gguf_path = None
  if spec.source == "random":
    cfg = model_config(name, spec)
    tensors = bu.random_llama_tensors(cfg, config.seed)
  else:
    desc = loader.inspect(spec.source)
    if desc.gguf is None:
      raise ValueError(f"--config.models.{name}.source={spec.source!r}: expected random, "
                       f"{loader.EMBEDDED_NAME} or a .gguf file (tensors both frameworks load)")
    # Dequantized to fp32 once and shared by both sides.
    cfg, tensors, gguf_path = desc.config, desc.gguf.tensors(), desc.gguf.path
  if config.attention_impl:
    cfg = cfg.replace(attention_impl=config.attention_impl)
  lora = None
  lora_cfg = None
  if need_lora and cfg.mask_token_id is not None and config.spec.lora_rank:
    lora_cfg = LoRAConfig(config.spec.lora_rank, 4.0 * config.spec.lora_rank)  # NLD: 128 / 512
    a, b = bu.random_lora(cfg, config.spec.lora_rank, config.seed + 1)
    lora = (a, b, lora_cfg.scale)
  jax_model = model_from_state_dict(cfg, tensors, dtype=dtype, lora=lora_cfg)
  if lora:
    bu.set_lora(jax_model, lora[0], lora[1])
  tm = (tref.torch_model(cfg, tensors, dtype=torch_dtype, device=torch_device)
        if config.torch_baseline else None)
  torch_lora = tref.TorchLoRA.from_numpy(tm, *lora) if lora and tm is not None else None
  return Models(name, cfg, jax_model, tm, lora, torch_lora, gguf_path)


# --- one case: JAX engine ---------------------------------------------------------------------------

def mode_settings(mode: str, config: ml_collections.ConfigDict, threshold: float | None
                  ) -> DecodeSettings:
  """EOS off: every row decodes the whole budget. Diffusion's threshold None is the reference's
  fixed transfer schedule."""
  sub = config[mode]
  kw = dict(max_new_tokens=sub.max_new_tokens, eos_token_ids=())
  if mode == "diffusion" and threshold is None:
    kw.update(block_length=sub.block_length, fixed_schedule=True)
  elif mode == "quadratic":
    kw.update(block_length=sub.block_length)
  elif mode != "ar":
    kw.update(block_length=sub.block_length, threshold=threshold)
  return settings_for(mode, **kw)


def forward_counts(mode: str, settings: DecodeSettings, results) -> dict[str, int]:
  """How many forwards of each kind one generate call ran (the batch runs while any row runs)."""
  decode_nfe = max(max(r.decode_nfe) for r in results)
  if mode == "ar":
    return {"ar": decode_nfe - 1}  # the first token comes from the prefill logits
  if mode == "diffusion":
    blocks = settings.max_new_tokens // settings.block  # EOS is off: every block is decoded
    return {"denoise": decode_nfe - blocks, "commit": blocks}
  if mode == "quadratic":
    return {"quadratic": decode_nfe}  # one forward per round
  rounds = max(len(a) for a in results[0].accepted_lengths)
  return {"draft": decode_nfe - rounds, "verify": rounds}


def run_jax_case(models: Models, mode: str, batch: int, threshold: float | None,
                 prompts: np.ndarray, config: ml_collections.ConfigDict,
                 between: Callable[[], None] | None = None) -> dict[str, Any]:
  """`between`: run after every recorded call (another framework's repeat, so that both are timed
  alternately under the same machine load)."""
  settings = mode_settings(mode, config, threshold)
  first = generate(models.jax_model, prompts.tolist(), settings)
  for _ in range(config.warmup - 1):
    generate(models.jax_model, prompts.tolist(), settings)
  results, walls = [], []
  for _ in range(config.repeats):
    start = time.perf_counter()  # the whole call, as a user sees it (argument handling included)
    results.append(generate(models.jax_model, prompts.tolist(), settings))
    walls.append(time.perf_counter() - start)
    if between is not None:
      between()
  wall, decode = bu.median(walls), bu.median([r.decode_seconds for r in results])
  generated = sum(len(t) for t in results[0].tokens)
  counts = forward_counts(mode, settings, results)
  forwards = sum(counts.values())
  row = dict(
      nfe=max(results[0].nfe), decode_nfe=max(results[0].decode_nfe),
      tokens_per_forward=float(np.mean(results[0].tokens_per_forward)),
      generated_tokens=generated, seconds=wall,
      prefill_ms=1e3 * bu.median([r.prefill_seconds for r in results]), decode_seconds=decode,
      tokens_per_s=generated / wall, decode_tokens_per_s=generated / decode,
      forwards=forwards, forwards_per_s=forwards / decode, ms_per_forward=1e3 * decode / forwards,
      compile_seconds=first.compile_seconds)
  if mode in ("spec", "quadratic"):
    acc = [a for r in results[:1] for row_acc in r.accepted_lengths for a in row_acc]
    row["mean_accepted"] = float(np.mean(acc)) if acc else float("nan")
  # The same forwards alone: what the decode would cost with zero engine overhead.
  prompt_len = prompts.shape[1]
  out_width = settings.max_new_tokens + settings.block
  tokens = settings.block * (settings.block + 1) if mode == "quadratic" else settings.block
  shape = bu.ForwardShape(batch, tokens, context=prompt_len + settings.max_new_tokens // 2,
                          cache_len=bucket_length(prompt_len) + out_width)
  forward_seconds = 0.0
  for kind in MODE_FORWARDS[mode]:
    t = bu.median(bu.time_forward(models.jax_model, kind, shape, warmup=2,
                                  repeats=config.forward_repeats))
    row[f"ms_{kind}"] = 1e3 * t
    forward_seconds += counts[kind] * t
  row["overhead_frac"] = 1.0 - forward_seconds / decode
  row["peak_mem_mib"], row["peak_mem_kind"] = bu.peak_memory()
  row["_tokens"], row["_counts"] = results[0].tokens, counts
  return row


# --- one case: PyTorch baseline ---------------------------------------------------------------------

def run_torch_case(models: Models, mode: str, batch: int, threshold: float | None,
                   prompts: np.ndarray, config: ml_collections.ConfigDict,
                   counts: dict[str, int], context: int) -> dict[str, Any]:
  """The same case on the PyTorch side; `counts` and `context` come from the JAX case."""
  tm, cfg = models.torch_model, models.cfg
  dev = next(tm.parameters()).device
  ids = torch.as_tensor(prompts, device=dev)
  sub = config[mode]
  if mode == "ar":
    label = "transformers generate"
    run = lambda: tref.hf_generate(tm, ids, sub.max_new_tokens)
  elif mode == "diffusion":
    label = "torch loop (docs/model.md §5.1)"
    run = lambda: tref.block_diffusion_decode(
        tm, ids, sub.max_new_tokens, block_length=sub.block_length,
        mask_token_id=cfg.mask_token_id, threshold=threshold)
  else:
    label = "torch loop (docs/model.md §5.3)"
    run = lambda: tref.linear_spec_decode(
        tm, ids, sub.max_new_tokens, block_length=sub.block_length,
        mask_token_id=cfg.mask_token_id, threshold=threshold, lora=models.torch_lora)
  for _ in range(config.warmup):
    run()
  results = [run() for _ in range(config.repeats)]
  wall = bu.median([r.seconds for r in results])
  generated = int(results[0].tokens.size)
  row = dict(torch_impl=label, torch_nfe=results[0].nfe, torch_seconds=wall,
             torch_tokens_per_s=generated / wall)
  if results[0].prefill_seconds is not None:
    decode = bu.median([r.decode_seconds for r in results])
    row["torch_decode_tokens_per_s"] = generated / decode
  else:
    decode = None
  forward_seconds = 0.0
  tokens = 1 if mode == "ar" else sub.block_length
  for kind in MODE_FORWARDS[mode]:
    t = bu.median(tref.time_torch_forward(
        tm, kind, batch=batch, tokens=tokens, context=context,
        token_id=cfg.mask_token_id or 0, warmup=2, repeats=config.forward_repeats,
        lora=models.torch_lora))
    row[f"torch_ms_{kind}"] = 1e3 * t
    forward_seconds += counts[kind] * t
  # transformers generate exposes no prefill/decode split: its overhead is taken over the whole
  # call, so its prefill counts as overhead there.
  row["torch_overhead_frac"] = 1.0 - forward_seconds / (decode if decode else wall)
  row["_tokens"] = results[0].tokens
  return row


def token_agreement(jax_tokens: list[list[int]], other_tokens) -> float:
  """Fraction of positions (over each row's common length) where both chose the same token;
  `other_tokens`: an array [batch, n] or a list of rows."""
  same = total = 0
  for a, b in zip(jax_tokens, [list(r) for r in other_tokens]):
    n = min(len(a), len(b))
    same += sum(x == y for x, y in zip(a[:n], b[:n]))
    total += n
  return same / total if total else float("nan")


# --- the CPU/GPU comparison section ----------------------------------------------------------------

def comparison_section(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  dtype, torch_dtype, torch_device = frameworks_dtype(config)
  rows = []
  rng = np.random.default_rng(config.seed)
  for name in config.model_order:
    spec = config.models[name]
    modes = [m for m in MODES if m in config and name in config[m].models]
    if not modes:
      continue
    print(f"[bench] loading {name} ...", flush=True)
    models = load_models(name, spec, config, dtype, torch_dtype, torch_device,
                         need_lora="spec" in modes)
    print(f"[bench] {name}: {param_count(models.cfg) / 1e6:.1f}M parameters", flush=True)
    # The same weights quantized (weight-only, docs/quantization.md): JAX only, their tokens
    # compared with the unquantized engine's.
    variants = [dataclasses.replace(models, name=f"{name} {q}", torch_model=None, torch_lora=None,
                                    jax_model=quantized(models.jax_model, q))
                for q in config.get("quantize", ())]
    for mode in modes:
      if mode != "ar" and models.cfg.mask_token_id is None:
        print(f"[bench] {name}: skipping {mode} (an AR model without a mask token)", flush=True)
        continue
      thresholds = list(config.diffusion.thresholds) if mode == "diffusion" else [
          config.spec.threshold if mode == "spec" else None]
      for batch in config[mode].batch_sizes:
        for threshold in thresholds:
          prompts = rng.integers(0, models.cfg.vocab_size, (batch, config.prompt_length))
          rows.append(run_case(models, mode, batch, threshold, prompts, config))
          reference = rows[-1].pop("_tokens")
          for variant in variants:
            rows.append(run_case(variant, mode, batch, threshold, prompts, config, reference))
            rows[-1].pop("_tokens")
    del models, variants
    gc.collect()
  return rows


def run_case(models: Models, mode: str, batch: int, threshold: float | None,
             prompts: np.ndarray, config: ml_collections.ConfigDict,
             reference: list[list[int]] | None = None) -> dict[str, Any]:
  """One case; `reference`: tokens of the unquantized model for a quantized one's agreement."""
  sub = config[mode]
  print(f"[bench] {models.name} {mode} batch={batch} threshold={threshold} ...", flush=True)
  row = dict(model=models.name, params_m=param_count(models.cfg) / 1e6, mode=mode, batch=batch,
             prompt_length=int(prompts.shape[1]), max_new_tokens=sub.max_new_tokens,
             block_length=sub.get("block_length"), threshold=threshold,
             draft_lora=models.lora is not None if mode == "spec" else None)
  llama = LlamaCppCase(models, mode, batch, prompts, config)
  row.update(run_jax_case(models, mode, batch, threshold, prompts, config,
                          between=llama.run_once if llama.runners else None))
  row["quantize"] = models.jax_model.quantize
  row["param_mb"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(models.jax_model,
                                                                     nnx.Param))) / 2**20
  jax_tokens, counts = row["_tokens"], row.pop("_counts")
  row.update(llama.result(row, jax_tokens))
  if reference is not None:
    row["token_agreement"] = token_agreement(jax_tokens, reference)
  if (models.torch_model is not None and mode != "quadratic"
      and not (mode == "spec" and batch > 1)):
    context = int(prompts.shape[1]) + sub.max_new_tokens // 2
    t = run_torch_case(models, mode, batch, threshold, prompts, config, counts, context)
    row["token_agreement"] = token_agreement(jax_tokens, t.pop("_tokens"))
    row.update(t)
    row["speedup_vs_torch"] = row["tokens_per_s"] / row["torch_tokens_per_s"]
    if "torch_decode_tokens_per_s" in row:
      row["decode_speedup_vs_torch"] = (row["decode_tokens_per_s"]
                                        / row["torch_decode_tokens_per_s"])
  torch_part = (f", torch {row['torch_tokens_per_s']:.1f} tok/s"
                if "torch_tokens_per_s" in row else "")
  torch_part += "".join(f", llama.cpp {q} {row[f'llama_cpp_{q}_tok_s']:.1f} tok/s"
                        for q in llama.runners)
  print(f"[bench]   -> {row['tokens_per_s']:.1f} tok/s, NFE {row['nfe']}, "
        f"overhead {row['overhead_frac']:.1%}{torch_part}", flush=True)
  return row


# --- llama.cpp on the same GGUF (AR only) ------------------------------------------------------------

def llama_cpp_skip_reason(config: ml_collections.ConfigDict) -> str | None:
  """Why the llama.cpp columns are left out of this run, or None when they are measured."""
  if not config.llama_cpp.quants:
    return "--config.llama_cpp.quants is empty"
  if not lcpp.available():
    return ("llama-cpp-python is not installed (pip install -e .[bench]; it builds llama.cpp from "
            "source, about 25 minutes on 2 cores)")
  if jax.default_backend() != "cpu":
    return f"JAX runs on {jax.default_backend()!r}, llama.cpp on the CPU: not the same device"
  return None


class LlamaCppCase:
  """llama.cpp decoding the same prompt greedily from copies of the same GGUF (scripts/
  llama_cpp_baseline.py), one repeat after each recorded JAX call, at the same thread count.

  Its decode time covers the forwards after the first token with their sampling, as the JAX
  engine's fwd/s does: the two rates compare the same work.
  """

  def __init__(self, models: Models, mode: str, batch: int, prompts: np.ndarray,
               config: ml_collections.ConfigDict):
    self.runners: dict[str, lcpp.LlamaCppAR] = {}
    self.runs: dict[str, list[lcpp.Run]] = {}
    if (mode != "ar" or batch != 1 or models.gguf_path is None
        or llama_cpp_skip_reason(config) is not None):
      return
    self.prompt = [int(t) for t in prompts[0]]
    self.n_new = config.ar.max_new_tokens
    n_ctx = -(-(len(self.prompt) + self.n_new) // 256) * 256
    threads = config.threads or bu.cpu_threads()
    out_dir = config.llama_cpp.dir or os.path.join(os.path.expanduser("~"), ".cache", "dllm_jax",
                                                   "llama_cpp")
    for quant in config.llama_cpp.quants:
      print(f"[bench] llama.cpp {quant} copy of {models.gguf_path} ...", flush=True)
      path = lcpp.requantized_copy(models.gguf_path, quant, out_dir)
      self.runners[quant] = lcpp.LlamaCppAR(path, threads, n_ctx)
      self.runs[quant] = []
      for _ in range(config.warmup):
        self.runners[quant].generate(self.prompt, self.n_new)

  def run_once(self) -> None:
    for quant, runner in self.runners.items():
      self.runs[quant].append(runner.generate(self.prompt, self.n_new))

  def result(self, row: dict[str, Any], jax_tokens: list[list[int]]) -> dict[str, Any]:
    out = {}
    for quant, runs in self.runs.items():
      rate = (self.n_new - 1) / bu.median([r.decode_seconds for r in runs])
      out[f"llama_cpp_{quant}_tok_s"] = rate
      out[f"vs_llama_cpp_{quant}"] = row["forwards_per_s"] / rate
      out[f"llama_cpp_{quant}_same_tokens"] = token_agreement(
          jax_tokens, np.asarray([runs[0].tokens]))
      self.runners[quant].close()
    return out


def frameworks_dtype(config: ml_collections.ConfigDict):
  """(jax dtype, torch dtype, torch device) for config.dtype ("auto": see loader.resolve_dtype)."""
  if config.dtype not in loader.DTYPE_NAMES:
    raise ValueError(f"--config.dtype={config.dtype!r}: expected one of "
                     f"{', '.join(loader.DTYPE_NAMES)}")
  dtype = loader.resolve_dtype(config.dtype)
  on_gpu = jax.default_backend() == "gpu"
  device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
  return dtype, getattr(torch, dtype.name), device


# --- the hardware (roofline) section ------------------------------------------------------------------

def roofline_section(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Per-forward times of NLD shapes vs (weight + KV bytes) / measured copy bandwidth, and vs
  transformers on the same device."""
  rc = config.roofline
  backend = jax.default_backend()
  if backend != "gpu" and not rc.allow_cpu:
    msg = (f"--gpu_shapes: skipped, JAX backend is {backend!r} (this section needs a CUDA GPU; "
           "install the [gpu] extra on a GPU machine)")
    print(f"[bench] {msg}", flush=True)
    return {"skipped": msg, "rows": []}
  dtype = jnp.dtype(rc.dtype)
  bandwidth = bu.copy_bandwidth(rc.copy_mib * 2**20, repeats=rc.repeats, dtype=dtype)
  print(f"[bench] device copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
  torch_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  rows = []
  for name in rc.presets:
    cfg = preset(name).replace(**dict(rc.get("overrides", {})))
    if config.attention_impl:
      cfg = cfg.replace(attention_impl=config.attention_impl)
    print(f"[bench] roofline {name}: random {rc.dtype} weights ...", flush=True)
    shapes = [(b, kind, 1 if kind == "ar" else rc.block_length)
              for b in rc.batch_sizes for kind in rc.forwards]
    model = NLDModel(cfg, dtype=dtype, rngs=nnx.Rngs(config.seed))  # the model's own random init
    by_key = {}
    for batch, kind, tokens in shapes:
      shape = bu.ForwardShape(batch, tokens, rc.context, rc.context + rc.block_length)
      t = bu.median(bu.time_forward(model, kind, shape, warmup=2, repeats=rc.repeats))
      need = bu.bytes_per_forward(cfg, shape, dtype)
      roof = (need["weight_bytes"] + need["kv_bytes"]) / bandwidth
      row = dict(model=name, batch=batch, forward=kind, tokens=tokens, context=rc.context,
                 ms=1e3 * t, roofline_ms=1e3 * roof, vs_roofline=t / roof,
                 achieved_gb_s=(need["weight_bytes"] + need["kv_bytes"]) / t / 1e9, **need)
      by_key[(batch, kind)] = row
      rows.append(row)
    mem = bu.peak_memory()
    del model
    gc.collect()
    if rc.torch:
      tm = tref.random_torch_model(cfg, dtype=getattr(torch, rc.dtype), device=torch_device)
      for batch, kind, tokens in shapes:
        t = bu.median(tref.time_torch_forward(
            tm, kind, batch=batch, tokens=tokens, context=rc.context,
            token_id=cfg.mask_token_id or 0, warmup=2, repeats=rc.repeats))
        row = by_key[(batch, kind)]
        row.update(torch_ms=1e3 * t, torch_vs_roofline=t / (row["roofline_ms"] / 1e3),
                   speedup_vs_torch=t / (row["ms"] / 1e3))
      del tm
      gc.collect()
      if torch_device == "cuda":
        torch.cuda.empty_cache()
    for row in rows:
      if row["model"] == name:
        row["peak_mem_mib"], row["peak_mem_kind"] = mem
  return {"copy_bandwidth_gb_s": bandwidth / 1e9, "dtype": rc.dtype, "rows": rows}


# --- report ---------------------------------------------------------------------------------------

_COMMON_LEFT = [("model", "model"), ("batch", "batch"), ("max_new_tokens", "new")]
_COMMON_RIGHT = [("nfe", "NFE"), ("tokens_per_forward", "tok/fwd"),
                 ("forwards_per_s", "fwd/s"), ("overhead_frac", "overhead"),
                 ("tokens_per_s", "out tok/s"), ("compile_seconds", "compile s"),
                 ("peak_mem_mib", "peak MiB"), ("torch_tokens_per_s", "torch tok/s"),
                 ("speedup_vs_torch", "speedup"), ("torch_overhead_frac", "torch overhead"),
                 ("token_agreement", "same tokens"), ("param_mb", "param MiB")]
TABLE_COLUMNS = {
    "ar": _COMMON_LEFT + [("ms_ar", "ms/step")] + _COMMON_RIGHT + [
        ("llama_cpp_F32_tok_s", "llama.cpp F32 fwd/s"), ("vs_llama_cpp_F32", "vs llama.cpp F32"),
        ("llama_cpp_F32_same_tokens", "same tokens as llama.cpp F32"),
        ("llama_cpp_Q8_0_tok_s", "llama.cpp Q8_0 fwd/s"), ("vs_llama_cpp_Q8_0", "vs Q8_0")],
    "diffusion": _COMMON_LEFT + [("block_length", "B"), ("threshold", "τ"),
                                 ("ms_denoise", "ms/denoise"), ("ms_commit", "ms/commit"),
                                 ("torch_ms_denoise", "torch ms/denoise")] + _COMMON_RIGHT,
    "spec": _COMMON_LEFT + [("block_length", "B"), ("mean_accepted", "accepted"),
                            ("ms_draft", "ms/draft"), ("ms_verify", "ms/verify"),
                            ("torch_ms_verify", "torch ms/verify")] + _COMMON_RIGHT,
    "quadratic": _COMMON_LEFT + [("block_length", "B"), ("mean_accepted", "accepted"),
                                 ("ms_quadratic", "ms/round forward")] + _COMMON_RIGHT,
}
ROOFLINE_COLUMNS = [("model", "model"), ("batch", "batch"), ("forward", "forward"),
                    ("tokens", "tokens"), ("context", "context"), ("ms", "ms"),
                    ("roofline_ms", "roofline ms"), ("vs_roofline", "× roofline"),
                    ("achieved_gb_s", "GB/s"), ("torch_ms", "torch ms"),
                    ("torch_vs_roofline", "torch × roofline"), ("speedup_vs_torch", "speedup")]


def render(report: dict[str, Any]) -> str:
  env = report["environment"]
  lines = [f"# dllm_jax decoding benchmark ({env['date_utc']} UTC)",
           f"device: {env['device']} ({env['jax_backend']}), cpu: {env['cpu']}, "
           f"threads: jax {env['cpu_threads']} / torch {report['torch_threads']}, "
           f"dtype: {report['dtype']}, load average (1 min) at start / end: "
           f"{env['load_average_1m']:.1f} / {env.get('load_average_1m_end', float('nan')):.1f}",
           "versions: " + ", ".join(f"{p} {env[p]}" for p in
                                    ("python", "jax", "jaxlib", "flax", "torch", "transformers"))
           + (f", llama-cpp-python {report['llama_cpp']['version']}"
              if "version" in report.get("llama_cpp", {}) else ""),
           f"command: {report['command']}"]
  for mode in MODES:
    rows = [r for r in report["cases"] if r["mode"] == mode]
    if rows:
      lines += ["", f"## {mode}", "", bu.format_table(rows, TABLE_COLUMNS[mode])]
  roof = report.get("roofline")
  if roof is not None:
    lines += ["", "## forwards vs bandwidth roofline", ""]
    if roof.get("skipped"):
      lines.append(roof["skipped"])
    else:
      lines += [f"copy bandwidth: {roof['copy_bandwidth_gb_s']:.1f} GB/s, dtype {roof['dtype']}",
                "", bu.format_table(roof["rows"], ROOFLINE_COLUMNS)]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, gpu_shapes: bool = False,
        command: str = "") -> dict[str, Any]:
  """Runs the configured benchmark and returns the report (JSON-serialisable)."""
  threads = config.threads or bu.cpu_threads()
  torch.set_num_threads(threads)  # the same thread count as XLA:CPU's pool, for a fair CPU race
  dtype, _, _ = frameworks_dtype(config)
  skipped = llama_cpp_skip_reason(config)
  if skipped:
    print(f"[bench] llama.cpp columns skipped: {skipped}", flush=True)
  report = {"environment": bu.environment(), "torch_threads": torch.get_num_threads(),
            "dtype": str(dtype), "command": command, "config": config.to_dict(),
            "llama_cpp": {"skipped": skipped} if skipped else {"version": lcpp.version()},
            "cases": comparison_section(config)}
  if gpu_shapes:
    report["roofline"] = roofline_section(config)
  report["environment"]["load_average_1m_end"] = os.getloadavg()[0]
  return report


def define_flags():
  """Command-line flags (defined only when run as a script, so importing this file is inert)."""
  return (
      config_flags.DEFINE_config_file(
          "config", os.path.join(_REPO, "configs", "bench_cpu.py"), "benchmark configuration file"),
      flags.DEFINE_string("json", None, "also write the full report (all fields) to this path"),
      flags.DEFINE_bool("gpu_shapes", False,
                        "add the per-forward roofline section for NLD 3B/8B shapes (GPU only)"))


def main(argv: list[str], config_flag, json_flag, gpu_flag) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  command = "python " + " ".join(sys.argv)
  report = run(config_flag.value, gpu_shapes=gpu_flag.value, command=command)
  print(render(report))
  if json_flag.value:
    write_json(report, json_flag.value)
    print(f"\n[bench] wrote {json_flag.value}")


def write_json(report: dict[str, Any], path: str) -> None:
  """Writes via a temporary file, so a failed run never leaves a truncated report behind."""
  write_text_atomic(path, json.dumps(bu.json_safe(report), indent=1))


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, *_flags))
