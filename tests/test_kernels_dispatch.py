"""The attention_impl switch: the Pallas kernel (Mosaic GPU interpret mode on CPU) behind the
dispatcher, its gradients, "auto"/"cudnn"/"triton" on CPU, and the whole model with "pallas"."""

import functools
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks import reset_gpu_interpret_mode_state

from dllm_jax import attention as A
from dllm_jax.config import preset
from dllm_jax.kv_cache import KVCache
from dllm_jax.model import NLDModel, forward

from conftest import cpu_env


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
  monkeypatch.setenv(A.KERNEL_INTERPRET_ENV, "1")
  reset_gpu_interpret_mode_state()
  yield


def _arr(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def test_pallas_on_cpu_needs_interpret_flag(monkeypatch):
  monkeypatch.delenv(A.KERNEL_INTERPRET_ENV)
  x = jnp.zeros((1, 1, 4, 32))
  with pytest.raises(ValueError, match=A.KERNEL_INTERPRET_ENV):
    A.attention(x, jnp.zeros((1, 32, 2, 32)), jnp.zeros((1, 32, 2, 32)), mask="causal",
                q_offset=jnp.zeros((1,), jnp.int32), impl="pallas")


def test_auto_is_xla_on_cpu_and_cudnn_refuses():
  x = jnp.zeros((1, 1, 4, 32), jnp.bfloat16)
  kv = jnp.zeros((1, 32, 2, 32), jnp.bfloat16)
  assert A.resolve_impl("auto", "causal", x, kv) == "xla"
  with pytest.raises(ValueError, match="cudnn.*backend is cpu"):
    A.attention(x, kv, kv, mask="causal", q_offset=jnp.zeros((1,), jnp.int32), impl="cudnn")


def test_auto_on_a_gpu_picks_the_measured_winner_or_xla(monkeypatch):
  """The choice per backend and call, decided without a GPU: the backend and device kind are
  stubbed as an H100's; what each kernel can take is the dispatcher's own rule."""
  from dllm_jax.kernels import attention_choices as C
  h100 = "NVIDIA H100 80GB HBM3"

  class Device:
    device_kind = h100

  monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(A.jax, "devices", lambda *a: [Device()])
  has_triton = importlib.util.find_spec("jax_triton") is not None

  def q(t, dtype=jnp.bfloat16, d=128):
    return jax.ShapeDtypeStruct((1, t, 32, d), dtype)

  kv = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
  cases = [  # (mask, queries, extra operands) -> the measured class's winner where it applies
      (("causal", q(4096), {}), C.MEASURED[h100]["prefill"]),
      (("causal", q(32), {}), C.MEASURED[h100]["verify"]),
      (("prefix", q(32), {}), C.MEASURED[h100]["prefix"]),
      (("causal", q(1), {}), "triton" if has_triton else "xla"),  # triton needs jax_triton
      (("causal", q(4096, jnp.float32), {}), "xla"),  # cuDNN takes bf16/f16 only
      (("causal", q(32), {"key_valid": object()}), "xla"),  # the kernel takes no key padding
      (("bidirectional", q(32), {}), "xla"),  # nothing measured for this class
  ]
  for (mask, query, kw), want in cases:
    assert A.resolve_impl("auto", mask, query, kv, **kw) == want, (mask, query.shape, kw)
  monkeypatch.setattr(A.jax, "devices", lambda *a: [type("Other", (), {"device_kind": "B200"})()])
  assert A.resolve_impl("auto", "causal", q(4096), kv) == "xla"  # a device nobody measured


def test_model_default_is_auto():
  assert preset("tiny").attention_impl == "auto"
  assert NLDModel(preset("tiny"), rngs=nnx.Rngs(0)).cfg.attention_impl == "auto"


def test_measured_table_is_well_formed_and_classes_follow_query_counts():
  from dllm_jax.kernels import attention_choices as C
  for device, choices in C.MEASURED.items():
    assert set(choices) <= set(C.SHAPE_CLASSES), device
    assert set(choices.values()) <= {"xla", "pallas", "triton", "cudnn"}, device
  # One query is a decode step; a 32-token commit/verify block is memory-bound like decode; a
  # 4k-token causal call is a prefill.
  assert [C.shape_class("causal", t) for t in (1, 32, 64, 65, 4096)] == [
      "decode", "verify", "verify", "prefill", "prefill"]
  assert C.measured_choice("a device nobody measured", "causal", 1) == "xla"


def test_triton_import_error_is_readable():
  try:
    import jax_triton  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    x = jnp.zeros((1, 1, 4, 32), jnp.bfloat16)
    kv = jnp.zeros((1, 32, 2, 32), jnp.bfloat16)
    with pytest.raises(ImportError, match="attention_impl='triton' needs"):
      A.attention(x, kv, kv, mask="causal", q_offset=jnp.zeros((1,), jnp.int32), impl="triton")
  else:
    pytest.skip("jax_triton imports here; the GPU test covers the triton path")


@pytest.mark.parametrize("mask", ["prefix", "block_diff", "causal"])
def test_pallas_gradients_match_xla(mask, rng):
  b, t, h, g, d, s = 2, 8, 4, 2, 32, 32
  q = _arr(rng, b, t, h, d)
  if mask == "block_diff":
    k, v, kw = _arr(rng, b, t, g, d), _arr(rng, b, t, g, d), {"block_size": 2}
  elif mask == "prefix":
    k, v = _arr(rng, b, s, g, d), _arr(rng, b, s, g, d)
    kw = {"kv_len": jnp.array([0, 19], jnp.int32), "block_k": _arr(rng, b, t, g, d),
          "block_v": _arr(rng, b, t, g, d)}
  else:
    k, v = _arr(rng, b, s, g, d), _arr(rng, b, s, g, d)
    kw = {"q_offset": jnp.array([3, 24], jnp.int32)}
  w = _arr(rng, b, t, h, d)
  diff = {name: kw[name] for name in ("block_k", "block_v") if name in kw}
  rest = {name: val for name, val in kw.items() if name not in diff}

  def loss(impl, q, k, v, diff):
    return jnp.sum(A.attention(q, k, v, mask=mask, impl=impl, **diff, **rest) * w)

  got = jax.grad(loss, argnums=(1, 2, 3, 4))("pallas", q, k, v, diff)
  want = jax.grad(loss, argnums=(1, 2, 3, 4))("xla", q, k, v, diff)
  np.testing.assert_allclose(loss("pallas", q, k, v, diff), loss("xla", q, k, v, diff),
                             rtol=1e-5, atol=1e-5)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, e, atol=1e-5)


