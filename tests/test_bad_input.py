"""Bad input, one table per class: each case must be refused with one line naming the culprit.

Library cases call the API that meets the input first; CLI cases run scripts/generate.py or
scripts/convert_checkpoint.py and expect exit code 2, a single `error: ...` line on stderr naming
the culprit and no traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any, Callable

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx
from tokenizers import pre_tokenizers

import ckpt_utils
from dllm_jax import atomic_files
from dllm_jax import checkpoint as ckpt_lib
from dllm_jax import gguf as gguf_lib
from dllm_jax import safetensors_io
from dllm_jax.checkpoint import CheckpointError, export_hf, load_pretrained, save_converted
from dllm_jax.config import ModelConfig, preset
from tiny_nld import write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATE = ROOT / "scripts" / "generate.py"


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  mutate: Callable[[Any], Any]  # valid input -> bad input (on a deep copy)
  culprit: str  # how the one-line error starts (for the CLI: what follows the file name)


def run_generate(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(GENERATE), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def assert_usage_error(proc: subprocess.CompletedProcess, culprit: str) -> None:
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert culprit in lines[0], proc.stderr


# --- model config (config.json) -------------------------------------------------------------------

# The tiny NLD of preset("tiny") in the layout of the published config.json (transformers 5 writes
# `rope_parameters` and mirrors `rope_theta` at the top level; the class default mask id is -1).
TINY_NLD_CONFIG = {
    "architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 256,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    "tie_word_embeddings": False, "sliding_window": None, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 11, "mask_token_id": 100, "block_size": 32,
    "dlm_paradigm": "bidirectional", "ar_loss_weight": 1.0, "dlm_loss_weight": None,
    "use_cache": False,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                        "original_max_position_embeddings": 64, "beta_fast": 32.0,
                        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "llama_4_scaling_beta": 0.1},
    "rope_theta": 1000000.0,
}


def set_(path: str, value: Any) -> Callable[[dict], dict]:
  """Sets the (dotted) field `path`."""
  def mutate(config: dict) -> dict:
    *parents, key = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[key] = value
    return config
  return mutate


def drop(path: str) -> Callable[[dict], dict]:
  """Removes the (dotted) field `path`."""
  def mutate(config: dict) -> dict:
    *parents, key = path.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    del node[key]
    return config
  return mutate


def both(*mutations: Callable[[dict], dict]) -> Callable[[dict], dict]:
  def mutate(config: dict) -> dict:
    for m in mutations:
      config = m(config)
    return config
  return mutate


def legacy_rope_scaling(config: dict) -> dict:
  """The pre-transformers-5 layout: `rope_scaling` with `type`, theta at the top level only."""
  rope = config.pop("rope_parameters")
  del rope["rope_theta"]
  rope["type"] = rope.pop("rope_type")
  config["rope_scaling"] = rope
  return config


MODEL_CONFIG_CASES = [
    # sizes
    Case("vocab_size_missing", drop("vocab_size"), "missing required field 'vocab_size'"),
    Case("vocab_size_zero", set_("vocab_size", 0), "vocab_size=0: must be a positive integer"),
    Case("vocab_size_negative", set_("vocab_size", -256), "vocab_size=-256"),
    Case("vocab_size_string", set_("vocab_size", "256"), "vocab_size='256'"),
    Case("vocab_size_bool", set_("vocab_size", True), "vocab_size=True"),
    Case("vocab_size_float", set_("vocab_size", 256.0), "vocab_size=256.0"),
    Case("vocab_size_beyond_int32", set_("vocab_size", 2**31),
         "vocab_size=2147483648: must be at most"),
    Case("hidden_size_zero", set_("hidden_size", 0), "hidden_size=0"),
    Case("hidden_size_null", set_("hidden_size", None), "hidden_size=None"),
    Case("intermediate_size_negative", set_("intermediate_size", -1), "intermediate_size=-1"),
    Case("num_hidden_layers_zero", set_("num_hidden_layers", 0), "num_hidden_layers=0"),
    Case("num_hidden_layers_string", set_("num_hidden_layers", "2"), "num_hidden_layers='2'"),
    Case("num_hidden_layers_absurd", set_("num_hidden_layers", 10**9),
         "num_hidden_layers=1000000000: must be at most"),
    Case("num_attention_heads_zero", set_("num_attention_heads", 0), "num_attention_heads=0"),
    # Without head_dim it is derived as hidden_size // num_attention_heads.
    Case("num_attention_heads_zero_without_head_dim",
         both(drop("head_dim"), set_("num_attention_heads", 0)), "num_attention_heads=0"),
    Case("num_attention_heads_string_without_head_dim",
         both(drop("head_dim"), set_("num_attention_heads", "4")), "num_attention_heads='4'"),
    Case("num_key_value_heads_zero", set_("num_key_value_heads", 0), "num_key_value_heads=0"),
    Case("num_key_value_heads_not_a_divisor", set_("num_key_value_heads", 3),
         "num_key_value_heads=3: must divide num_attention_heads=4"),
    Case("head_dim_zero", set_("head_dim", 0), "head_dim=0"),
    Case("head_dim_odd", set_("head_dim", 31), "head_dim=31: must be even"),
    Case("rms_norm_eps_zero", set_("rms_norm_eps", 0.0), "rms_norm_eps=0.0: must be > 0"),
    Case("rms_norm_eps_nan", set_("rms_norm_eps", float("nan")), "rms_norm_eps=nan"),
    Case("rms_norm_eps_string", set_("rms_norm_eps", "1e-5"), "rms_norm_eps='1e-5'"),
    # RoPE
    Case("rope_theta_zero", set_("rope_parameters.rope_theta", 0.0),
         "rope_parameters.rope_theta=0.0: must be > 1"),
    Case("rope_theta_one", set_("rope_parameters.rope_theta", 1), "rope_parameters.rope_theta=1"),
    Case("rope_theta_infinite", set_("rope_parameters.rope_theta", float("inf")),
         "rope_parameters.rope_theta=inf: must be a finite number"),
    Case("rope_theta_beyond_float", set_("rope_parameters.rope_theta", 10**400),
         "rope_parameters.rope_theta=1000"),
    Case("top_level_rope_theta_string",
         both(drop("rope_parameters.rope_theta"), set_("rope_theta", "1e6")), "rope_theta='1e6'"),
    Case("rope_parameters_not_an_object", set_("rope_parameters", "yarn"),
         "rope_parameters='yarn': must be an object"),
    Case("rope_type_unknown", set_("rope_parameters.rope_type", "dynamic"),
         "rope_parameters.rope_type='dynamic': must be one of default, yarn"),
    Case("rope_factor_zero", set_("rope_parameters.factor", 0), "rope_parameters.factor=0"),
    Case("rope_factor_negative", set_("rope_parameters.factor", -16.0),
         "rope_parameters.factor=-16.0"),
    Case("rope_factor_string", set_("rope_parameters.factor", "16"), "rope_parameters.factor='16'"),
    Case("yarn_without_original_max_position_embeddings",
         drop("rope_parameters.original_max_position_embeddings"),
         "rope_parameters.original_max_position_embeddings=None: yarn RoPE needs it"),
    Case("original_max_position_embeddings_zero",
         set_("rope_parameters.original_max_position_embeddings", 0),
         "rope_parameters.original_max_position_embeddings=0"),
    Case("beta_fast_negative", set_("rope_parameters.beta_fast", -32.0),
         "rope_parameters.beta_fast=-32.0"),
    Case("beta_slow_string", set_("rope_parameters.beta_slow", "1"),
         "rope_parameters.beta_slow='1'"),
    Case("mscale_nan", set_("rope_parameters.mscale", float("nan")), "rope_parameters.mscale=nan"),
    Case("attention_factor_zero", set_("rope_parameters.attention_factor", 0.0),
         "rope_parameters.attention_factor=0.0"),
    Case("truncate_string", set_("rope_parameters.truncate", "true"),
         "rope_parameters.truncate='true': must be true or false"),
    Case("llama_4_scaling_beta_string", set_("rope_parameters.llama_4_scaling_beta", "0.1"),
         "rope_parameters.llama_4_scaling_beta='0.1'"),
    Case("legacy_rope_scaling_factor_zero",
         both(legacy_rope_scaling, set_("rope_scaling.factor", 0)), "rope_scaling.factor=0"),
    Case("legacy_rope_scaling_type_unknown",
         both(legacy_rope_scaling, set_("rope_scaling.type", "dynamic")),
         "rope_scaling.type='dynamic'"),
    Case("legacy_top_level_rope_theta_zero", both(legacy_rope_scaling, set_("rope_theta", 0)),
         "rope_theta=0"),
    Case("max_position_embeddings_zero", set_("max_position_embeddings", 0),
         "max_position_embeddings=0"),
    Case("max_position_embeddings_beyond_int32", set_("max_position_embeddings", 2**31),
         "max_position_embeddings=2147483648"),
    # special token ids
    Case("mask_token_id_at_vocab_size", set_("mask_token_id", 256),
         "mask_token_id=256: must be a token id in [0, vocab_size=256)"),
    Case("mask_token_id_string", set_("mask_token_id", "100"), "mask_token_id='100'"),
    Case("bos_token_id_beyond_vocab", set_("bos_token_id", 300), "bos_token_id=300"),
    Case("bos_token_id_negative", set_("bos_token_id", -1), "bos_token_id=-1"),
    Case("pad_token_id_at_vocab_size", set_("pad_token_id", 256), "pad_token_id=256"),
    Case("eos_token_id_beyond_vocab", set_("eos_token_id", 256), "eos_token_id=256"),
    Case("eos_token_id_list_with_bad_member", set_("eos_token_id", [11, 999]),
         "eos_token_id=999: must be a token id in [0, vocab_size=256)"),
    Case("eos_token_id_string", set_("eos_token_id", "11"), "eos_token_id='11'"),
    # flags and the diffusion / training fields
    Case("tie_word_embeddings_string", set_("tie_word_embeddings", "false"),
         "tie_word_embeddings='false'"),
    Case("block_size_zero", set_("block_size", 0), "block_size=0"),
    Case("block_size_string", set_("block_size", "32"), "block_size='32'"),
    Case("dlm_paradigm_unknown", set_("dlm_paradigm", "causal"), "dlm_paradigm='causal'"),
    Case("ar_loss_weight_negative", set_("ar_loss_weight", -1.0),
         "ar_loss_weight=-1.0: must be >= 0"),
    Case("dlm_loss_weight_nan", set_("dlm_loss_weight", float("nan")), "dlm_loss_weight=nan"),
    # architectures this model does not implement
    Case("hidden_act_gelu", set_("hidden_act", "gelu"), "unsupported hidden_act 'gelu'"),
    Case("attention_bias", set_("attention_bias", True), "attention/MLP biases are not supported"),
    # the file as a whole
    Case("text_config_heads_zero", lambda c: {"text_config": set_("num_attention_heads", 0)(c)},
         "text_config.num_attention_heads=0"),
    Case("not_an_object", lambda c: [c], "an HF config must be a JSON object"),
]
# A representative handful through the CLI (each is a subprocess).
CLI_MODEL_CONFIG_CASES = (
    "mask_token_id_at_vocab_size", "num_attention_heads_zero_without_head_dim",
    "num_hidden_layers_string", "num_hidden_layers_absurd", "rope_factor_zero",
    "eos_token_id_list_with_bad_member")


def _by_name(cases: list[Case]) -> dict[str, Case]:
  assert len({c.name for c in cases}) == len(cases)
  return {c.name: c for c in cases}


def test_the_valid_config_is_the_tiny_preset():
  """The starting point of every case loads, so each refusal is the mutation's doing."""
  assert ModelConfig.from_hf_config(copy.deepcopy(TINY_NLD_CONFIG)) == preset("tiny")
  # The NLD config class default -1 means "no mask token"; a null eos means "no EOS".
  cfg = ModelConfig.from_hf_config(dict(TINY_NLD_CONFIG, mask_token_id=-1, eos_token_id=None))
  assert cfg.mask_token_id is None and cfg.eos_token_id is None


