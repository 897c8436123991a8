r"""One run that checks and measures the library on a GPU: kernels, parity, rooflines, generate.

  PYTHONPATH=. python scripts/gpu_check.py --out=DIR      # CUDA GPU: budgeted under 10 minutes
  PYTHONPATH=. XLA_FLAGS=--xla_backend_optimization_level=0 \
      python scripts/gpu_check.py --out=DIR --cpu_smoke  # the same code paths on tiny shapes

(The XLA flag only makes CPU compilation, which dominates at tiny shapes, several times faster.)

Sections (each records its own failure and the run goes on; the exit status is 1 if any failed):
  kernel_tests  the compiled-kernel tests (`pytest -m gpu` over tests/test_kernels_mgpu.py,
                tests/test_kernels_triton.py, tests/test_kernels_gpu_model.py) in a child process
                with a timeout; pass/fail/skip counts. With --cpu_smoke the child runs on the CPU,
                where every compiled case skips itself: the files import and the markers select.
  parity        a random model of NLD-8B head geometry (32 q heads, 8 kv heads, head_dim 128, two
                small layers), bf16, with attention_impl "auto" and each kernel impl the device
                has, against an fp32 XLA run of the same weights over the decoding patterns
                (ragged prefill, decode steps, a denoising block against the cache, a commit):
                max abs logit error within twice XLA's own bf16 error plus one bf16 ulp of the
                logits, and greedy-token agreement. --cpu_smoke: the `tiny` preset and "auto" (XLA
                on CPU); the kernels' interpret modes are left to the unit tests.
  roofline      NLD-8B and NLD-3B forwards (random bf16 weights made on the device, the library's
                default settings) at batch 1 and 8 against a 1024-token cache: an AR step, a
                32-token denoising step and a 32-token commit, median time vs (weight bytes + KV
                bytes) / the copy bandwidth measured in the same run. --cpu_smoke: `tiny`, batch 2,
                context 64.
  quadratic     the forwards of one self-speculation round on the NLD-8B shape at batch 1 against a
                1024-token cache, for block lengths 8, 16 and 32: the linear round's two
                B-token forwards (draft with the LoRA, causal verify) beside the quadratic round's
                one B(B+1)-token forward (72, 272, 1056 tokens), with "auto" and, where it runs,
                the Mosaic GPU kernel ("pallas"); median ms each. --cpu_smoke: `tiny`, block
                4, context 64.
  generate      `dllm_jax.generate` on the NLD-8B shape (random weights, the rank-128 draft LoRA)
                in modes ar, diffusion and spec at batch 1 and 8, 128 new tokens, block 32, EOS
                off so every row decodes the whole budget: ms per round, forwards/s, tokens/s
                DERIVED from NVIDIA's reported tokens per forward (random weights accept
                nothing meaningful), and the compilations seen when the same mode runs again on
                other prompts of the same bucket (0 in steady state). --cpu_smoke: `tiny`, batch 2,
                16 new tokens, block 8.
  quantized     weight-only int8 and fp8 (docs/quantization.md) against bf16 on the NLD-8B shape:
                the roofline section's model with its linear kernels quantized on the device, AR
                step and 32-token denoising step at batch 1 and 8 against a 1024-token cache;
                median ms, the ratio to bf16, and the int8 roofline (the int8 model's weight bytes
                + the bf16 KV bytes) / the copy bandwidth. Fails when the int8 batch-1 AR step
                is slower than 0.6x bf16 (the target). --cpu_smoke: `tiny`, batch 2, context 64,
                no target.

Writes DIR/gpu_check.json (environment, command line, every section's rows, status and error)
after each section and DIR/gpu_check.md (the tables, also printed) at the end. Each section has a
time budget (the kernel tests' child is killed at it; the in-process sections start no new case
once it is spent and fail with what they have).
"""

from __future__ import annotations

import os

# The kernel tests run in a child process on the same GPU: allocate on demand, not 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.atomic_files import write_text_atomic
from dllm_jax.config import ModelConfig, preset
from dllm_jax.decode import generate, settings_for
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import (LoRAConfig, NLDModel, abstract_model, forward, quantized,
                            with_attention_impl)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils as bu  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("kernel_tests", "parity", "roofline", "quadratic", "generate", "quantized")
KERNEL_TEST_FILES = ("tests/test_kernels_mgpu.py", "tests/test_kernels_triton.py",
                     "tests/test_kernels_gpu_model.py")
