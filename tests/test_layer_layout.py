"""One copy of every weight, read in place: the compiled decode programs copy no weight and slice
no cache, and decoding keeps no second copy of the parameters alive.

The programs are read from XLA's optimized HLO (every computation, fused ones included). A weight
copy shows up as an instruction whose result is as large as a weight matrix; a per-layer slice of
a stacked cache as a slice whose result has one layer's cache shape. Both checks are first shown
to catch the layout they guard against: layers stacked along a leading axis and run by lax.scan.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dllm_jax.config import preset
from dllm_jax.decode import (AR, Diffusion, Quadratic, Spec, bucket_length, cache_length,
                             generate, lower_programs)
from dllm_jax.model import NLDModel, abstract_model

# Weights (>= 512 KB each) larger than any activation of a 16-token prompt and 32-token blocks.
CFG = preset("tiny").replace(hidden_size=512, intermediate_size=1024, num_heads=4, num_kv_heads=4,
                             head_dim=128, num_layers=3, vocab_size=256)
PROMPT, NEW, BLOCK = 16, 32, 32
SETTINGS = [AR(max_new_tokens=NEW), Diffusion(max_new_tokens=NEW, block_length=BLOCK),
            Spec(max_new_tokens=NEW, block_length=BLOCK),
            Quadratic(max_new_tokens=NEW, block_length=8)]  # 72 tokens: activations stay small
# Results that hold no new buffer of their own.
NO_BUFFER = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
             "constant"}
_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "bf16": 16, "f16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")


def _instructions(hlo: str):
  """(opcode, dims, bytes) of every array-valued instruction in an HLO module's text."""
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      dtype, dims, op = m.groups()
      shape = tuple(int(d) for d in dims.split(",") if d)
      yield op, shape, math.prod(shape) * _BITS[dtype] // 8


def _weight_copies(hlo: str, min_weight_bytes: int) -> list[str]:
  return [f"{op}{list(shape)}" for op, shape, nbytes in _instructions(hlo)
          if nbytes >= min_weight_bytes and op not in NO_BUFFER]


def _cache_slices(hlo: str, layer_cache_elements: int) -> list[str]:
  return [f"{op}{list(shape)}" for op, shape, _ in _instructions(hlo)
          if op in ("slice", "dynamic-slice", "gather")
          and math.prod(shape) == layer_cache_elements]


def _min_weight_bytes(model) -> int:
  return min(x.size * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim == 2)


def test_checks_catch_a_scanned_layer_stack():
  """The old layout: weights and cache stacked [layers, ...], one lax.scan step per layer."""
  layers, d, s = 3, 512, 80
  weights = jax.ShapeDtypeStruct((layers, d, d), jnp.float32)
  cache = jax.ShapeDtypeStruct((layers, 1, s, d), jnp.float32)

  def forward(weights, cache, x):
    def layer(h, xs):
      w, kv = xs
      return jnp.tanh(h @ w) + jnp.sum(kv[0, :, :] @ w, axis=0), None
    return jax.lax.scan(layer, x, (weights, cache))[0]

  hlo = jax.jit(forward).lower(weights, cache, jax.ShapeDtypeStruct((1, d), jnp.float32)
                               ).compile().as_text()
  assert _weight_copies(hlo, d * d * 4)
  assert _cache_slices(hlo, s * d)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.mode)
def test_decode_programs_read_weights_and_cache_in_place(settings):
  model = abstract_model(CFG)
  min_weight = _min_weight_bytes(model)
  programs = lower_programs(model, 1, PROMPT, settings)
  slots = cache_length(bucket_length(PROMPT), NEW, settings.block)
  layer_cache = slots * CFG.num_kv_heads * CFG.head_dim  # one layer's k (or v), batch 1
  for name in ("prefill", "decode"):  # "step" is the body of "decode"
    hlo = programs[name].compile().as_text()
    assert not _weight_copies(hlo, min_weight), (name, _weight_copies(hlo, min_weight)[:5])
    assert not _cache_slices(hlo, layer_cache), (name, _cache_slices(hlo, layer_cache)[:5])


def test_parameters_are_held_once():
  model = NLDModel(CFG.replace(num_layers=2), rngs=nnx.Rngs(0))
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  before = sum(x.nbytes for x in jax.live_arrays())
  generate(model, [[1, 2, 3]], AR(max_new_tokens=4))
  after = sum(x.nbytes for x in jax.live_arrays())
  assert after - before < _min_weight_bytes(model), (weights, before, after)
