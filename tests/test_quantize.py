"""Weight-only int8 / fp8 quantization (dllm_jax/quantize.py, docs/quantization.md).

References are independent of the code under test: numpy quantize/dequantize written from the
definition (absmax per output channel; int8 round-half-even, fp8 through ml_dtypes' cast), an fp32
model built from the numpy-dequantized weights, and error bounds derived from the quantization step.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dllm_jax import loader, quantize as quant_lib
from dllm_jax.checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_DIR, CheckpointError,
                                 adapter_config, expected_lora_keys, export_hf, hf_tensor_shapes,
                                 load_pretrained, model_from_state_dict, save_converted)
from dllm_jax.config import preset
from dllm_jax.model import LoRAConfig, NLDModel, abstract_model
from dllm_jax import sharding

CFG = preset("tiny")
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("o_proj", "down_proj"))
FP8_MAX = 448.0


def numpy_quantize(w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """[in, out] float32 -> (values, scales [out]) from the definition."""
  absmax = np.abs(w).max(axis=0)
  scale = absmax / (127.5 if mode == "int8" else FP8_MAX)
  scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), 1.0, scale).astype(np.float32)
  if mode == "int8":
    return np.clip(np.rint(w / scale), -128, 127).astype(np.int8), scale
  return np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale


def numpy_dequantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return values.astype(np.float32) * scale[None, :]


def assert_values_equal(got, want_values, w, scale, mode, err_msg=""):
  """Quantized values equal, except that where w / scale lies on a rounding tie (int8: x.5, e.g.
  the absmax itself at 127.5) within float32 rounding of the division, either neighbour is right."""
  got, want = np.asarray(got).astype(np.float32), want_values.astype(np.float32)
  ratio = np.abs(w / scale[None, :])
  tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-5 * np.maximum(ratio, 1) if mode == "int8" \
      else np.zeros(w.shape, bool)
  np.testing.assert_array_equal(np.where(tie, 0, got), np.where(tie, 0, want), err_msg=err_msg)
  assert (np.abs(got - want)[tie] <= 1).all(), err_msg


@pytest.fixture(scope="module")
def tensors():
  """HF-named fp32 tensors of a tiny NLD model and its draft adapter (non-zero B)."""
  rng = np.random.default_rng(0)
  out = {}
  for key, shape in hf_tensor_shapes(CFG).items():
    scale = 1.0 if key.endswith("norm.weight") else 0.1
    out[key] = ((1.0 if scale == 1.0 else 0.0) + scale * rng.standard_normal(shape)
                ).astype(np.float32)
  state = nnx.state(abstract_model(CFG, lora=LORA))
  lora = {}
  for key, (rule, layer) in expected_lora_keys(CFG, LORA).items():
    var = state
    for p in rule.param_path(layer):
      var = var[p]
    lora[key] = (0.05 * rng.standard_normal(var.value.shape[::-1])).astype(np.float32)
  return out, lora


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tensors):
  base, lora = tensors
  d = tmp_path_factory.mktemp("tiny_hf")
  (d / "config.json").write_text(json.dumps(CFG.to_hf_config()))
  save_file(base, str(d / "model.safetensors"))
  (d / LORA_DIR).mkdir()
  save_file(lora, str(d / LORA_DIR / ADAPTER_WEIGHTS))
  (d / LORA_DIR / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(LORA)))
  return d


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return {mode: load_pretrained(hf_dir, dtype=jnp.float32, quantize=mode).model
          for mode in (None, "int8", "fp8")}


def _linears(model):
  return {".".join(map(str, path)): m for path, m in model.iter_modules()
          if hasattr(m, "kernel")}


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_kernel_matches_numpy(mode):
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((48, 40)) * rng.uniform(0.01, 3, (1, 40))).astype(np.float32)
  w[:, 3] = 0.0  # an all-zero channel keeps scale 1 and values 0
  w[5, 7] = 0.5 * np.abs(w[:, 7]).max() + 1e-3  # values near half a step
  values, scale = quant_lib.quantize_kernel(jnp.asarray(w), mode)
  want_values, want_scale = numpy_quantize(w, mode)
  assert values.dtype == quant_lib.QTYPES[mode] and scale.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(scale), want_scale)
  assert_values_equal(values, want_values, w, want_scale, mode)
  np.testing.assert_allclose(np.asarray(quant_lib.dequantize_kernel(values, scale)),
                             numpy_dequantize(want_values, want_scale),
                             atol=np.asarray(scale).max() * 1.0001)
  np.testing.assert_array_equal(np.asarray(quant_lib.dequantize_kernel(values, scale)),
                                numpy_dequantize(np.asarray(values), want_scale))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_linear_error_within_quantization_step(mode):
  """|x @ (W_q - W)| <= sum_i |x_i| * e_io, with e the largest rounding error of one weight:
  half a step (scale / 2) for int8; for e4m3 (3 mantissa bits) 2^-4 of |w| for normal values and
  half the smallest subnormal step (2^-10 * scale) below."""
  rng = np.random.default_rng(2)
  w = (0.1 * rng.standard_normal((64, 96))).astype(np.float32)
  x = rng.standard_normal((5, 64)).astype(np.float32)
  values, scale = quant_lib.quantize_kernel(jnp.asarray(w), mode)
  y = np.asarray(quant_lib.quantized_matmul(jnp.asarray(x), values, scale, jnp.float32))
  s = np.asarray(scale)[None, :]
  e = np.broadcast_to(s / 2, w.shape) if mode == "int8" else np.maximum(
      2.0 ** -4 * np.abs(w), 2.0 ** -10 * s)
  bound = np.abs(x) @ e
  err = np.abs(y - x @ w)
  assert (err <= bound * (1 + 1e-5) + 1e-6).all()
  assert err.max() > 0  # the quantization did change something


def test_loaded_weights_equal_numpy_quantization(loaded, tensors):
  """Streamed quantization in the loader == numpy on the same checkpoint tensors; the draft LoRA
  and the unquantized parameters (embedding, norms) are untouched."""
  base, _ = tensors
  ref = _linears(loaded[None])
  for mode in ("int8", "fp8"):
    for name, lin in _linears(loaded[mode]).items():
      w = np.asarray(ref[name].kernel[...])
      want_values, want_scale = numpy_quantize(w, mode)
      assert lin.kernel[...].dtype == quant_lib.QTYPES[mode], name
      assert_values_equal(lin.kernel[...], want_values, w, want_scale, mode, err_msg=name)
      # absmax / 127.5 may compile to absmax * (1 / 127.5): one float32 rounding apart.
      np.testing.assert_allclose(np.asarray(lin.kernel_scale[...]), want_scale, rtol=2.5e-7,
                                 err_msg=name)
      if hasattr(lin, "lora_a"):
        np.testing.assert_array_equal(lin.lora_b[...], ref[name].lora_b[...])
        assert lin.lora_a[...].dtype == jnp.float32
    np.testing.assert_array_equal(loaded[mode].encoder.embed_tokens.embedding[...],
                                  base["encoder.embed_tokens.weight"])


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_logits_equal_dequantized_fp32_model(loaded, tensors, mode):
  """The quantized forward, base and draft (LoRA) alike, equals an fp32 model whose linear weights
  are the loaded values (checked against numpy above) dequantized in numpy."""
  base, lora = tensors
  linears = _linears(loaded[mode])
  deq = {}
  for key, w in base.items():
    name = key.removesuffix(".weight")
    if name in linears:
      _, scale = numpy_quantize(np.ascontiguousarray(w.T), mode)
      deq[key] = numpy_dequantize(np.asarray(linears[name].kernel[...]), scale).T.copy()
    else:
      deq[key] = w
  assert sum(k.removesuffix(".weight") in linears for k in deq) == 7 * CFG.num_layers + 1
  ref = model_from_state_dict(CFG, {**deq, **lora}, dtype=jnp.float32, lora=LORA)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 80)), jnp.int32)
  for use_lora in (False, True):
    got, _ = loaded[mode](tokens, lora=use_lora)
    want, _ = ref(tokens, lora=use_lora)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_head_logit_error_bound(loaded, mode):
  """With everything before the head shared, the head's quantization moves logit v by at most
  sum_i |z_i| e_iv <= d * max|g| * max_i e_iv: the final RMSNorm output z = g * zhat has
  ||zhat||_2 = sqrt(d), so ||z||_1 <= sqrt(d) ||z||_2 <= d max|g| (e as in the Linear test)."""
  model = loaded[mode]
  head = model.diffusion_head
  w = np.asarray(_linears(loaded[None])["diffusion_head"].kernel[...])
  graphdef, state = nnx.split(model)
  swapped = nnx.merge(graphdef, state)  # the same arrays; only the head differs below
  plain = abstract_model(CFG, dtype=jnp.float32).diffusion_head
  plain.kernel.value = jnp.asarray(w)
  swapped.diffusion_head = nnx.merge(*nnx.split(plain))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 40)), jnp.int32)
  got, _ = model(tokens)
  want, _ = swapped(tokens)
  s = np.asarray(head.kernel_scale[...])
  e = s / 2 if mode == "int8" else np.maximum(2.0 ** -4 * np.abs(w), 2.0 ** -10 * s).max(axis=0)
  g = np.abs(np.asarray(model.encoder.norm.weight[...])).max()
  bound = CFG.hidden_size * g * e
  err = np.abs(np.asarray(got) - np.asarray(want))
  assert (err <= bound[None, None, :] + 1e-5).all()
  assert err.max() > 0


def test_param_bytes_and_scale_shardings():
  """int8 kernels take a quarter of fp32 (half of bf16) plus 4 bytes per output channel; each
  scale shards like its kernel's output dimension."""
  def nbytes(model):
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  bf16 = abstract_model(CFG, dtype=jnp.bfloat16)
  q = abstract_model(CFG, dtype=jnp.bfloat16, quantize="int8")
  kernels = sum(math.prod(lin.kernel.value.shape) for lin in _linears(bf16).values())
  outs = sum(lin.kernel.value.shape[1] for lin in _linears(bf16).values())
  assert nbytes(bf16) - nbytes(q) == kernels - 4 * outs
  mesh = jax.sharding.AbstractMesh((1, 2), sharding.AXES)
  specs = sharding.param_shardings(nnx.state(q), mesh, sharding.mesh_rules(CFG, mesh))
  layer = specs["encoder"]["layers"][0]
  for module, name in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")):
    kernel_spec = layer[module][name]["kernel"].value.spec
    assert tuple(layer[module][name]["kernel_scale"].value.spec) == (tuple(kernel_spec) + (None,))[1:2]
  assert tuple(specs["diffusion_head"]["kernel_scale"].value.spec) == ("model",)