KERNEL_IMPLS = ("auto", "pallas", "triton", "cudnn")  # compared with XLA in the parity section
GENERATE_MODES = ("ar", "diffusion", "spec")
ROOFLINE_FORWARDS = ("ar", "denoise", "commit")  # bench_utils.FORWARD_KINDS
# NVIDIA's reported tokens per forward for NLD-8B at block 32 (model card / HF blog headline
# figures): block diffusion about 2.6, linear self-speculation up to 6.4; AR is 1 by definition.
# Used only to derive tokens/s from the measured forwards/s.
NVIDIA_TOKENS_PER_FORWARD = {"ar": 1.0, "diffusion": 2.6, "spec": 6.4}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
QUANTIZED_WEIGHTS = ("bf16", "int8", "fp8")  # the quantized section's models, the baseline first
QUANTIZED_FORWARDS = ("ar", "denoise")
INT8_TARGET = 0.6  # int8 batch-1 AR step / bf16 on the GPU plan


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and time budgets of one run: the GPU check or its CPU smoke version."""
  name: str
  budgets_s: dict[str, float]  # per section
  total_s: float  # the whole run; a section's budget is cut to what is left of it
  parity_cfg: ModelConfig
  parity_prompt: int  # prefill width; the batch's rows hold (prompt, prompt // 5, 2/3 prompt)
  parity_cache: int
  parity_block: int
  roofline_presets: tuple[str, ...]
  context: int
  roofline_block: int
  batches: tuple[int, ...]
  copy_bytes: int
  warmup: int
  repeats: int
  generate_preset: str
  max_new_tokens: int
  generate_block: int
  prompt_lengths: tuple[int, int]  # [lo, hi] per row, within one bucket
  draft_lora: LoRAConfig
  quadratic_blocks: tuple[int, ...]
  quantized_preset: str
  int8_target: float | None  # int8 batch-1 AR time / bf16 must not exceed it (None: not checked)


# NLD-8B attention geometry on a small body, so that kernels see the real head layout.
_PARITY_SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_layers=2,
                     num_heads=32, num_kv_heads=8, head_dim=128)

GPU_PLAN = Plan(
    name="gpu", budgets_s=dict(kernel_tests=110, parity=50, roofline=100, quadratic=60,
                               generate=150, quantized=80),
    total_s=560, parity_cfg=preset("nld-8b").replace(**_PARITY_SHAPE), parity_prompt=96,
    parity_cache=256, parity_block=32, roofline_presets=("nld-8b", "nld-3b"), context=1024,
    roofline_block=32, batches=(1, 8), copy_bytes=2 * 2**30, warmup=2, repeats=10,
    generate_preset="nld-8b", max_new_tokens=128, generate_block=32, prompt_lengths=(70, 120),
    draft_lora=LoRAConfig(rank=128, alpha=512.0), quadratic_blocks=(8, 16, 32),
    quantized_preset="nld-8b", int8_target=INT8_TARGET)
CPU_PLAN = Plan(
    name="cpu_smoke", budgets_s=dict(kernel_tests=120, parity=120, roofline=120, quadratic=90,
                                     generate=180, quantized=120),
    total_s=810, parity_cfg=preset("tiny"), parity_prompt=24, parity_cache=64, parity_block=8,
    roofline_presets=("tiny",), context=64, roofline_block=32, batches=(2,),
    copy_bytes=16 * 2**20, warmup=1, repeats=2, generate_preset="tiny", max_new_tokens=16,
    generate_block=8, prompt_lengths=(9, 16), draft_lora=LoRAConfig(rank=8, alpha=32.0),
    quadratic_blocks=(4,), quantized_preset="tiny", int8_target=None)


class BudgetSpent(Exception):
  """A section's time budget ran out before all its cases started."""


@dataclasses.dataclass
class Budget:
  deadline: float  # time.monotonic()
  seconds: float

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def check(self, done: int, total: int) -> None:
    if self.left() <= 0:
      raise BudgetSpent(f"time budget of {self.seconds:.0f} s spent after {done} of {total} cases")


# --- the model API, in one place ------------------------------------------------------------------

@functools.lru_cache(maxsize=2)  # the roofline's NLD-8B model serves the generate section too
def random_model(cfg: ModelConfig, lora: LoRAConfig, seed: int = 0) -> NLDModel:
  """bf16 model with the model's own random init, made by one jitted program on the device (no
  host copy of the weights)."""
  graphdef, _ = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16, lora=lora))
  make = lambda: nnx.split(NLDModel(cfg, dtype=jnp.bfloat16, lora=lora, rngs=nnx.Rngs(seed)))[1]
  return nnx.merge(graphdef, jax.jit(make)())


