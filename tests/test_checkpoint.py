"""Loading, converting and exporting checkpoints against transformers and numpy references."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import ckpt_utils as cu
from dllm_jax import checkpoint as ckpt
from dllm_jax import safetensors_io
from dllm_jax.checkpoint import CheckpointError, export_hf, load_pretrained, save_converted
from dllm_jax.config import ModelConfig, preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import convert_checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import cpu_env

CFG = preset("tiny")
RANK, ALPHA = 8, 32.0
# Adapters split along their input (o_proj, down_proj) and output (q_proj, v_proj) under sharding.
MULTI = ("q_proj", "v_proj", "o_proj", "down_proj")
# 80 > 64 positions, so the tiny preset's Llama-4 query scale is active in the comparison.
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 80)).astype(np.int32)


@pytest.fixture(scope="module")
def torch_model():
  return cu.ministral3(CFG)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, torch_model):
  """HF directories in every layout: {name: path}."""
  root = tmp_path_factory.mktemp("ckpts")
  out = {
      "fp32": cu.write_nld_checkpoint(root / "fp32", CFG, torch_model, lora=(RANK, ALPHA)),
      "fp32-multi": cu.write_nld_checkpoint(root / "fp32-multi", CFG, torch_model,
                                            lora=(RANK, ALPHA), lora_targets=MULTI),
      "fp32-sharded": cu.write_nld_checkpoint(root / "fp32-sharded", CFG, torch_model, shards=3),
      "bf16": cu.write_nld_checkpoint(root / "bf16", CFG, torch_model, dtype=torch.bfloat16,
                                      lora=(RANK, ALPHA)),
  }
  torch_model.save_pretrained(root / "llama")  # transformers' own writer: model.* / lm_head.weight
  out["llama"] = root / "llama"
  return out


def _rel_err(x, ref) -> float:
  return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _bitwise_equal(a, b) -> bool:
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and
                                    np.array_equal(x.view(np.uint8), y.view(np.uint8))
                                    for x, y in zip(la, lb))


def _torch_with(model, overrides: dict[str, torch.Tensor]):
  """A copy of the reference model with some weights replaced (HF key names)."""
  clone = cu.ministral3(CFG)
  clone.load_state_dict({**model.state_dict(), **overrides})
  return clone.eval()


# --- loading == torch -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["fp32", "fp32-sharded", "bf16", "llama"])
def test_logits_match_torch(layout, ckpts, torch_model):
  pre = load_pretrained(ckpts[layout], dtype=jnp.float32, lora=False)
  assert pre.config == ModelConfig.from_hf_config(json.loads((ckpts[layout] / "config.json").read_text()))
  ref_model = torch_model
  if layout == "bf16":  # the reference computes in fp32 on the same bf16-rounded weights
    ref_model = _torch_with(torch_model, {k: v.bfloat16().float()
                                          for k, v in torch_model.state_dict().items()})
  ref = cu.torch_logits(ref_model, TOKENS)
  logits, _ = pre.model(jnp.asarray(TOKENS))
  assert _rel_err(logits, ref) <= 1e-4


def test_dtypes_and_tokenizer_dir(ckpts):
  pre = load_pretrained(ckpts["bf16"], dtype=jnp.bfloat16)
  state = nnx.state(pre.model)
  lora_leaves = jax.tree.leaves(nnx.state(pre.model, nnx.LoRAParam))
  base_leaves = jax.tree.leaves(nnx.state(pre.model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  n = 2 * CFG.num_layers  # lora_a and lora_b on each layer's o_proj
  assert len(lora_leaves) == n and all(x.dtype == jnp.float32 for x in lora_leaves)
  assert len(base_leaves) == len(jax.tree.leaves(state)) - n
  assert all(x.dtype == jnp.bfloat16 for x in base_leaves)
  assert pre.tokenizer_dir == ckpts["bf16"]
  assert load_pretrained(ckpts["llama"], dtype=jnp.float32).tokenizer_dir is None


# --- the draft LoRA -----------------------------------------------------------------------------------

def _draft_reference(torch_model, adapter_file: Path, targets=("o_proj",)):
  """The reference model with W + scale * B A merged in numpy for every target (docs/model.md §2.3),
  and the merged weights [out, in] by transformers key."""
  adapter = safetensors.torch.load_file(adapter_file)
  merged = {}
  for i in range(CFG.num_layers):
    for target in targets:
      module = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
      name = f"layers.{i}.{module}.{target}"
      a = adapter[f"base_model.model.encoder.{name}.lora_A.weight"].numpy().astype(np.float64)
      b = adapter[f"base_model.model.encoder.{name}.lora_B.weight"].numpy().astype(np.float64)
      w = torch_model.state_dict()[f"model.{name}.weight"].numpy()
      merged[f"model.{name}.weight"] = w + ALPHA / RANK * b @ a
  return _torch_with(torch_model, {k: torch.tensor(v, dtype=torch.float32)
                                   for k, v in merged.items()}), merged


def test_lora_matches_merged_o_proj(ckpts, torch_model):
  pre = load_pretrained(ckpts["fp32"], dtype=jnp.float32, lora="required")
  assert pre.lora == ckpt.LoRAConfig(RANK, ALPHA)
  draft_model, merged = _draft_reference(
      torch_model, ckpts["fp32"] / "linear_spec_lora" / "adapter_model.safetensors")
  for i, layer in enumerate(pre.model.encoder.layers):
    o_proj = layer.self_attn.o_proj
    # Effective draft kernel from the loaded params, [in, out].
    kernel = (np.asarray(o_proj.kernel[...], np.float64)
              + ALPHA / RANK * np.asarray(o_proj.lora_a[...], np.float64)
              @ np.asarray(o_proj.lora_b[...], np.float64))
    np.testing.assert_allclose(kernel, merged[f"model.layers.{i}.self_attn.o_proj.weight"].T,
                               rtol=0, atol=1e-6)
  draft, _ = pre.model(jnp.asarray(TOKENS), pattern="causal", lora=True)
  assert _rel_err(draft, cu.torch_logits(draft_model, TOKENS)) <= 1e-4
  base, _ = pre.model(jnp.asarray(TOKENS), pattern="causal", lora=False)
  assert _rel_err(base, cu.torch_logits(torch_model, TOKENS)) <= 1e-4


def test_lora_on_several_targets_matches_merged(ckpts, torch_model):
  pre = load_pretrained(ckpts["fp32-multi"], dtype=jnp.float32, lora="required")
  assert pre.lora == ckpt.LoRAConfig(RANK, ALPHA, MULTI)
  draft_model, merged = _draft_reference(
      torch_model, ckpts["fp32-multi"] / "linear_spec_lora" / "adapter_model.safetensors", MULTI)
  layers = pre.model.encoder.layers
  for target in MULTI:
    module = "mlp" if target == "down_proj" else "self_attn"
    for i, layer in enumerate(layers):
      linear = getattr(getattr(layer, module), target)
      kernel = (np.asarray(linear.kernel[...], np.float64)
                + ALPHA / RANK * np.asarray(linear.lora_a[...], np.float64)
                @ np.asarray(linear.lora_b[...], np.float64))
      np.testing.assert_allclose(kernel, merged[f"model.layers.{i}.{module}.{target}.weight"].T,
                                 rtol=0, atol=1e-6, err_msg=f"{target} layer {i}")
  # Projections outside the targets carry no adapter.
  assert not any(hasattr(layer.self_attn.k_proj, "lora_a") or hasattr(layer.mlp.up_proj, "lora_a")
                 for layer in layers)
  draft, _ = pre.model(jnp.asarray(TOKENS), pattern="causal", lora=True)
  assert _rel_err(draft, cu.torch_logits(draft_model, TOKENS)) <= 1e-4
  base, _ = pre.model(jnp.asarray(TOKENS), pattern="causal", lora=False)
  assert _rel_err(base, cu.torch_logits(torch_model, TOKENS)) <= 1e-4


def test_lora_switches(ckpts):
  assert load_pretrained(ckpts["fp32"], dtype=jnp.float32, lora=False).model.lora is None
  assert load_pretrained(ckpts["fp32-sharded"], dtype=jnp.float32).lora is None
  with pytest.raises(CheckpointError, match="linear_spec_lora"):
    load_pretrained(ckpts["fp32-sharded"], lora="required")


# --- orbax cache and HF export round trips ----------------------------------------------------------

def test_convert_script_and_orbax_round_trip(ckpts, tmp_path):
  out = tmp_path / "conv"
  assert convert_checkpoint.main(["--hf", str(ckpts["fp32"]), "--out", str(out)]) == 0
  direct = load_pretrained(ckpts["fp32"], dtype=jnp.bfloat16)
  restored = load_pretrained(out, dtype=jnp.bfloat16)
  assert restored.lora == direct.lora and restored.config == direct.config
  assert restored.tokenizer_dir == out and (out / "tokenizer_config.json").is_file()
  assert _bitwise_equal(direct.model, restored.model)
  assert load_pretrained(out, lora=False).model.lora is None
  assert [p.name for p in tmp_path.iterdir()] == ["conv"]  # no temp dir left behind


def test_save_converted_fp32_round_trip(ckpts, tmp_path):
  pre = load_pretrained(ckpts["bf16"], dtype=jnp.float32)
  save_converted(pre, tmp_path / "conv")
  assert _bitwise_equal(pre.model, load_pretrained(tmp_path / "conv", dtype=jnp.float32).model)
  # Restoring into another dtype casts (these fp32 values are exactly bf16-representable).
  assert _bitwise_equal(load_pretrained(ckpts["bf16"], dtype=jnp.bfloat16).model,
                        load_pretrained(tmp_path / "conv", dtype=jnp.bfloat16).model)


def test_corrupt_converted_dir(ckpts, tmp_path):
  conv = save_converted(load_pretrained(ckpts["fp32"], dtype=jnp.float32), tmp_path / "conv")
  _set_config(conv, intermediate_size=96)
  with pytest.raises(CheckpointError, match=r"params: param 'encoder.layers.0.mlp.down_proj.kernel' "
                     r"has shape \(128, 64\), but config.json implies \(96, 64\)"):
    load_pretrained(conv)
  _set_config(conv, intermediate_size=CFG.intermediate_size)
  shutil.rmtree(conv / "lora")
  assert load_pretrained(conv, lora=False).lora is None
  with pytest.raises(CheckpointError, match="lora: not found"):
    load_pretrained(conv)
  (conv / ckpt.CONVERTED_MARKER).write_text("{")
  with pytest.raises(CheckpointError, match="dllm_jax_converted.json: corrupt"):
    load_pretrained(conv)


@pytest.mark.parametrize("layout,dtype", [("fp32", jnp.float32), ("bf16", jnp.bfloat16),
                                          ("fp32-multi", jnp.float32)])
def test_export_hf_round_trip(layout, dtype, ckpts, tmp_path):
  src = ckpts[layout]
  pre = load_pretrained(src, dtype=dtype)
  out = export_hf(pre.model, tmp_path / "exp", source_dir=src)
  for rel in ("model.safetensors", "linear_spec_lora/adapter_model.safetensors"):
    want, got = safetensors.torch.load_file(src / rel), safetensors.torch.load_file(out / rel)
    assert sorted(want) == sorted(got), rel
    for key in want:
      assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
  adapter = json.loads((out / "linear_spec_lora" / "adapter_config.json").read_text())
  assert adapter["r"] == RANK and adapter["lora_alpha"] == ALPHA
  assert adapter["target_modules"] == list(MULTI if layout == "fp32-multi" else ("o_proj",))
  umask = os.umask(0)
  os.umask(umask)
  assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # as a plain mkdir, not mkdtemp's 0700
  assert ModelConfig.from_hf_config(json.loads((out / "config.json").read_text())) == CFG
  assert (out / "tokenizer_config.json").is_file()
  assert _bitwise_equal(pre.model, load_pretrained(out, dtype=dtype).model)


def test_export_llama_naming_loads_in_transformers(ckpts, torch_model, tmp_path):
  pre = load_pretrained(ckpts["fp32"], dtype=jnp.float32, lora=False)
  out = export_hf(pre.model, tmp_path / "exp", naming="llama")
  reloaded = transformers.Ministral3ForCausalLM.from_pretrained(out).eval()
  for key, value in torch_model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[key], value), key
  np.testing.assert_array_equal(cu.torch_logits(reloaded, TOKENS),
                                cu.torch_logits(torch_model, TOKENS))


# --- corrupt inputs -----------------------------------------------------------------------------------

def _rewrite(path: Path, edit) -> None:
  tensors = safetensors.torch.load_file(path)
  edit(tensors)
  safetensors.torch.save_file(tensors, path)


def _set_config(d: Path, **kw) -> None:
  config = json.loads((d / "config.json").read_text())
  config.update(kw)
  (d / "config.json").write_text(json.dumps(config))


def _set_adapter_config(d: Path, **kw) -> None:
  (d / "linear_spec_lora" / "adapter_config.json").write_text(
      json.dumps(cu.adapter_config(RANK, ALPHA, **kw)))


def _truncate(path: Path, nbytes: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size - nbytes)


W = "model.safetensors"
A = "linear_spec_lora/adapter_model.safetensors"
K0 = "encoder.layers.0.self_attn.k_proj.weight"
CORRUPTIONS = {
    "truncated": (lambda d: _truncate(d / W, 100), "truncated safetensors file"),
    "truncated-header": (lambda d: _truncate(d / W, (d / W).stat().st_size - 20), "truncated"),
    "missing-key": (lambda d: _rewrite(d / W, lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight")),
                    "missing tensor 'encoder.layers.1.mlp.up_proj.weight'"),
    "unexpected-key": (lambda d: _rewrite(d / W, lambda t: t.update(
        {"encoder.layers.0.self_attn.q_norm.weight": torch.ones(32)})),
                       "unexpected tensor 'encoder.layers.0.self_attn.q_norm.weight'"),
    "wrong-shape": (lambda d: _rewrite(d / W, lambda t: t.update({K0: torch.zeros(96, 64)})),
                    rf"'{K0}' in model.safetensors has shape \(96, 64\), but config.json implies "
                    r"\(64, 64\)"),
    "wrong-dtype": (lambda d: _rewrite(d / W, lambda t: t.update(
        {"encoder.norm.weight": torch.ones(64, dtype=torch.int32)})),
                    "'encoder.norm.weight' in model.safetensors has dtype I32"),
    "config-head-dim": (lambda d: _set_config(d, head_dim=16),
                        r"q_proj.weight' in model.safetensors has shape \(128, 64\), but "
                        r"config.json implies \(64, 64\)"),
    "missing-config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "bad-config": (lambda d: _set_config(d, hidden_act="gelu"), "config.json: unsupported hidden_act"),
    "no-weights": (lambda d: (d / W).unlink(), "neither model.safetensors nor"),
    "adapter-targets": (lambda d: _set_adapter_config(d, target_modules=["qkv_proj", "o_proj"]),
                        r"target_modules=\['qkv_proj', 'o_proj'\], expected a non-empty subset"),
    "adapter-targets-tensors": (lambda d: _set_adapter_config(d, target_modules=["q_proj", "o_proj"]),
                                "missing tensor 'base_model.model.encoder.layers.0.self_attn.q_proj"),
    "adapter-dora": (lambda d: _set_adapter_config(d, use_dora=True), "use_dora"),
    "adapter-rslora": (lambda d: _set_adapter_config(d, use_rslora=True), "use_rslora"),
    "adapter-bias": (lambda d: _set_adapter_config(d, bias="all"), "bias='all'"),
    "adapter-rank": (lambda d: _set_adapter_config(d, r=RANK * 2),
                     r"lora_A.weight' in .*adapter_model.safetensors has shape \(8, 128\), "
                     r"but the rank in adapter_config.json .* imply \(16, 128\)"),
    "adapter-missing-key": (lambda d: _rewrite(d / A, lambda t: t.pop(
        "base_model.model.encoder.layers.1.self_attn.o_proj.lora_B.weight")),
                            "missing tensor 'base_model.model.encoder.layers.1"),
    "adapter-truncated": (lambda d: _truncate(d / A, 8), "adapter_model.safetensors: truncated"),
}


@pytest.fixture
def ckpt_copy(ckpts, tmp_path):
  return Path(shutil.copytree(ckpts["fp32"], tmp_path / "hf"))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_input_one_clear_error(name, ckpt_copy, monkeypatch):
  corrupt, pattern = CORRUPTIONS[name]
  corrupt(ckpt_copy)
  # Every fault, truncation included, is visible in headers and configs: no tensor data is read.
  monkeypatch.setattr(safetensors_io.TensorReader, "__call__",
                      lambda *a: pytest.fail("tensor data read before validation finished"))
  with pytest.raises(CheckpointError, match=pattern) as e:
    load_pretrained(ckpt_copy, dtype=jnp.float32)
  assert "\n" not in str(e.value)


def test_bad_index(ckpts, tmp_path):
  d = Path(shutil.copytree(ckpts["fp32-sharded"], tmp_path / "hf"))
  (d / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(CheckpointError, match="shard 'model-00002-of-00003.safetensors' not found"):
    load_pretrained(d)
  index = json.loads((d / safetensors_io.INDEX_NAME).read_text())
  index["weight_map"] = {k: "model-00001-of-00003.safetensors" for k in index["weight_map"]}
  (d / safetensors_io.INDEX_NAME).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="lists tensor .* which does not contain it"):
    load_pretrained(d)


@pytest.mark.parametrize("name", ["truncated", "wrong-shape", "missing-config"])
def test_convert_script_bad_input_exits_2_and_writes_nothing(name, ckpt_copy, tmp_path, capsys):
  CORRUPTIONS[name][0](ckpt_copy)
  out = tmp_path / "out" / "conv"
  assert convert_checkpoint.main(["--hf", str(ckpt_copy), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_interrupted_writes_leave_nothing(ckpts, tmp_path, monkeypatch):
  pre = load_pretrained(ckpts["fp32"], dtype=jnp.float32)

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ckpt, "_copy_side_files", boom)  # after orbax wrote the params
  with pytest.raises(KeyboardInterrupt):
    save_converted(pre, tmp_path / "conv")
  monkeypatch.undo()
  monkeypatch.setattr(ckpt, "_config_json", boom)  # after model.safetensors was written
  with pytest.raises(KeyboardInterrupt):
    export_hf(pre.model, tmp_path / "exp")
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "exists").mkdir()
  with pytest.raises(CheckpointError, match="already exists"):
    save_converted(pre, tmp_path / "exists")


# --- sharded placement (8 host devices in a subprocess) ---------------------------------------------

MESH_WORKER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dllm_jax import sharding
    from dllm_jax.checkpoint import load_pretrained, save_converted
    hf, conv, out = sys.argv[1:4]
    mesh = sharding.make_mesh((2, 4))
    tokens = jnp.asarray(np.load(out)["tokens"])
    results = {}
    for name, path in (("hf", hf), ("orbax", None)):
      if name == "orbax":
        save_converted(load_pretrained(hf, dtype=jnp.float32), conv)
        path = conv
      pre = load_pretrained(path, dtype=jnp.float32, mesh=mesh)
      state = nnx.state(pre.model)
      want = sharding.param_shardings(state, mesh, sharding.mesh_rules(pre.config, mesh))
      for got, expected in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(expected, got.ndim), (got.sharding, expected)
      for lora in (False, True):
        results[f"{name}-{lora}"] = np.asarray(jax.jit(lambda t: pre.model(t, lora=lora)[0])(tokens))
    np.savez(out, **results)
""")