def _runner(model):
  """A jitted forward: the decode steps share one compiled (interpreted) kernel per shape."""
  graphdef, state = nnx.split(model)
  run = jax.jit(functools.partial(forward, graphdef), static_argnames=("pattern",))
  return lambda tokens, **kw: run(state, tokens, **kw)


def _greedy(run, cfg, prompts, lengths, steps, max_len):
  """Padded prefill, then `steps` greedy single-token decode steps; returns (tokens, logits)."""
  cache = KVCache.init(cfg, prompts.shape[0], max_len)
  logits, cache = run(prompts, pattern="causal", cache=cache, n_new=lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  all_logits, tokens = [last], []
  for _ in range(steps):
    nxt = jnp.argmax(all_logits[-1], -1).astype(jnp.int32)
    tokens.append(nxt)
    logits, cache = run(nxt[:, None], pattern="causal", cache=cache)
    all_logits.append(logits[:, 0])
  return np.stack(tokens, 1), np.stack(all_logits, 1), cache


@pytest.mark.slow
def test_model_pallas_matches_xla_greedy_and_diffusion(rng):
  cfg = preset("tiny").replace(block_size=4)  # block_diff over two blocks stays small
  xla = _runner(NLDModel(cfg, rngs=nnx.Rngs(0)))
  pallas = _runner(NLDModel(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(0)))
  prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  lengths = jnp.array([8, 5], jnp.int32)
  tok_x, log_x, cache_x = _greedy(xla, cfg, prompts, lengths, 4, 64)
  tok_p, log_p, cache_p = _greedy(pallas, cfg, prompts, lengths, 4, 64)
  np.testing.assert_array_equal(tok_p, tok_x)
  np.testing.assert_allclose(log_p, log_x, atol=1e-5)
  # A denoising step against the cached prefix (the "prefix" pattern), then the training mask.
  block = jnp.full((2, 4), cfg.mask_token_id, jnp.int32)
  np.testing.assert_allclose(pallas(block, pattern="bidirectional", cache=cache_p)[0],
                             xla(block, pattern="bidirectional", cache=cache_x)[0], atol=1e-5)
  seq = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 2 * 2 * cfg.block_size)), jnp.int32)
  np.testing.assert_allclose(pallas(seq, pattern="block_diff")[0], xla(seq, pattern="block_diff")[0],
                             atol=1e-5)


_SHARD_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType
from dllm_jax import attention as A
mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
q, k, v = arr(2, 4, 8, 32), arr(2, 64, 2, 32), arr(2, 64, 2, 32)
bk, bv = arr(2, 4, 2, 32), arr(2, 4, 2, 32)
lens = jnp.array([3, 50], jnp.int32)
seen = []
def local(q, k, v, **kw):
  seen.append((q.shape, k.shape, kw["kv_len"].shape, kw["block_k"].shape))
  return A.attention_reference(q, k, v, mask="prefix", **kw)
with jax.set_mesh(mesh):
  got = jax.jit(lambda q, k, v, lens, bk, bv: A._local_shards(
      local, q, k, v, {"kv_len": lens, "block_k": bk, "block_v": bv}))(q, k, v, lens, bk, bv)
want = A.attention_reference(q, k, v, mask="prefix", kv_len=lens, block_k=bk, block_v=bv)
assert seen == [((1, 4, 4, 32), (1, 64, 1, 32), (1,), (1, 4, 1, 32))], seen
np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
print("OK")
"""


def test_kernels_see_local_shards_under_a_mesh():
  # Four host devices need XLA_FLAGS before jax starts, hence a child process. The wrapped
  # function stands in for a kernel (Mosaic GPU interpret mode simulates a single device).
  r = subprocess.run([sys.executable, "-c", _SHARD_CHECK], env=cpu_env(devices=4), capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-3000:]