def as_float32(model: NLDModel) -> NLDModel:
  """The same weights in an fp32 model (fp32 compute)."""
  graphdef, _ = nnx.split(abstract_model(model.cfg, dtype=jnp.float32, lora=model.lora))
  state = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model))
  return nnx.merge(graphdef, state)


def empty_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
  return KVCache.init(cfg, batch, max_len, dtype)


def run_generate(model: NLDModel, prompts: list[list[int]], *, mode: str, max_new_tokens: int,
                 block_length: int):
  """`dllm_jax.generate` with its default thresholds and EOS off (every row decodes the whole
  budget, so rounds and forwards do not depend on what random weights happen to emit)."""
  return generate(model, prompts, settings_for(mode, skip_other_modes=True,
                                               max_new_tokens=max_new_tokens, eos_token_ids=(),
                                               block_length=block_length))


# --- section 1: compiled-kernel tests -------------------------------------------------------------

_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def kernel_tests_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  on_gpu = plan.name == "gpu"
  cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-m", "gpu",
         *KERNEL_TEST_FILES]
  env = {**os.environ, "JAX_PLATFORMS": "cuda" if on_gpu else "cpu",
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  record["command"] = f"JAX_PLATFORMS={env['JAX_PLATFORMS']} python " + " ".join(cmd[1:])
  timeout = max(1.0, budget.left())
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    out, returncode = proc.stdout, proc.returncode
  except subprocess.TimeoutExpired as e:
    out, returncode = _text(e.stdout), None
  outcomes = [m.groups() for m in map(_OUTCOME.match, out.splitlines()) if m]
  counts = {k: sum(o == k.upper() for _, o in outcomes) for k in ("passed", "failed", "skipped")}
  counts["errors"] = sum(o == "ERROR" for _, o in outcomes)
  record.update(counts, returncode=returncode,
                failures=[ln for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))],
                summary=out.strip().splitlines()[-1] if out.strip() else "")
  if returncode is None:
    raise BudgetSpent(f"pytest killed after {timeout:.0f} s (time budget): "
                      f"{counts['passed']} passed, {counts['failed']} failed so far")
  if returncode != 0 or counts["failed"] or counts["errors"]:
    raise RuntimeError(f"pytest exit {returncode}: {record['summary']}")
  if on_gpu and not counts["passed"]:
    raise RuntimeError(f"no compiled kernel test ran on the GPU: {record['summary']}")


def _text(x: str | bytes | None) -> str:
  return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# --- section 2: whole-model parity ----------------------------------------------------------------

PATTERNS = ("prefill", "decode1", "decode2", "decode3", "denoise", "commit")


def decoding_logits(model: NLDModel, impl: str, plan: Plan) -> list[np.ndarray]:
  """Logits of the decoding patterns (see PATTERNS): a ragged causal prefill (last prompt token of
  each row), three single-token steps, a block with all but its first tokens masked in diffusion
  mode against the cache, and the same block as a causal commit."""
  graphdef, state = nnx.split(with_attention_impl(model, impl))
  run = jax.jit(functools.partial(forward, graphdef), static_argnames=("pattern",))
  cfg, rng, p = model.cfg, np.random.default_rng(0), plan.parity_prompt
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, p)), jnp.int32)
  lengths = jnp.array([p, p // 5, 2 * p // 3], jnp.int32)
  cache = empty_cache(cfg, 3, plan.parity_cache, model.dtype)
  logits, cache = run(state, prompts, pattern="causal", cache=cache, n_new=lengths)
  out = [jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)]
  for _ in range(3):
    token = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 1)), jnp.int32)
    logits, cache = run(state, token, pattern="causal", cache=cache)
    out.append(logits)
  block = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, plan.parity_block)), jnp.int32)
  block = block.at[:, 3:].set(cfg.mask_token_id)
  out.append(run(state, block, pattern="bidirectional", cache=cache)[0])
  out.append(run(state, block, pattern="causal", cache=cache)[0])
  return [np.asarray(x, np.float32) for x in out]


