"""ModelConfig parsing (docs/model.md §1), presets and parameter counts from abstract shapes."""

import json

import pytest

from dllm_jax.config import ModelConfig, PRESETS, preset
from dllm_jax.model import param_count

# The NLD 14B instruct config.json as published (docs/model.md §1.2), as transformers 5 writes it.
NLD_14B_CONFIG = json.loads("""{
  "architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
  "hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 16384,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
  "max_position_embeddings": 262144, "rms_norm_eps": 1e-05, "hidden_act": "silu",
  "attention_bias": false, "mlp_bias": false, "attention_dropout": 0.0, "tie_word_embeddings": false,
  "sliding_window": null, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 11,
  "mask_token_id": 100, "block_size": 32, "dlm_paradigm": "bidirectional", "ar_loss_weight": 1.0,
  "dlm_loss_weight": null, "use_cache": false,
  "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000000.0, "factor": 16.0,
    "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
    "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
  "rope_theta": 1000000.0
}""")


def test_nested_rope_theta_wins_over_top_level_mirror():
  cfg = ModelConfig.from_hf_config(NLD_14B_CONFIG)
  assert cfg.rope_theta == 1e9  # no leak of the top-level 1e6 mirror (docs/model.md §9.2 item 2)
  assert cfg == preset("nld-14b")


def test_3b_base_fields():
  hf = dict(NLD_14B_CONFIG, hidden_size=3072, num_hidden_layers=26, intermediate_size=9216,
            max_position_embeddings=4096, eos_token_id=2,
            rope_parameters=dict(NLD_14B_CONFIG["rope_parameters"], rope_theta=1e6, factor=0.25))
  cfg = ModelConfig.from_hf_config(hf)
  assert cfg.head_dim == 128 and cfg.hidden_size // cfg.num_heads == 96
  assert cfg.rope_factor == 0.25 and cfg.eos_token_ids == (2,) and cfg.max_position_embeddings == 4096
  assert cfg == preset("nld-3b-base")


def test_plain_llama_config_with_tied_embeddings():
  hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "rope_theta": 100000, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, "eos_token_id": [2, 0], "max_position_embeddings": 8192}
  cfg = ModelConfig.from_hf_config(hf)
  assert cfg.rope_type == "default" and cfg.rope_theta == 1e5 and cfg.head_dim == 64
  assert cfg.tie_word_embeddings and cfg.llama_4_scaling_beta is None and cfg.mask_token_id is None
  assert cfg.eos_token_ids == (2, 0)


def test_round_trip_through_hf_dict():
  for name in ("nld-3b", "nld-8b-base", "nld-14b", "tiny"):
    cfg = preset(name)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("name,billions", [("nld-3b", 3.83), ("nld-8b", 8.49), ("nld-14b", 13.51)])
def test_param_counts_match_spec(name, billions):
  # Spec §1.4: per-layer 116.4M/218.1M/304.1M, embed + untied head 2 x V x d.
  assert abs(param_count(preset(name)) / 1e9 - billions) < 0.006
  assert param_count(preset(name)) == param_count(preset(name + "-base"))


def test_errors_name_the_culprit():
  with pytest.raises(ValueError, match="num_kv_heads"):
    preset("tiny").replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="'vocab_size'"):
    ModelConfig.from_hf_config({k: v for k, v in NLD_14B_CONFIG.items() if k != "vocab_size"})
  with pytest.raises(ValueError, match="rope_type"):
    ModelConfig.from_hf_config(dict(NLD_14B_CONFIG, rope_parameters={"rope_type": "dynamic"}))
  with pytest.raises(ValueError, match="unknown model preset"):
    preset("nld-70b")
  assert "tiny" in PRESETS