@pytest.mark.parametrize("case", MODEL_CONFIG_CASES, ids=lambda c: c.name)
def test_bad_model_config_is_refused_by_the_library(case):
  with pytest.raises(ValueError) as e:
    ModelConfig.from_hf_config(case.mutate(copy.deepcopy(TINY_NLD_CONFIG)))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(case.culprit), message


@pytest.mark.parametrize("overrides,culprit", [
    ({"attention_impl": "cuda"}, "attention_impl='cuda': must be one of"),
    ({"num_layers": 0}, "num_layers=0"),  # an override is named as the caller spelled it
    ({"mask_token_id": 256}, "mask_token_id=256"),
])
def test_bad_override_is_refused_under_its_own_name(overrides, culprit):
  with pytest.raises(ValueError) as e:
    ModelConfig.from_hf_config(copy.deepcopy(TINY_NLD_CONFIG), **overrides)
  assert str(e.value).startswith(culprit), str(e.value)


@pytest.mark.parametrize("fields,culprit", [
    ({"num_heads": 0}, "num_heads=0"),
    ({"num_kv_heads": 3}, "num_kv_heads=3: must divide num_heads=4"),
    ({"num_layers": 2.0}, "num_layers=2.0"),
    ({"rope_theta": True}, "rope_theta=True"),
    ({"eos_token_ids": [11]}, "eos_token_ids=[11]: must be a tuple of token ids"),
    ({"eos_token_ids": (11, 256)}, "eos_token_ids=256"),
    ({"mask_token_id": 256}, "mask_token_id=256"),
    ({"attention_impl": "cuda"}, "attention_impl='cuda'"),
    ({"dlm_paradigm": "causal"}, "dlm_paradigm='causal'"),
])
def test_bad_field_is_refused_on_construction(fields, culprit):
  with pytest.raises(ValueError) as e:
    preset("tiny").replace(**fields)
  assert str(e.value).startswith(culprit), str(e.value)