def kernel_unavailable(impl: str) -> str | None:
  """Why an attention impl cannot run here (None: it can). The Mosaic GPU kernel's interpret
  mode is left to the unit tests: at tens of seconds per model run it would dominate the CPU smoke
  run."""
  on_gpu = jax.default_backend() == "gpu"
  if impl == "pallas":
    if not on_gpu:
      return "needs a Hopper GPU"
    capability = str(getattr(jax.devices()[0], "compute_capability", "unknown"))
    return None if capability.startswith("9") else f"needs Hopper (compute capability {capability})"
  if impl == "triton":
    if not on_gpu:
      return "needs CUDA"
    return None if importlib.util.find_spec("jax_triton") else "jax_triton not installed"
  if impl == "cudnn" and not on_gpu:
    return "needs cuDNN"
  return None


def parity_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  model = random_model(plan.parity_cfg, plan.draft_lora)
  with jax.default_matmul_precision("highest"):  # fp32 means fp32, not tf32
    want = decoding_logits(as_float32(model), "xla", plan)
  xla = decoding_logits(model, "xla", plan)
  ref_err = [float(np.max(np.abs(x - w))) for x, w in zip(xla, want)]
  ulp = [float(np.max(np.abs(w))) * 2.0**-8 for w in want]
  cfg = plan.parity_cfg
  record.update(patterns=list(PATTERNS), model=(
      f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} q / "
      f"{cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}, bf16"))
  record["rows"] = rows = [dict(impl="xla (bf16)", status="reference",
                                max_err=max(ref_err), greedy_agreement=_agreement(xla, want))]
  failed = []
  for i, impl in enumerate(KERNEL_IMPLS):
    budget.check(i, len(KERNEL_IMPLS))
    row = dict(impl=impl)
    rows.append(row)
    reason = kernel_unavailable(impl)
    if reason:
      row["status"] = f"skipped: {reason}"
      continue
    try:
      got = decoding_logits(model, impl, plan)
    except Exception as e:  # pylint: disable=broad-except  (one impl, not the whole section)
      row["status"] = f"error: {_one_line(e)}"
      failed.append(f"{impl}: {row['status']}")
      continue
    errs = [float(np.max(np.abs(g - w))) for g, w in zip(got, want)]
    # Worst pattern relative to its bound: 2x XLA's own bf16 error plus a bf16 ulp of the logits.
    use = [e / (2 * r + u) for e, r, u in zip(errs, ref_err, ulp)]
    worst = int(np.argmax(use))
    print(f"[gpu_check]   {impl}: {row_status(use[worst])}, max |err| {max(errs):.3g}",
          flush=True)
    row.update(max_err=max(errs), worst_pattern=PATTERNS[worst], xla_err=ref_err[worst],
               bound_frac=use[worst], greedy_agreement=_agreement(got, want),
               status=row_status(use[worst]))
    if use[worst] > 1:
      failed.append(f"{impl} {PATTERNS[worst]}: error {errs[worst]:.3g} vs xla bf16 "
                    f"{ref_err[worst]:.3g}")
  if failed:
    raise RuntimeError("; ".join(failed))


def row_status(bound_frac: float) -> str:
  return "ok" if bound_frac <= 1 else "exceeds bound"


def _agreement(got: list[np.ndarray], want: list[np.ndarray]) -> float:
  """Fraction of logit rows whose argmax (the greedy token) equals the fp32 one."""
  same = sum(int(np.sum(np.argmax(g, -1) == np.argmax(w, -1))) for g, w in zip(got, want))
  return same / sum(w[..., 0].size for w in want)


# --- section 3: forwards vs the bandwidth roofline ------------------------------------------------