@pytest.mark.slow
def test_converted_round_trip(tmp_path, hf_dir, loaded):
  """int8 and fp8 stored by the converter restore bit-exactly and load as stored; an unquantized
  converted directory quantizes on restore to the same values; a mismatched mode is one line."""
  for mode in ("int8", "fp8"):
    out = save_converted(load_pretrained(hf_dir, dtype=jnp.float32, quantize=mode), tmp_path / mode)
    assert json.loads((out / "dllm_jax_converted.json").read_text())["quantize"] == mode
    back = loader.load(out, dtype="float32")
    assert back.model.quantize == mode and back.draft_lora == LORA
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back.model), nnx.state(loaded[mode]))
  plain = save_converted(load_pretrained(hf_dir, dtype=jnp.float32), tmp_path / "plain")
  requantized = load_pretrained(plain, dtype=jnp.float32, quantize="int8").model
  jax.tree.map(np.testing.assert_array_equal, nnx.state(requantized), nnx.state(loaded["int8"]))
  with pytest.raises(CheckpointError, match=r"stores int8 weights but quantize='fp8'"):
    load_pretrained(tmp_path / "int8", quantize="fp8")


def test_bad_quantize_and_export(hf_dir, loaded, tmp_path):
  with pytest.raises(ValueError, match=r"^quantize='int4': expected one of int8, fp8 or None$"):
    loader.load(hf_dir, quantize="int4")
  with pytest.raises(ValueError, match="int8-quantized kernels"):
    export_hf(loaded["int8"], tmp_path / "export")
  assert not (tmp_path / "export").exists()