def test_numeric_fields_are_stored_as_python_numbers():
  cfg = preset("tiny").replace(num_layers=np.int64(2), rope_theta=1000000,
                               mask_token_id=np.int32(100))
  assert type(cfg.num_layers) is int and type(cfg.mask_token_id) is int
  assert type(cfg.rope_theta) is float and cfg == preset("tiny")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("tiny_nld"))


@pytest.mark.parametrize("name", CLI_MODEL_CONFIG_CASES)
def test_bad_model_config_is_a_usage_error(tiny_checkpoint, tmp_path, name, cli_module):
  """The weights and tokenizer are fine; the CLI refuses the config.json before reading them. The
  first case runs the script as a child (exit 2, one line on stderr), the others its main() here."""
  case = _by_name(MODEL_CONFIG_CASES)[name]
  ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
  (ckpt / "config.json").write_text(json.dumps(case.mutate(copy.deepcopy(TINY_NLD_CONFIG))))
  args = ("--config=configs/nld.py", f"--config.checkpoint={ckpt}")
  if name == CLI_MODEL_CONFIG_CASES[0]:
    assert_usage_error(run_generate(*args), f"config.json: {case.culprit}")
    return
  with pytest.raises(cli_module.UsageError) as e:
    cli_module.main(["generate.py", *args])
  assert "\n" not in str(e.value) and f"config.json: {case.culprit}" in str(e.value), str(e.value)


# --- weights and storage: shared helpers --------------------------------------------------------

CONVERT = ROOT / "scripts" / "convert_checkpoint.py"
TINY = preset("tiny")
LORA_RANK, LORA_ALPHA = 4, 8.0
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "linear_spec_lora/adapter_model.safetensors"


# Execs the rest of its argv with files limited to argv[1] bytes: a write past the limit fails with
# EFBIG (the signal it would raise is ignored; both survive exec), as writes to a full disk fail
# with ENOSPC.
FILE_SIZE_LIMIT = textwrap.dedent("""
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
""")