@pytest.mark.slow
def test_load_onto_mesh(ckpts, torch_model, tmp_path):
  draft_model, _ = _draft_reference(
      torch_model, ckpts["fp32"] / "linear_spec_lora" / "adapter_model.safetensors")
  want = {False: cu.torch_logits(torch_model, TOKENS), True: cu.torch_logits(draft_model, TOKENS)}
  npz = tmp_path / "io.npz"
  np.savez(npz, tokens=TOKENS)
  proc = subprocess.run([sys.executable, "-c", MESH_WORKER, str(ckpts["fp32"]),
                         str(tmp_path / "conv"), str(npz)], env=cpu_env(devices=8), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(npz)
  for name in ("hf", "orbax"):
    for lora in (False, True):
      assert _rel_err(got[f"{name}-{lora}"], want[lora]) <= 1e-4, (name, lora)


def test_model_from_state_dict_with_and_without_adapter(ckpts, torch_model):
  """The in-memory path: base tensors alone (zero adapter = identity) or with the PEFT tensors."""
  base = {k: v.numpy() for k, v in cu.nld_state_dict(torch_model, torch.float32).items()}
  adapter_file = ckpts["fp32"] / "linear_spec_lora" / "adapter_model.safetensors"
  adapter = {k: v.numpy() for k, v in safetensors.torch.load_file(adapter_file).items()}
  lora = ckpt.LoRAConfig(RANK, ALPHA)
  ref = cu.torch_logits(torch_model, TOKENS)
  identity = ckpt.model_from_state_dict(CFG, base, lora=lora)
  assert _rel_err(identity(jnp.asarray(TOKENS), lora=True)[0], ref) <= 1e-4
  draft = ckpt.model_from_state_dict(CFG, {**base, **adapter}, lora=lora)
  draft_model, _ = _draft_reference(torch_model, adapter_file)
  assert _rel_err(draft(jnp.asarray(TOKENS), lora=True)[0],
                  cu.torch_logits(draft_model, TOKENS)) <= 1e-4
  with pytest.raises(CheckpointError, match="unexpected tensor 'base_model"):
    ckpt.model_from_state_dict(CFG, {**base, **adapter})
