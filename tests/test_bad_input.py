"""Bad input, one table per class: each case must be refused with one line naming the culprit.

Library cases call the API that meets the input first; CLI cases run scripts/generate.py and expect
exit code 2, a single `error: ...` line on stderr naming the culprit and no traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import pytest

from dllm_jax.config import DLM_PARADIGMS, ModelConfig, preset
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
def test_bad_model_config_is_a_usage_error(tiny_checkpoint, tmp_path, name):
  """The weights and tokenizer are fine; the CLI refuses the config.json before reading them."""
  case = _by_name(MODEL_CONFIG_CASES)[name]
  ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
  (ckpt / "config.json").write_text(json.dumps(case.mutate(copy.deepcopy(TINY_NLD_CONFIG))))
  proc = run_generate("--config=configs/nld.py", f"--config.checkpoint={ckpt}")
  assert_usage_error(proc, f"config.json: {case.culprit}")