def run_convert(*args: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  limit = ([sys.executable, "-c", FILE_SIZE_LIMIT, str(file_size_limit)]
           if file_size_limit is not None else [sys.executable])
  return subprocess.run([*limit, "-P", str(CONVERT), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def assert_one_line(e: pytest.ExceptionInfo, start: str, *parts: str) -> None:
  message = str(e.value)
  assert "\n" not in message, message
  assert message.startswith(start), message
  for part in parts:
    assert part in message, message


def assert_nothing_written(out: pathlib.Path) -> None:
  """Neither the output nor a temporary sibling of it (`.{name}.partial-*`) exists."""
  assert not out.exists()
  assert not list(out.parent.glob(f".{out.name}.partial-*")), list(out.parent.iterdir())


def hf_copy(tiny_checkpoint: pathlib.Path, dst: pathlib.Path, dtype: torch.dtype = torch.float32,
            shards: int = 1, adapter: bool = False) -> pathlib.Path:
  """The tiny checkpoint with its weights in `dtype`, maybe sharded and with a draft adapter."""
  d = shutil.copytree(tiny_checkpoint, dst)
  tensors = safetensors.torch.load_file(d / WEIGHTS)
  (d / WEIGHTS).unlink()
  ckpt_utils.save_tensors(d, {k: v.to(dtype) for k, v in tensors.items()}, shards)
  if adapter:
    ckpt_utils.write_adapter(d, ckpt_utils.lora_tensors(TINY, LORA_RANK),
                             ckpt_utils.adapter_config(LORA_RANK, LORA_ALPHA))
  return d


def file_of(d: pathlib.Path, key: str) -> pathlib.Path:
  """The safetensors file of `d` that holds `key` (adapter, single file or shard)."""
  if key.startswith("base_model."):
    return d / ADAPTER_WEIGHTS
  index = d / safetensors_io.INDEX_NAME
  if index.exists():
    return d / json.loads(index.read_text())["weight_map"][key]
  return d / WEIGHTS


def set_element(d: pathlib.Path, key: str, index: tuple[int, ...], value: float) -> None:
  """Rewrites the file holding `key` (with the reference writer) with tensor[index] = value."""
  path = file_of(d, key)
  tensors = safetensors.torch.load_file(path)
  tensors[key][index] = value
  safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def rule_of(key: str, cfg: ModelConfig = TINY):
  """(key-table rule, layer) of an HF or PEFT key (either naming) of a model of `cfg`."""
  lora = ckpt_lib.LoRAConfig(LORA_RANK, LORA_ALPHA)
  naming = "llama" if key.startswith("model.") else "nld"
  return {**ckpt_lib.expected_hf_keys(cfg, naming),
          **ckpt_lib.expected_lora_keys(cfg, lora, naming)}[key]


def param_as_hf(model, key: str) -> np.ndarray:
  """The loaded parameter of `key` in the file's [out, in] orientation, as float32."""
  rule, layer = rule_of(key, model.cfg)
  value = nnx.state(model)
  for part in rule.param_path(layer):
    value = value[part]
  value = np.asarray(value.value, np.float32)
  return value.T if rule.transpose else value


def param_name(key: str) -> str:
  """The name a converted directory stores `key` under (its nnx state path, dotted)."""
  rule, layer = rule_of(key)
  return ".".join(str(p) for p in rule.param_path(layer))


# --- weights that are not numbers: NaN / Inf ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BadValue:
  name: str
  key: str  # the HF tensor that holds the value
  index: tuple[int, ...]  # where, in the file's [out, in] layout
  value: float
  dtype: torch.dtype = torch.float32  # of every tensor in the file
  shards: int = 1


K = "encoder.layers.1"
NONFINITE_CASES = [
    BadValue("nan_in_embedding", "encoder.embed_tokens.weight", (0, 0), float("nan")),
    BadValue("inf_in_last_element_of_q_proj", f"{K}.self_attn.q_proj.weight", (127, 63),
             float("inf")),
    BadValue("negative_inf_in_norm_bf16", "encoder.layers.0.input_layernorm.weight", (17,),
             float("-inf"), torch.bfloat16),
    BadValue("nan_in_head_bf16", "diffusion_head.weight", (255, 63), float("nan"), torch.bfloat16),
    BadValue("inf_in_down_proj_fp16", f"{K}.mlp.down_proj.weight", (5, 100), float("inf"),
             torch.float16),
    BadValue("nan_in_a_shard", f"{K}.mlp.up_proj.weight", (64, 3), float("nan"), shards=3),
    BadValue("nan_in_the_draft_adapter",
             f"base_model.model.{K}.self_attn.o_proj.lora_B.weight", (10, 2), float("nan")),
]
NONFINITE_CONVERTED = ("nan_in_embedding", "inf_in_last_element_of_q_proj",
                       "nan_in_the_draft_adapter")
NONFINITE_GGUF = {  # GGUF tensor -> (its HF name, element index)
    "token_embd.weight": ("model.embed_tokens.weight", (3, 7)),
    "blk.1.attn_q.weight": ("model.layers.1.self_attn.q_proj.weight", (40, 9)),
    "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", (0, 63)),  # stored as F16
}


@pytest.fixture
def nonfinite_dir(request, tiny_checkpoint, tmp_path):
  case = _by_name(NONFINITE_CASES)[request.param]
  d = hf_copy(tiny_checkpoint, tmp_path / "hf", case.dtype, case.shards,
              adapter=case.key.startswith("base_model."))
  set_element(d, case.key, case.index, case.value)
  return case, d


def _matches(x: float, value: float) -> bool:
  return bool(np.isnan(x)) if np.isnan(value) else x == value


@pytest.mark.parametrize("nonfinite_dir", [c.name for c in NONFINITE_CASES], indirect=True)
def test_nonfinite_weights_are_refused_naming_tensor_and_file(nonfinite_dir):
  case, d = nonfinite_dir
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d, dtype=jnp.float32)
  assert_one_line(e, f"tensor {case.key!r} in {file_of(d, case.key)} holds NaN or Inf values",
                  "allow_nonfinite")
  # The override loads the value where the file has it.
  pre = load_pretrained(d, dtype=jnp.float32, allow_nonfinite=True)
  loaded = param_as_hf(pre.model, case.key)
  assert _matches(loaded[case.index], case.value)
  others = np.delete(loaded.reshape(-1), np.ravel_multi_index(case.index, loaded.shape))
  assert np.isfinite(others).all()


@pytest.mark.parametrize("nonfinite_dir", NONFINITE_CONVERTED, indirect=True)
def test_nonfinite_params_in_a_converted_dir_are_refused(nonfinite_dir, tmp_path):
  case, d = nonfinite_dir
  conv = save_converted(load_pretrained(d, dtype=jnp.float32, allow_nonfinite=True),
                        tmp_path / "conv")
  # The draft adapter's factors stay float32 whatever the model's dtype.
  item, dtype = (("lora", "float32") if case.key.startswith("base_model.")
                 else ("params", "bfloat16"))
  with pytest.raises(CheckpointError) as e:
    load_pretrained(conv)
  assert_one_line(e, f"{conv / item}: param {param_name(case.key)!r} holds NaN or Inf values as "
                  f"{dtype}", "allow_nonfinite")
  pre = load_pretrained(conv, dtype=jnp.float32, allow_nonfinite=True)
  assert _matches(param_as_hf(pre.model, case.key)[case.index], case.value)


def test_a_cast_that_overflows_float16_is_refused(tiny_checkpoint, tmp_path):
  """A finite float32 weight beyond float16's range becomes Inf in the cast, on either path."""
  key = f"{K}.mlp.gate_proj.weight"
  d = hf_copy(tiny_checkpoint, tmp_path / "hf")
  set_element(d, key, (1, 2), 1e6)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d, dtype=jnp.float16)
  assert_one_line(e, f"tensor {key!r} in {d / WEIGHTS} overflows float16")
  conv = save_converted(load_pretrained(d, dtype=jnp.float32), tmp_path / "conv")
  with pytest.raises(CheckpointError) as e:
    load_pretrained(conv, dtype=jnp.float16)
  assert_one_line(e, f"{conv / 'params'}: param {param_name(key)!r} holds NaN or Inf values as "
                  "float16")
  assert param_as_hf(load_pretrained(d, dtype=jnp.float16, allow_nonfinite=True).model,
                     key)[1, 2] == np.inf


def test_nonfinite_weights_are_a_usage_error_of_the_converter(tiny_checkpoint, tmp_path):
  case = _by_name(NONFINITE_CASES)["nan_in_head_bf16"]
  d = hf_copy(tiny_checkpoint, tmp_path / "hf", case.dtype)
  set_element(d, case.key, case.index, case.value)
  out = tmp_path / "out" / "conv"
  proc = run_convert(f"--hf={d}", f"--out={out}")
  assert_usage_error(proc, f"tensor {case.key!r} in {d / WEIGHTS} holds NaN or Inf values")
  assert_nothing_written(out)
  proc = run_convert(f"--hf={d}", f"--out={out}", "--allow_nonfinite")
  assert proc.returncode == 0, proc.stderr
  assert np.isnan(param_as_hf(load_pretrained(out, allow_nonfinite=True).model,
                              case.key)[case.index])


# --- GGUF: a tiny llama file written with the gguf package's writer -----------------------------

GGUF_LAYERS, GGUF_VOCAB = 2, 257