def roofline_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  bandwidth = bu.copy_bandwidth(plan.copy_bytes, repeats=plan.repeats, dtype=jnp.bfloat16)
  record.update(copy_bandwidth_gb_s=bandwidth / 1e9, copy_bytes=plan.copy_bytes, rows=[])
  print(f"[gpu_check] copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
  cases = [(name, b, kind) for name in plan.roofline_presets for b in plan.batches
           for kind in ROOFLINE_FORWARDS]
  for i, (name, batch, kind) in enumerate(cases):
    budget.check(i, len(cases))
    cfg = preset(name)
    model = random_model(cfg, plan.draft_lora)
    tokens = 1 if kind == "ar" else plan.roofline_block
    shape = bu.ForwardShape(batch, tokens, plan.context, plan.context + plan.roofline_block)
    seconds = bu.median(bu.time_forward(model, kind, shape, warmup=plan.warmup,
                                        repeats=plan.repeats))
    need = bu.bytes_per_forward(cfg, shape, jnp.bfloat16)
    roof = (need["weight_bytes"] + need["kv_bytes"]) / bandwidth
    record["rows"].append(dict(
        model=name, attention_impl=cfg.attention_impl, batch=batch, forward=kind, tokens=tokens,
        context=plan.context, ms=1e3 * seconds, roofline_ms=1e3 * roof, vs_roofline=seconds / roof,
        achieved_gb_s=(need["weight_bytes"] + need["kv_bytes"]) / seconds / 1e9, **need))
    print(f"[gpu_check]   {name} batch {batch} {kind}: {1e3 * seconds:.2f} ms, "
          f"{seconds / roof:.2f}x roofline", flush=True)


# --- section 4: one self-speculation round, linear vs quadratic ---------------------------------

def quadratic_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  name = plan.roofline_presets[0]
  model = random_model(preset(name), plan.draft_lora)
  impls = ["auto"] + [i for i in ("pallas",) if kernel_unavailable(i) is None]
  record.update(model=name, context=plan.context, rows=[])
  cases = [(size, impl) for size in plan.quadratic_blocks for impl in impls]
  for i, (size, impl) in enumerate(cases):
    budget.check(i, len(cases))
    cache_len = plan.context + -(-size // 64) * 64

    def ms(kind: str, tokens: int, m: NLDModel) -> float:
      shape = bu.ForwardShape(1, tokens, plan.context, cache_len)
      return 1e3 * bu.median(bu.time_forward(m, kind, shape, warmup=plan.warmup,
                                             repeats=plan.repeats))

    draft = verify = linear = None  # the linear round's forwards are timed once per B, on "auto"
    if impl == "auto":
      draft, verify = ms("draft", size, model), ms("verify", size, model)
      linear = draft + verify
    quadratic = ms("quadratic", size * (size + 1), with_attention_impl(model, impl))
    record["rows"].append(dict(
        block_length=size, impl=impl, quadratic_tokens=size * (size + 1), draft_ms=draft,
        verify_ms=verify, linear_round_ms=linear, quadratic_round_ms=quadratic,
        quadratic_vs_linear=quadratic / linear if linear else None))
    print(f"[gpu_check]   B={size} {impl}: quadratic round {quadratic:.2f} ms"
          + (f", linear round {linear:.2f} ms (draft {draft:.2f} + verify {verify:.2f})"
             if linear else ""), flush=True)


# --- section 5: generate end to end ---------------------------------------------------------------

def generate_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  cfg = preset(plan.generate_preset)
  model = random_model(cfg, plan.draft_lora)
  record.update(model=plan.generate_preset, layers=cfg.num_layers, rows=[],
                draft_lora_rank=plan.draft_lora.rank)
  rng = np.random.default_rng(0)
  cases = [(mode, b) for mode in GENERATE_MODES for b in plan.batches]
  recompiled = []
  for i, (mode, batch) in enumerate(cases):
    budget.check(i, len(cases))
    kw = dict(mode=mode, max_new_tokens=plan.max_new_tokens, block_length=plan.generate_block)
    first = run_generate(model, _prompts(rng, batch, plan, cfg.vocab_size), **kw)
    compiles = []

    def listen(event, duration, **_):
      if event == COMPILE_EVENT:
        compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
      result = run_generate(model, _prompts(rng, batch, plan, cfg.vocab_size), **kw)
    finally:
      jax.monitoring.unregister_event_duration_listener(listen)
    rounds = _rounds(mode, result, plan.generate_block)
    forwards = max(result.decode_nfe)
    fwd_per_s = forwards / result.decode_seconds
    tpf = NVIDIA_TOKENS_PER_FORWARD[mode]
    record["rows"].append(dict(
        mode=mode, batch=batch, new_tokens=plan.max_new_tokens,
        block_length=plan.generate_block if mode != "ar" else 1, rounds=rounds,
        decode_nfe=forwards, decode_s=result.decode_seconds,
        ms_per_round=1e3 * result.decode_seconds / rounds, forwards_per_s=fwd_per_s,
        nvidia_tokens_per_forward=tpf, derived_tokens_per_s=fwd_per_s * tpf,
        derived_tokens_per_s_batch=fwd_per_s * tpf * batch,
        first_compile_s=first.compile_seconds, recompiles=len(compiles)))
    print(f"[gpu_check]   {mode} batch {batch}: {record['rows'][-1]['ms_per_round']:.2f} ms/round, "
          f"{fwd_per_s:.1f} forwards/s, {len(compiles)} recompiles", flush=True)
    if compiles:
      recompiled.append(f"{mode} batch {batch}: {len(compiles)}")
  if recompiled:
    raise RuntimeError("compilations on a second run of the same bucket: " + ", ".join(recompiled))


def _prompts(rng: np.random.Generator, batch: int, plan: Plan, vocab: int) -> list[list[int]]:
  lo, hi = plan.prompt_lengths
  return [rng.integers(0, vocab, int(rng.integers(lo, hi + 1))).tolist() for _ in range(batch)]


def _rounds(mode: str, result, block_length: int) -> int:
  """Decoding rounds of the batch: AR tokens, diffusion blocks, or speculative verify rounds."""
  longest = max(len(t) for t in result.tokens)
  if mode == "ar":
    return longest
  if mode == "diffusion":
    return -(-longest // block_length)
  return max(len(a) for a in result.accepted_lengths)


# --- section 5: weight-only quantized forwards ----------------------------------------------------

def forward_weight_bytes(model: NLDModel, shape: bu.ForwardShape) -> int:
  """Bytes of the parameters one forward reads: all but the LoRA factors (off here) and the
  embedding table, of which only batch*tokens rows are gathered (bench_utils.bytes_per_forward's
  rule, counted from the model's own arrays, so quantized kernels count one byte)."""
  state = nnx.state(model, nnx.Not(nnx.LoRAParam))
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  table = model.encoder.embed_tokens.embedding[...]
  if model.cfg.tie_word_embeddings:
    return total
  return total - table.nbytes + shape.batch * shape.tokens * table.shape[1] * table.dtype.itemsize


def quantized_section(plan: Plan, budget: Budget, record: dict[str, Any]) -> None:
  cfg = preset(plan.quantized_preset)
  base = random_model(cfg, plan.draft_lora)
  models = {w: base if w == "bf16" else quantized(base, w) for w in QUANTIZED_WEIGHTS}
  jax.block_until_ready(nnx.state(models["fp8"]))
  bandwidth = bu.copy_bandwidth(plan.copy_bytes, repeats=plan.repeats, dtype=jnp.bfloat16)
  record.update(model=plan.quantized_preset, copy_bandwidth_gb_s=bandwidth / 1e9, rows=[],
                param_bytes={w: sum(x.nbytes for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
                             for w, m in models.items()}, int8_target=plan.int8_target)
  cases = [(b, kind, w) for b in plan.batches for kind in QUANTIZED_FORWARDS
           for w in QUANTIZED_WEIGHTS]
  bf16_seconds = {}
  for i, (batch, kind, weights) in enumerate(cases):
    budget.check(i, len(cases))
    tokens = 1 if kind == "ar" else plan.roofline_block
    shape = bu.ForwardShape(batch, tokens, plan.context, plan.context + plan.roofline_block)
    seconds = bu.median(bu.time_forward(models[weights], kind, shape, warmup=plan.warmup,
                                        repeats=plan.repeats))
    bf16_seconds.setdefault((batch, kind), seconds)
    kv = bu.bytes_per_forward(cfg, shape, jnp.bfloat16)["kv_bytes"]
    int8_roof = (forward_weight_bytes(models["int8"], shape) + kv) / bandwidth
    record["rows"].append(dict(
        model=plan.quantized_preset, weights=weights, batch=batch, forward=kind, tokens=tokens,
        context=plan.context, ms=1e3 * seconds, vs_bf16=seconds / bf16_seconds[(batch, kind)],
        int8_roofline_ms=1e3 * int8_roof, vs_int8_roofline=seconds / int8_roof,
        weight_bytes=forward_weight_bytes(models[weights], shape), kv_bytes=kv))
    print(f"[gpu_check]   {weights} batch {batch} {kind}: {1e3 * seconds:.2f} ms, "
          f"{record['rows'][-1]['vs_bf16']:.2f}x bf16, {seconds / int8_roof:.2f}x int8 roofline",
          flush=True)
  int8_ar = next(r for r in record["rows"]
                 if (r["weights"], r["batch"], r["forward"]) == ("int8", min(plan.batches), "ar"))
  record["int8_batch1_ar_vs_bf16"] = int8_ar["vs_bf16"]
  if plan.int8_target is not None and int8_ar["vs_bf16"] > plan.int8_target:
    raise RuntimeError(f"int8 batch-{int8_ar['batch']} AR step takes {int8_ar['vs_bf16']:.2f}x "
                       f"the bf16 time (target <= {plan.int8_target})")


# --- driver ---------------------------------------------------------------------------------------

SECTION_FNS: dict[str, Callable[[Plan, Budget, dict[str, Any]], None]] = {
    "kernel_tests": kernel_tests_section, "parity": parity_section,
    "roofline": roofline_section, "quadratic": quadratic_section, "generate": generate_section,
    "quantized": quantized_section}


def run_sections(plan: Plan, sections: tuple[str, ...], report: dict[str, Any],
                 write: Callable[[], None]) -> None:
  start = time.monotonic()
  for name in sections:
    seconds = min(plan.budgets_s[name], max(0.0, plan.total_s - (time.monotonic() - start)))
    budget = Budget(time.monotonic() + seconds, seconds)
    record: dict[str, Any] = {"budget_s": seconds}
    report["sections"][name] = record
    print(f"[gpu_check] {name} (budget {seconds:.0f} s) ...", flush=True)
    t0 = time.monotonic()
    try:
      budget.check(0, 1)
      SECTION_FNS[name](plan, budget, record)
      record["status"], record["error"] = "passed", None
    except Exception as e:  # pylint: disable=broad-except  (one section, not the whole run)
      record["status"], record["error"] = "failed", _one_line(e)
    record["seconds"] = time.monotonic() - t0
    print(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s"
          + (f": {record['error']}" if record["error"] else ""), flush=True)
    write()


def _one_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


PARITY_COLUMNS = [("impl", "impl"), ("status", "status"), ("max_err", "max |err|"),
                  ("worst_pattern", "worst pattern"), ("xla_err", "xla bf16 |err| there"),
                  ("bound_frac", "of bound"), ("greedy_agreement", "same greedy token")]
ROOFLINE_COLUMNS = [("model", "model"), ("batch", "batch"), ("forward", "forward"),
                    ("tokens", "tokens"), ("context", "context"), ("attention_impl", "attention"),
                    ("ms", "ms"), ("roofline_ms", "roofline ms"), ("vs_roofline", "× roofline"),
                    ("achieved_gb_s", "GB/s")]
QUADRATIC_COLUMNS = [("block_length", "B"), ("impl", "attention"),
                     ("quadratic_tokens", "quadratic tokens"), ("draft_ms", "draft ms"),
                     ("verify_ms", "verify ms"), ("linear_round_ms", "linear round ms"),
                     ("quadratic_round_ms", "quadratic round ms"),
                     ("quadratic_vs_linear", "quadratic / linear")]
QUANTIZED_COLUMNS = [("model", "model"), ("weights", "weights"), ("batch", "batch"),
                     ("forward", "forward"), ("tokens", "tokens"), ("context", "context"),
                     ("ms", "ms"), ("vs_bf16", "× bf16"), ("int8_roofline_ms", "int8 roofline ms"),
                     ("vs_int8_roofline", "× int8 roofline")]
GENERATE_COLUMNS = [("mode", "mode"), ("batch", "batch"), ("new_tokens", "new"),
                    ("block_length", "B"), ("rounds", "rounds"), ("decode_nfe", "NFE"),
                    ("ms_per_round", "ms/round"), ("forwards_per_s", "fwd/s"),
                    ("nvidia_tokens_per_forward", "NVIDIA tok/fwd"),
                    ("derived_tokens_per_s", "DERIVED tok/s per row"),
                    ("derived_tokens_per_s_batch", "DERIVED tok/s batch"),
                    ("first_compile_s", "compile s"), ("recompiles", "recompiles")]


def render(report: dict[str, Any]) -> str:
  env = report["environment"]
  lines = [f"# dllm_jax GPU check ({env['date_utc']} UTC, plan {report['plan']})",
           f"device: {env['device']} ({env['jax_backend']}), jax {env['jax']}, "
           f"jaxlib {env['jaxlib']}, flax {env['flax']}",
           f"command: {report['command']}"]
  for name in SECTIONS:
    rec = report["sections"].get(name)
    if rec is None:
      continue
    status = rec["status"] + (f": {rec['error']}" if rec.get("error") else "")
    lines += ["", f"## {name}: {status} ({rec['seconds']:.0f} s of {rec['budget_s']:.0f} s)", ""]
    if name == "kernel_tests" and "passed" in rec:
      lines.append(f"`{rec['command']}`: {rec['passed']} passed, {rec['failed']} failed, "
                   f"{rec['skipped']} skipped, {rec['errors']} errors")
      lines += [f"- {f}" for f in rec["failures"]]
    elif name == "parity" and rec.get("rows"):
      lines += [f"model: {rec['model']}; patterns: {', '.join(rec['patterns'])}; bound per "
                "pattern: 2 × xla bf16 |err| + 1 bf16 ulp of the fp32 logits", "",
                bu.format_table(rec["rows"], PARITY_COLUMNS)]
    elif name == "roofline" and rec.get("rows"):
      lines += [f"copy bandwidth {rec['copy_bandwidth_gb_s']:.1f} GB/s (read + write, "
                f"{rec['copy_bytes'] / 2**30:.3g} GiB); roofline = (weight + KV bytes) / bandwidth",
                "", bu.format_table(rec["rows"], ROOFLINE_COLUMNS)]
    elif name == "quadratic" and rec.get("rows"):
      lines += [f"model {rec['model']}, batch 1, context {rec['context']}: one linear round = draft "
                "(B tokens, LoRA) + verify (B tokens); one quadratic round = one B(B+1)-token "
                "forward", "", bu.format_table(rec["rows"], QUADRATIC_COLUMNS)]
    elif name == "generate" and rec.get("rows"):
      lines += [f"model {rec['model']} ({rec['layers']} layers, random bf16 weights, draft LoRA "
                f"rank {rec['draft_lora_rank']}), EOS off. DERIVED tok/s = fwd/s × NVIDIA's "
                "reported tokens per forward, not a measurement: random weights accept nothing "
                "meaningful. recompiles: compilations during a second run on new prompts of the "
                "same bucket.", "", bu.format_table(rec["rows"], GENERATE_COLUMNS)]
    elif name == "quantized" and rec.get("rows"):
      sizes = ", ".join(f"{w} {b / 2**30:.2f} GiB" for w, b in rec["param_bytes"].items())
      target = ("" if rec["int8_target"] is None else
                f"; target: int8 batch-1 AR <= {rec['int8_target']}x bf16")
      lines += [f"model {rec['model']}, random weights quantized on the device; parameters: "
                f"{sizes}; int8 roofline = (int8 weight bytes + bf16 KV bytes) / "
                f"{rec['copy_bandwidth_gb_s']:.1f} GB/s{target}", "",
                bu.format_table(rec["rows"], QUANTIZED_COLUMNS)]
  return "\n".join(lines)


def write_report(out: pathlib.Path, report: dict[str, Any]) -> None:
  write_text_atomic(out / "gpu_check.json", json.dumps(bu.json_safe(report), indent=1))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", type=pathlib.Path, required=True,
                 help="folder for gpu_check.json and gpu_check.md (created if missing)")
  p.add_argument("--cpu_smoke", action="store_true",
                 help="tiny shapes on the CPU: the same code paths in about a minute")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated subset of {','.join(SECTIONS)}")
  args = p.parse_args(argv)
  sections = tuple(dict.fromkeys(s for s in args.sections.split(",") if s))
  unknown = [s for s in sections if s not in SECTIONS]
  error = None
  if unknown or not sections:
    error = (f"--sections: {unknown[0] if unknown else args.sections!r} is not one of "
             f"{', '.join(SECTIONS)}")
  elif args.out.exists() and not args.out.is_dir():
    error = f"--out={args.out}: exists and is not a directory"
  if args.cpu_smoke:
    jax.config.update("jax_platforms", "cpu")
  elif error is None:
    try:
      backend = repr(jax.default_backend())
    except Exception as e:  # pylint: disable=broad-except  (JAX_PLATFORMS=cuda without a GPU)
      backend = f"unavailable ({_one_line(e)})"
    if backend != "'gpu'":
      error = (f"JAX backend is {backend}, not a CUDA GPU: install jax with CUDA, or pass "
               "--cpu_smoke")
  if error:
    print(f"gpu_check.py: error: {error}", file=sys.stderr)
    return 2
  plan = CPU_PLAN if args.cpu_smoke else GPU_PLAN
  args.out.mkdir(parents=True, exist_ok=True)
  report = {"plan": plan.name,
            "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
            "environment": bu.environment(), "sections": {}}
  run_sections(plan, sections, report, lambda: write_report(args.out, report))
  table = render(report)
  write_text_atomic(args.out / "gpu_check.md", table + "\n")
  print(table)
  return 0 if all(r["status"] == "passed" for r in report["sections"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
