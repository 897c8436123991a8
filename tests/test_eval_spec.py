"""scripts/eval_spec.py on a tiny random checkpoint with a draft adapter: both drafters reported,
speculative output equal to greedy AR (verification makes it exact), bad input exits 2."""

import importlib.util
import json
import pathlib

import pytest

from ckpt_utils import adapter_config, lora_tensors, write_adapter
from tiny_nld import write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_spec():
  spec = importlib.util.spec_from_file_location("eval_spec", ROOT / "scripts" / "eval_spec.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n"
                          for t in ("the sea is blue", "write a haiku", "why the sky")))
  return path


def test_reports_both_drafters_and_exact_output(eval_spec, prompts, tmp_path, capsys):
  from dllm_jax.config import preset
  cfg = preset("tiny")
  ckpt = write_checkpoint(tmp_path / "ckpt", cfg)
  write_adapter(ckpt, lora_tensors(cfg, 4), adapter_config(4, 8.0))
  rc = eval_spec.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", "--max_new_tokens=12",
                       "--block_length=4", "--batch_size=2"])
  assert rc == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["drafter"] for r in report["rows"]] == ["base weights (no adapter)", "draft LoRA"]
  for row in report["rows"]:
    assert row["same_as_ar"] == "3/3"
    # A round accepts at least its seed token and at most the whole block.
    assert 1.0 <= row["mean_accepted"] <= 4.0


def test_bad_input_exits_2_naming_it(eval_spec, prompts, tmp_path, capsys):
  assert eval_spec.main(["--checkpoint=/nonexistent/ckpt", f"--prompts={prompts}"]) == 2
  assert "/nonexistent/ckpt" in capsys.readouterr().err
  no_lora = write_checkpoint(tmp_path / "no_lora")
  assert eval_spec.main([f"--checkpoint={no_lora}", f"--prompts={prompts}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "linear_spec_lora" in err and "\n" not in err