def gguf_tensors(layers: int = GGUF_LAYERS) -> dict[str, np.ndarray]:
  """GGUF-named weights of a tiny llama (hidden 64, 4 heads of 16, 2 kv heads, ffn 128) in the
  [out, in] layout; ffn_up is float16 (stored as F16), the rest float32."""
  rng = np.random.default_rng(0)
  d, f, q, kv = 64, 128, 64, 32
  out = {"token_embd.weight": (GGUF_VOCAB, d), "output_norm.weight": (d,),
         "output.weight": (GGUF_VOCAB, d)}
  for i in range(layers):
    out.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.attn_q.weight": (q, d),
                f"blk.{i}.attn_k.weight": (kv, d), f"blk.{i}.attn_v.weight": (kv, d),
                f"blk.{i}.attn_output.weight": (d, q), f"blk.{i}.ffn_norm.weight": (d,),
                f"blk.{i}.ffn_gate.weight": (f, d), f"blk.{i}.ffn_up.weight": (f, d),
                f"blk.{i}.ffn_down.weight": (d, f)})
  return {name: (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(
      np.float16 if "ffn_up" in name else np.float32) for name, shape in out.items()}


def write_tiny_gguf(path: pathlib.Path, tensors: dict[str, np.ndarray],
                    block_count: int = GGUF_LAYERS) -> str:
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(block_count)
  w.add_embedding_length(64)
  w.add_feed_forward_length(128)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_key_length(16)
  w.add_value_length(16)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_context_length(256)
  w.add_rope_freq_base(10000.0)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt-2")
  w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt"])  # 256 bytes + 1 merge
  w.add_token_types([1] * GGUF_VOCAB)
  w.add_token_merges(["Ġ t"])
  w.add_eos_token_id(1)
  for name, value in tensors.items():
    w.add_tensor(name, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_the_tiny_gguf_loads(tmp_path):
  """The starting point of the GGUF cases is valid, so each refusal is the bad value's doing."""
  tensors = gguf_tensors()
  ckpt = gguf_lib.load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", tensors))
  model = gguf_lib.model_from_gguf(ckpt)
  np.testing.assert_array_equal(np.asarray(model.encoder.embed_tokens.embedding[...]),
                                tensors["token_embd.weight"])
  np.testing.assert_array_equal(np.asarray(model.encoder.layers[1].mlp.up_proj.kernel[...]),
                                tensors["blk.1.ffn_up.weight"].astype(np.float32).T)


@pytest.mark.parametrize("gguf_name", sorted(NONFINITE_GGUF))
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gguf_tensors_are_refused(tmp_path, gguf_name, value):
  hf_key, index = NONFINITE_GGUF[gguf_name]
  tensors = gguf_tensors()
  tensors[gguf_name][index] = value
  path = write_tiny_gguf(tmp_path / "tiny.gguf", tensors)
  ckpt = gguf_lib.load_gguf(path)
  with pytest.raises(CheckpointError) as e:
    gguf_lib.model_from_gguf(ckpt)
  assert_one_line(e, f"tensor {hf_key!r} in {path} holds NaN or Inf values", "allow_nonfinite")
  # The override loads it (q rows move: llama.cpp permutes them, the loader undoes it).
  loaded = param_as_hf(gguf_lib.model_from_gguf(ckpt, allow_nonfinite=True), hf_key)
  assert np.count_nonzero(~np.isfinite(loaded)) == 1
  assert np.isnan(loaded).any() == np.isnan(value)


# --- storage: a damaged converted directory -----------------------------------------------------

@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
  return save_converted(load_pretrained(tiny_checkpoint, dtype=jnp.float32),
                        tmp_path_factory.mktemp("converted") / "conv")


DAMAGED_PARAM = "encoder.layers.1.mlp.up_proj.kernel"


def _data_file(param_dir: pathlib.Path) -> pathlib.Path:
  """The file that holds the array's bytes (the largest of the OCDBT data files)."""
  return max((param_dir / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)


def _truncate_to(path: pathlib.Path, fraction: float) -> None:
  with open(path, "r+b") as f:
    f.truncate(int(path.stat().st_size * fraction))


DAMAGED_CONVERTED_CASES = [
    Case("data_file_deleted", lambda p: _data_file(p).unlink(),
         f"cannot restore param {DAMAGED_PARAM!r}"),
    Case("data_file_truncated", lambda p: _truncate_to(_data_file(p), 0.5),
         f"cannot restore param {DAMAGED_PARAM!r}"),
    Case("data_file_emptied", lambda p: _truncate_to(_data_file(p), 0),
         f"cannot restore param {DAMAGED_PARAM!r}"),
    Case("array_metadata_truncated",
         lambda p: _truncate_to(p / "array_metadatas" / "process_0", 0.5),
         f"cannot restore param {DAMAGED_PARAM!r}"),
    Case("metadata_deleted", lambda p: (p / "_METADATA").unlink(),
         f"{DAMAGED_PARAM}: unreadable orbax metadata"),
    Case("manifest_deleted", lambda p: (p / "manifest.ocdbt").unlink(),
         f"{DAMAGED_PARAM}: unreadable orbax metadata"),
    Case("param_dir_deleted", shutil.rmtree, f"is missing tensor {DAMAGED_PARAM!r}"),
]


@pytest.mark.parametrize("case", DAMAGED_CONVERTED_CASES, ids=lambda c: c.name)
def test_damaged_converted_dir_is_one_line_naming_param_and_dir(converted, tmp_path, case):
  conv = shutil.copytree(converted, tmp_path / "conv")
  case.mutate(conv / "params" / DAMAGED_PARAM)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(conv, dtype=jnp.float32)
  assert_one_line(e, str(conv / "params"), case.culprit)


# --- storage: failed reads -------------------------------------------------------------------------

def _open_failing_from(nth: int, error: int):
  """`open` for safetensors_io whose `nth` and later calls fail with `error` (1: the first)."""
  calls = []

  def fake_open(path, *args, **kwargs):
    calls.append(path)
    if len(calls) >= nth:
      raise OSError(error, os.strerror(error), str(path))
    return open(path, *args, **kwargs)
  return fake_open


def _read_text_not_permitted(self, *args, **kwargs):
  raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))


READ_FAILURE_CASES = [
    Case("config_not_permitted",
         lambda mp: mp.setattr(pathlib.Path, "read_text", _read_text_not_permitted),
         "config.json: cannot read (Permission denied)"),
    Case("header_io_error",
         lambda mp: mp.setattr(safetensors_io, "open", _open_failing_from(1, errno.EIO),
                               raising=False),
         f"{WEIGHTS}: cannot read (Input/output error)"),
    Case("tensor_data_io_error",  # the header was read; the data read fails
         lambda mp: mp.setattr(safetensors_io, "open", _open_failing_from(2, errno.EIO),
                               raising=False),
         f"{WEIGHTS}: cannot read (Input/output error)"),
]


@pytest.mark.parametrize("case", READ_FAILURE_CASES, ids=lambda c: c.name)
def test_failed_read_is_one_line_naming_the_file(tiny_checkpoint, monkeypatch, case):
  case.mutate(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(tiny_checkpoint, dtype=jnp.float32)
  monkeypatch.undo()
  assert_one_line(e, f"{tiny_checkpoint}/{case.culprit}")


# --- storage: failed writes (a full disk, a permission) -----------------------------------------

def _enospc(path=None) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


class _FullFile:
  """A binary file whose writes fail once `room` bytes are written, as on a full disk."""

  def __init__(self, path, mode="wb", room: int = 100):
    self._f, self._room = open(path, mode), room  # pylint: disable=consider-using-with

  def write(self, data) -> int:
    n = memoryview(data).nbytes
    if n > self._room:
      self._f.write(bytes(memoryview(data).cast("B")[:self._room]))
      raise _enospc()
    self._room -= n
    return self._f.write(data)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _fail_write_text(name: str, make_error: Callable[[str], OSError]):
  real = pathlib.Path.write_text

  def write_text(self, *args, **kwargs):
    if self.name == name:
      real(self, "{", **{k: v for k, v in kwargs.items() if k == "encoding"})  # half written
      raise make_error(str(self))
    return real(self, *args, **kwargs)
  return write_text


def _copy_not_permitted(src, dst):
  """shutil.copy2 onto a destination the process may not write."""
  raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))