def test_converter_and_cli_knob(tmp_path, hf_dir, capsys):
  """scripts/convert_checkpoint.py --quantize writes a quantized directory; an unknown mode exits
  2 naming it, in the converter and in scripts/generate.py."""
  scripts = Path(__file__).resolve().parents[1] / "scripts"
  sys.path.insert(0, str(scripts))
  import convert_checkpoint  # pylint: disable=g-import-not-at-top
  out = tmp_path / "int8"
  assert convert_checkpoint.main(["--hf", str(hf_dir), "--out", str(out), "--quantize=int8"]) == 0
  assert "int8 linear kernels" in capsys.readouterr().out
  assert loader.load(out).model.quantize == "int8"
  with pytest.raises(SystemExit) as e:
    convert_checkpoint.main(["--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--quantize=int4"])
  assert e.value.code == 2 and "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
  spec = importlib.util.spec_from_file_location("generate_cli_quantize", scripts / "generate.py")
  cli = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = cli  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(cli)
  with pytest.raises(cli.UsageError, match=r"^--config.quantize='int4': expected one of '', "
                                           r"'int8', 'fp8'$"):
    cli.main(["generate.py", "--config=configs/nld.py", f"--config.checkpoint={hf_dir}",
              "--config.quantize=int4", f"--config.output_json={tmp_path / 'o.json'}"])