def _mkdtemp_not_permitted(prefix: str, dir: str):  # pylint: disable=redefined-builtin
  """tempfile.mkdtemp in a directory the process may not write to."""
  raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "x1"))


@dataclasses.dataclass(frozen=True)
class WriteFailure:
  name: str
  writer: str  # "convert" (save_converted) or "export" (export_hf)
  patch: Callable[[pytest.MonkeyPatch], None]
  culprit: str  # what follows "{out}: not written ("


WRITE_FAILURE_CASES = [
    WriteFailure("config_json_on_a_full_disk", "convert",
                 lambda mp: mp.setattr(pathlib.Path, "write_text",
                                       _fail_write_text("config.json", _enospc)),
                 "No space left on device: {out}/config.json)"),
    WriteFailure("marker_on_a_full_disk", "convert",
                 lambda mp: mp.setattr(pathlib.Path, "write_text", _fail_write_text(
                     ckpt_lib.CONVERTED_MARKER, _enospc)),
                 f"No space left on device: {{out}}/{ckpt_lib.CONVERTED_MARKER})"),
    WriteFailure("tokenizer_copy_not_permitted", "convert",
                 lambda mp: mp.setattr(ckpt_lib.shutil, "copy2", _copy_not_permitted),
                 "Permission denied: {out}/tokenizer"),
    WriteFailure("weights_on_a_full_disk", "export",
                 lambda mp: mp.setattr(safetensors_io, "open", _FullFile, raising=False),
                 "No space left on device)"),
    WriteFailure("parent_not_writable", "convert",
                 lambda mp: mp.setattr(atomic_files.tempfile, "mkdtemp", _mkdtemp_not_permitted),
                 "Permission denied: {parent})"),
]


@pytest.fixture(scope="module")
def tiny_pretrained(tiny_checkpoint):
  return load_pretrained(tiny_checkpoint, dtype=jnp.float32)


@pytest.mark.parametrize("case", WRITE_FAILURE_CASES, ids=lambda c: c.name)
def test_failed_write_is_one_line_and_leaves_nothing(tiny_pretrained, tmp_path, monkeypatch,
                                                     case):
  out = tmp_path / "out" / "result"
  out.parent.mkdir()
  case.patch(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    if case.writer == "convert":
      save_converted(tiny_pretrained, out)
    else:
      export_hf(tiny_pretrained.model, out)
  monkeypatch.undo()
  assert_one_line(e, f"{out}: not written (",
                  case.culprit.format(out=out, parent=out.parent))
  assert_nothing_written(out)


def test_converter_on_a_full_disk_exits_2_and_leaves_nothing(tiny_checkpoint, tmp_path):
  """A real failed write inside orbax (TensorStore), not a simulated one."""
  out = tmp_path / "out" / "conv"
  proc = run_convert(f"--hf={tiny_checkpoint}", f"--out={out}", "--dtype=float32",
                     file_size_limit=16384)
  assert_usage_error(proc, f"{out}: not written (saving params/")
  assert "File too large" in proc.stderr
  assert_nothing_written(out)


# --- storage: two writers racing to the same output ---------------------------------------------

def test_racing_conversion_keeps_the_winner_whole(tiny_pretrained, tmp_path, monkeypatch):
  """The other writer completes its directory just before this one's rename."""
  other = load_pretrained(write_checkpoint(tmp_path / "other", seed=1), dtype=jnp.float32)
  out = tmp_path / "conv"
  real_rename = os.rename
  raced = []

  def rename_after_the_other_writer(src, dst):
    if not raced:
      raced.append(True)
      save_converted(other, out)  # its own rename goes through (raced is set)
    real_rename(src, dst)

  monkeypatch.setattr(atomic_files.os, "rename", rename_after_the_other_writer)
  with pytest.raises(CheckpointError) as e:
    save_converted(tiny_pretrained, out)
  monkeypatch.undo()
  assert_one_line(e, f"{out}: created meanwhile by another writer")
  assert raced and not list(tmp_path.glob(".conv.partial-*"))
  won = load_pretrained(out, dtype=jnp.float32).model
  for path, var in nnx.to_flat_state(nnx.state(other.model)):
    got = nnx.state(won)
    for part in path:
      got = got[part]
    np.testing.assert_array_equal(np.asarray(got.value), np.asarray(var.value), err_msg=str(path))


def test_two_converters_racing_to_one_output(tiny_checkpoint, tmp_path):
  """Two real processes: one writes the directory, the other exits 2 with one line."""
  out = tmp_path / "conv"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-P", str(CONVERT), f"--hf={tiny_checkpoint}",
                             f"--out={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT) for _ in range(2)]
  results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
  codes = sorted(rc for rc, _, _ in results)
  assert codes == [0, 2], results
  _, _, err = next(r for r in results if r[0] == 2)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {out}: "), err
  assert "created meanwhile" in lines[0] or "already exists" in lines[0], err
  assert not list(tmp_path.glob(".conv.partial-*"))
  load_pretrained(out, dtype=jnp.float32)


# --- storage: leftovers of a killed writer ------------------------------------------------------

def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@dataclasses.dataclass(frozen=True)
class Leftover:
  name: str
  entry: Callable[[str, int], str]  # (host, dead pid) -> the sibling's name beside "conv"
  removed: bool


LEFTOVER_CASES = [
    Leftover("killed_writer_on_this_host", lambda host, dead: f".conv.partial-{host}-{dead}-ab12_x",
             True),
    Leftover("live_writer_on_this_host",
             lambda host, dead: f".conv.partial-{host}-{os.getpid()}-ab12_x", False),
    Leftover("writer_on_another_host", lambda host, dead: f".conv.partial-not-{host}-{dead}-ab12",
             False),
    Leftover("no_owner_in_the_name", lambda host, dead: ".conv.partial-ab12_xyz", False),
    Leftover("another_output", lambda host, dead: f".conv2.partial-{host}-{dead}-ab12_x", False),
]


@pytest.mark.parametrize("case", LEFTOVER_CASES, ids=lambda c: c.name)
def test_leftovers_of_dead_writers_are_removed_by_the_next_one(tiny_pretrained, tmp_path, case):
  leftover = tmp_path / case.entry(socket.gethostname(), _dead_pid())
  (leftover / "params" / "x").mkdir(parents=True)
  (leftover / "params" / "x" / "data").write_bytes(b"half")
  save_converted(tiny_pretrained, tmp_path / "conv")
  assert leftover.exists() != case.removed
  load_pretrained(tmp_path / "conv", dtype=jnp.float32)


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from dllm_jax.atomic_files import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
      (tmp / "config.json").write_text("{")
      print(tmp, flush=True)
      time.sleep(600)
""")


def test_a_writer_killed_with_sigkill_is_cleaned_up_by_the_next(tiny_pretrained, tmp_path):
  out = tmp_path / "conv"
  writer = subprocess.Popen([sys.executable, "-P", "-c", KILLED_WRITER, str(out)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
  try:
    partial = pathlib.Path(writer.stdout.readline().strip())
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    writer.stdout.close()
  assert partial.parent == tmp_path and partial.is_dir() and not out.exists()
  save_converted(tiny_pretrained, out)
  assert not partial.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


def test_leftover_text_files_are_removed_too(tmp_path):
  leftover = tmp_path / f".report.json.partial-{socket.gethostname()}-{_dead_pid()}-ab12_x"
  leftover.write_text("{")
  atomic_files.write_text_atomic(tmp_path / "report.json", "{}")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# --- absurd layer counts: the files' count against config.json, before expanding names ----------

def _config_layers(n: int) -> Callable[[pathlib.Path], None]:
  def mutate(d: pathlib.Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = n
    (d / "config.json").write_text(json.dumps(config))
  return mutate


def _stray_layer(d: pathlib.Path) -> None:
  tensors = safetensors.torch.load_file(d / WEIGHTS)
  tensors["encoder.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)
  safetensors.torch.save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})


LAYER_COUNT_CASES = [
    Case("config_absurd", _config_layers(4096),
         "holds 2 layers (largest index: 'encoder.layers.1."),
    Case("config_one_more", _config_layers(3), "holds 2 layers"),
    Case("config_one_less", _config_layers(1), "holds 2 layers"),
    Case("stray_layer_in_the_file", _stray_layer,
         "holds 8 layers (largest index: 'encoder.layers.7.mlp.up_proj.weight' in "
         "model.safetensors), but config.json has num_hidden_layers=2"),
]


@pytest.fixture
def no_name_expansion(monkeypatch):
  """Fails a test that expands the expected tensor names from the config."""
  monkeypatch.setattr(ckpt_lib, "_expand", lambda *a: pytest.fail("names expanded first"))


@pytest.mark.parametrize("case", LAYER_COUNT_CASES, ids=lambda c: c.name)
def test_layer_count_mismatch_is_refused_before_expanding(tiny_checkpoint, tmp_path, case,
                                                          no_name_expansion):
  d = shutil.copytree(tiny_checkpoint, tmp_path / "hf")
  case.mutate(d)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d)
  assert_one_line(e, f"checkpoint {d} {case.culprit}")
  num_layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
  assert str(e.value).endswith(f"but config.json has num_hidden_layers={num_layers}")


def test_layer_count_mismatch_of_a_converted_dir(converted, tmp_path, no_name_expansion):
  conv = shutil.copytree(converted, tmp_path / "conv")
  _config_layers(4096)(conv)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(conv)
  assert_one_line(e, f"{conv / 'params'} holds 2 layers (largest index: 'encoder.layers.1.",
                  "but config.json has num_hidden_layers=4096")


def test_layer_count_mismatch_of_the_adapter(tiny_checkpoint, tmp_path):
  d = hf_copy(tiny_checkpoint, tmp_path / "hf")
  ckpt_utils.write_adapter(d, ckpt_utils.lora_tensors(TINY.replace(num_layers=3), LORA_RANK),
                           ckpt_utils.adapter_config(LORA_RANK, LORA_ALPHA))
  with pytest.raises(CheckpointError) as e:
    load_pretrained(d)
  assert_one_line(e, f"{d / ADAPTER_WEIGHTS} holds 3 layers (largest index: "
                  "'base_model.model.encoder.layers.2.", "but config.json has num_hidden_layers=2")


def test_layer_count_mismatch_of_a_gguf(tmp_path, no_name_expansion):
  path = write_tiny_gguf(tmp_path / "tiny.gguf", gguf_tensors(), block_count=3)
  with pytest.raises(CheckpointError) as e:
    gguf_lib.model_from_gguf(gguf_lib.load_gguf(path))
  assert_one_line(e, f"{path} holds 2 layers (largest index: 'model.layers.1.",
                  "but the config has num_layers=3")


def test_absurd_layer_count_is_a_usage_error_of_the_converter(tiny_checkpoint, tmp_path):
  d = shutil.copytree(tiny_checkpoint, tmp_path / "hf")
  _config_layers(4096)(d)
  out = tmp_path / "conv"
  proc = run_convert(f"--hf={d}", f"--out={out}")
  assert_usage_error(proc, f"checkpoint {d} holds 2 layers")
  assert_nothing_written(out)


# --- valid input still loads ----------------------------------------------------------------------

def test_a_mixed_bf16_fp32_checkpoint_loads_as_written(tiny_checkpoint, tmp_path):
  """Half the tensors bfloat16, half float32, in one file: every value arrives unchanged."""
  d = shutil.copytree(tiny_checkpoint, tmp_path / "hf")
  tensors = safetensors.torch.load_file(d / WEIGHTS)
  mixed = {k: v.to(torch.bfloat16 if i % 2 else torch.float32)
           for i, (k, v) in enumerate(sorted(tensors.items()))}
  safetensors.torch.save_file(mixed, d / WEIGHTS, metadata={"format": "pt"})
  assert {v.dtype for v in mixed.values()} == {torch.bfloat16, torch.float32}
  model = load_pretrained(d, dtype=jnp.float32).model
  for key, value in mixed.items():
    np.testing.assert_array_equal(param_as_hf(model, key), value.float().numpy(), err_msg=key)


# --- text, output paths and config files on the command line ----------------------------------------

# (name, extra arguments with {tmp} for the test's directory, culprit); the weights are never read:
# every case is refused before loading.
CLI_INPUT_CASES = [
    ("prompt_not_utf8", ["--config.prompt=\udcff\udcfe hello"], "--config.prompt: not valid UTF-8"),
    ("system_not_utf8", ["--config.system=\udcff"], "--config.system: not valid UTF-8"),
    ("output_json_is_a_directory", ["--config.output_json={tmp}"], "is a directory"),
    ("output_json_in_missing_directory", ["--config.output_json={tmp}/no/out.json"],
     "does not exist"),
    ("config_file_without_get_config", ["--config={tmp}/noget.py"], "defines no get_config()"),
]


@pytest.mark.parametrize("name,args,culprit", CLI_INPUT_CASES, ids=[c[0] for c in CLI_INPUT_CASES])
def test_bad_text_paths_and_config_files_are_usage_errors(tiny_checkpoint, tmp_path, name, args,
                                                          culprit):
  (tmp_path / "noget.py").write_text("X = 1\n")
  before = sorted(tmp_path.iterdir())
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, str(GENERATE), f"--config.checkpoint={tiny_checkpoint}",
          "--config.max_new_tokens=4", *(a.format(tmp=tmp_path) for a in args)]
  # The undecodable bytes reach the script as the OS passes them (os.fsencode keeps surrogates).
  proc = subprocess.run([os.fsencode(a) for a in argv], capture_output=True, env=env, cwd=ROOT,
                        timeout=300)
  proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                     proc.stderr.decode(errors="replace"))
  assert_usage_error(proc, culprit)
  assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_interactive_input_that_is_not_text_or_is_gone(tiny_checkpoint):
  """Bytes that are not UTF-8 on stdin are refused line by line; EOF or no stdin ends cleanly."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, str(GENERATE), f"--config.checkpoint={tiny_checkpoint}",
          "--config.interactive=True", "--config.max_new_tokens=4", "--config.chat=False",
          "--config.mode=ar"]
  proc = subprocess.run(argv, input=b"\xff\xfe\n", capture_output=True, env=env, cwd=ROOT,
                        timeout=300)
  err = proc.stderr.decode(errors="replace")
  assert proc.returncode == 0 and "Traceback" not in err, err
  assert "stdin: not valid UTF-8" in err, err
  proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr


# --- decoding knobs ----------------------------------------------------------------------------------

# (name, mode, knobs, culprit): refused when the settings are built (library) and by the CLI before
# any weight is read. Written from the settings' documented domains (dllm_jax/decode/settings.py).
KNOB_CASES = [
    ("diffusion_threshold_negative", "diffusion", {"threshold": -0.1}, "threshold=-0.1"),
    ("diffusion_threshold_above_one", "diffusion", {"threshold": 1.5}, "threshold=1.5"),
    ("diffusion_threshold_nan", "diffusion", {"threshold": float("nan")}, "threshold=nan"),
    ("spec_threshold_two", "spec", {"threshold": 2.0}, "threshold=2.0"),
    ("temperature_nan", "ar", {"temperature": float("nan")}, "temperature=nan"),
    ("temperature_inf", "ar", {"temperature": float("inf")}, "temperature=inf"),
    ("temperature_negative", "ar", {"temperature": -1.0}, "temperature=-1.0"),
    ("max_new_tokens_float", "ar", {"max_new_tokens": 8.5}, "max_new_tokens=8.5"),
    ("max_new_tokens_zero", "ar", {"max_new_tokens": 0}, "max_new_tokens=0"),
    ("seed_beyond_uint32", "ar", {"seed": 2**40}, "seed="),
    ("eos_beyond_int32", "ar", {"eos_token_ids": (2**40,)}, "eos_token_ids"),
    ("mask_id_beyond_int32", "spec", {"mask_token_id": 2**40}, "mask_token_id="),
    ("spec_block_of_one", "spec", {"block_length": 1}, "block_length=1"),
    ("thinking_budget_negative", "ar", {"max_thinking_tokens": -1}, "max_thinking_tokens=-1"),
    ("knob_of_another_mode", "ar", {"threshold": 0.5}, "threshold is not a setting of ar"),
]


@pytest.mark.parametrize("name,mode,knobs,culprit", KNOB_CASES, ids=[c[0] for c in KNOB_CASES])
def test_decoding_knobs_outside_their_domain(name, mode, knobs, culprit):
  from dllm_jax.decode import settings_for
  with pytest.raises(ValueError) as e:
    settings_for(mode, **knobs)
  assert culprit in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_sweep_over_modes_skips_only_the_knobs_of_other_modes():
  from dllm_jax.decode import AR, settings_for
  assert settings_for("ar", skip_other_modes=True, block_length=8, threshold=0.5,
                      max_new_tokens=4) == AR(max_new_tokens=4)
  with pytest.raises(ValueError, match="^blocklength is not a setting of ar"):
    settings_for("ar", skip_other_modes=True, blocklength=8)


# The same through the CLI flags (a representative handful; each refused before loading weights).
CLI_KNOB_CASES = [
    (["--config.mode=diffusion", "--config.diffusion_threshold=1.5"],
     "--config.diffusion_threshold=1.5"),
    (["--config.mode=spec", "--config.spec_threshold=2"], "--config.spec_threshold=2"),
    (["--config.temperature=nan"], "--config.temperature=nan"),
    (["--config.seed=1099511627776"], "--config.seed="),
    (["--config.mode=spec", "--config.mask_token_id=300"], "mask_token_id=300"),
    (["--config.mode=quadratic", "--config.ar_mix_weight=2"], "--config.ar_mix_weight=2"),
]


@pytest.mark.parametrize("args,culprit", CLI_KNOB_CASES, ids=[a[0][-1] for a in CLI_KNOB_CASES])
def test_decoding_knobs_outside_their_domain_in_the_cli(tiny_checkpoint, args, culprit):
  proc = run_generate(f"--config.checkpoint={tiny_checkpoint}", "--config.max_new_tokens=32",
                      "--config.block_length=8", *args)
  assert_usage_error(proc, culprit)
