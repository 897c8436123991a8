r"""Generate text with an NLD checkpoint, or offline with the embedded SmolLM2-135M-Instruct default.

  python scripts/generate.py                                   # embedded default, AR, offline
  python scripts/generate.py --config=configs/nld.py \
      --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B --config.prompt="What is 84 * 3 / 2?"
  python scripts/generate.py --config.interactive=True         # multi-turn chat
  python scripts/generate.py --config.prompts_file=prompts.jsonl --config.output_jsonl=out.jsonl

Text is streamed to stdout as tokens are committed (per AR token, diffusion block or accepted
speculative run, linear or quadratic); progress bars and one stats line go to stderr. A prompts file is generated in
batches and written as JSON lines. Compiled programs are cached on disk, so a second run starts
faster. Bad input exits with code 2 and a one-line message naming the flag, file or line at fault.
See docs/cli.md.

This script is over 600 lines because it is the whole command-line surface in one place: flags
with one-line errors, --help built from configs/common.py, prompts files, batching, the
interactive loop and the output records. Loading, decoding settings and generation are the
library's (dllm_jax.load, dllm_jax.decode).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import re
import shlex
import sys
import threading
import time
import tokenize
from typing import TYPE_CHECKING, Any

from absl import flags
from ml_collections import config_dict, config_flags

if TYPE_CHECKING:  # dllm_jax (and JAX) are imported once the flags are valid: usage errors are fast
  from dllm_jax.config import ModelConfig
  from dllm_jax.decode import GenerateResult
  from dllm_jax.loader import Description, Loaded
  from dllm_jax.decode.settings import DecodeSettings
  from dllm_jax.tokenizer import TextTokenizer

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "default.py")
KNOBS_FILE = os.path.join(CONFIGS, "common.py")  # every knob, with its description as a comment
# dllm_jax.loader.DTYPE_NAMES and dllm_jax.config.ATTENTION_IMPLS, checked before the heavy imports.
DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_MODES = ("", "int8", "fp8")  # "": unquantized (dllm_jax.quantize.MODES besides)
ATTENTION_IMPLS = ("xla", "pallas", "triton", "cudnn", "auto")
HELP_FLAGS = ("--help", "-h")
# What a line of a .jsonl prompts file may set, and the JSON types it takes (None: null).
PROMPT_FIELDS = {
    "prompt": (str,), "system": (str,), "mode": (str,), "max_new_tokens": (int,),
    "block_length": (int, None), "temperature": (float,), "seed": (int,),
    "diffusion_threshold": (float,), "spec_threshold": (float,), "ar_mix_weight": (float, None),
    "max_thinking_tokens": (int, None), "enable_thinking": (bool,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               None: "null"}
EXIT_USAGE = 2


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where settings came from, for error messages: the command line or a prompts-file line."""
  location: str = ""  # "" or "FILE:LINE: "
  key_prefix: str = "--config."

  def key(self, name: str) -> str:
    return f"{self.key_prefix}{name}"

  def error(self, message: str) -> UsageError:
    return UsageError(f"{self.location}{message}")


FLAGS = Origin()


# --- configuration --------------------------------------------------------------------------------

def parse_config(argv: list[str], default_config: str = DEFAULT_CONFIG,
                 description: str = "generation config file") -> config_dict.ConfigDict:
  """`--config=<file> --config.<key>=<value> ...` -> the config, or UsageError naming the culprit.
  scripts/serve.py parses its own configs with it (its default file, its description)."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
      if not os.path.isfile(path):
        raise UsageError(f"--config: config file {path} not found")
      if not _defines_get_config(path):
        raise UsageError(f"--config: config file {path} defines no get_config() function")
  fv = flags.FlagValues()
  try:
    holder = config_flags.DEFINE_config_file("config", default_config, description,
                                             flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    config = holder.value
    config.to_dict()  # a config file that failed to load raises on first access
  except (KeyError, AttributeError) as e:  # ConfigDict's errors for an unknown override key
    raise UsageError(_unknown_key_message(e, argv)) from None
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (OSError, ImportError, SyntaxError) as e:
    raise UsageError(f"cannot load config file: {_first_line(e)}") from None
  return config


def _defines_get_config(path: str) -> bool:
  """Whether the config file has a top-level `def get_config` (read, not run; a file that does not
  parse is left to the loader, which reports the SyntaxError)."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read())
  except (SyntaxError, ValueError):
    return True
  return any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body)


def _unknown_key_message(e: Exception, argv: list[str]) -> str:
  """Names the override whose key ConfigDict did not know (its error text quotes it)."""
  text = str(e)
  keys = [a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  key = next((k for k in keys for part in (k, k.split(".")[0])
              if re.search(rf"(?<![\w.]){re.escape(part)}(?![\w.])", text)), None)
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  return (f"unknown config key --config.{key or '?'}"
          + (f" (did you mean --config.{hint.group(1)}?)" if hint else ""))


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return " ".join(lines[:4]) if lines else type(e).__name__


def knob_descriptions(path: str = KNOBS_FILE) -> dict[str, str]:
  """key -> description: the comment on a knob's `c.<key> = ...` line in configs/common.py, else
  the comment lines right above it."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  comments: dict[int, str] = {}
  code_lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(text).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.add(tok.start[0])
  out = {}
  for number, line in enumerate(text.splitlines(), 1):
    m = re.match(r"\s*c\.(\w+)\s*=", line)
    if not m:
      continue
    if number in comments:
      out[m.group(1)] = comments[number]
      continue
    above = []
    n = number - 1
    while n in comments and n not in code_lines:
      above.insert(0, comments[n])
      n -= 1
    out[m.group(1)] = " ".join(above)
  return out


def help_text(argv: list[str]) -> str:
  """The module docstring and every knob with its default (from the config file in use)."""
  c = parse_config(argv)
  config_file = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")),
                     "configs/default.py")
  notes = knob_descriptions()
  lines = [__doc__.strip(), "",
           f"Knobs (set with --config.<key>=<value>; defaults as {config_file} sets them):", ""]
  for key in notes:  # in the order of configs/common.py
    value = c[key]
    shown = shlex.quote(value) if isinstance(value, str) else str(value)
    lines += [f"  --config.{key}={shown}", f"      {notes.get(key, '')}"]
  return "\n".join(lines)


def decode_settings(c: config_dict.ConfigDict, at: Origin) -> DecodeSettings:
  """The knobs of `c` as the library's settings of its mode (dllm_jax/decode/settings.py, which
  defaults and checks them); its one-line ValueError names the knob as the user wrote it."""
  from dllm_jax.decode.settings import settings_for  # pylint: disable=g-import-not-at-top
  knobs = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed,
               max_thinking_tokens=c.max_thinking_tokens)
  if c.mode in ("diffusion", "spec"):
    knobs.update(threshold=c[f"{c.mode}_threshold"])
  if c.mode in ("diffusion", "spec", "quadratic"):
    knobs.update(block_length=c.block_length)
  if c.mode == "diffusion":
    knobs.update(fixed_schedule=c.fixed_schedule, causal_context=c.causal_context)
  if c.mode in ("spec", "quadratic"):
    knobs.update(mask_token_id=c.mask_token_id)
  if c.mode == "quadratic":
    knobs.update(ar_mix_weight=c.ar_mix_weight)
  try:
    return settings_for(c.mode, **knobs)
  except ValueError as e:
    raise at.error(_knob_message(str(e), c.mode, at)) from None


def _knob_message(message: str, mode: str, at: Origin) -> str:
  """A settings error with its field spelled as the knob ("threshold=2" -> the mode's threshold
  knob, "--config." prefixed on the command line)."""
  field, sep, rest = message.partition("=")
  if not sep or not field.isidentifier():
    return message
  knob = {"threshold": f"{mode}_threshold"}.get(field, field)
  return f"{at.key(knob)}={rest}"


def _check_output_dir(key: str, path: str) -> None:
  """The output file can be written: checked before anything is loaded or generated."""
  if path and path != "-":
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise UsageError(f"--config.{key}={path}: directory {parent} does not exist")
    if os.path.isdir(path):
      raise UsageError(f"--config.{key}={path}: is a directory, expected a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise UsageError(f"--config.{key}={path}: directory {parent} is not writable")


def check_text(name: str, text: str) -> None:
  """Text from the command line or stdin must be valid UTF-8 (Python keeps undecodable bytes as
  lone surrogates, which no tokenizer takes): refused, naming where the first bad byte is."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UsageError(f"{name}: not valid UTF-8 text (undecodable byte at character {e.start})"
                     ) from None


def check_knobs(c: config_dict.ConfigDict) -> None:
  """Checks every knob that does not need the checkpoint."""
  decode_settings(c, FLAGS)
  if c.dtype not in DTYPES:
    raise UsageError(f"--config.dtype={c.dtype!r}: expected one of {', '.join(DTYPES)}")
  if c.quantize not in QUANTIZE_MODES:
    raise UsageError(f"--config.quantize={c.quantize!r}: expected one of "
                     f"{', '.join(repr(m) for m in QUANTIZE_MODES)}")
  if c.attention_impl not in ATTENTION_IMPLS:
    raise UsageError(f"--config.attention_impl={c.attention_impl!r}: expected one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if c.max_seq_len < 0:
    raise UsageError(f"--config.max_seq_len={c.max_seq_len}: must be >= 0 (0: model maximum)")
  if c.batch_size < 1:
    raise UsageError(f"--config.batch_size={c.batch_size}: must be >= 1")
  if c.output_json and c.interactive:
    raise UsageError("--config.output_json cannot be combined with --config.interactive")
  if c.prompts_file:
    if c.interactive:
      raise UsageError("--config.prompts_file cannot be combined with --config.interactive")
    if c.output_json:
      raise UsageError("--config.output_json writes one record; with --config.prompts_file use "
                       "--config.output_jsonl")
    if not c.output_jsonl:
      raise UsageError("--config.prompts_file needs --config.output_jsonl (a path, or - for "
                       "stdout)")
  elif c.output_jsonl:
    raise UsageError("--config.output_jsonl is the output of a batch run: set "
                     "--config.prompts_file too (or use --config.output_json)")
  _check_output_dir("output_json", c.output_json)
  _check_output_dir("output_jsonl", c.output_jsonl)
  if not c.interactive and not c.prompts_file and not c.prompt:
    raise UsageError("--config.prompt is empty")
  check_text("--config.prompt", c.prompt)
  check_text("--config.system", c.system)


# --- prompts --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """One prompt: the config with a prompts-file line's settings applied, its decoding settings
  (resolved against the checkpoint once it is known) and its token ids."""
  config: config_dict.ConfigDict
  at: Origin
  settings: DecodeSettings
  ids: list[int] = dataclasses.field(default_factory=list)


def _json_type_ok(value: Any, types: tuple) -> bool:
  if value is None:
    return None in types
  if isinstance(value, bool):
    return bool in types
  if isinstance(value, int):
    return int in types or float in types
  if isinstance(value, float):
    return float in types
  return isinstance(value, str) and str in types


def _prompt_line(path: str, number: int, line: str, jsonl: bool) -> dict[str, Any]:
  """The settings of one non-blank line of a prompts file (UsageError naming file and line)."""
  where = f"{path}:{number}"
  if not jsonl:
    return {"prompt": line.strip()}
  try:
    entry = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
  if not isinstance(entry, dict):
    raise UsageError(f'{where}: expected a JSON object such as {{"prompt": "..."}}')
  for key, value in entry.items():
    if key not in PROMPT_FIELDS:
      raise UsageError(f"{where}: unknown key {key!r} (known: {', '.join(PROMPT_FIELDS)})")
    if not _json_type_ok(value, PROMPT_FIELDS[key]):
      expected = " or ".join(_TYPE_NAMES[t] for t in PROMPT_FIELDS[key])
      raise UsageError(f"{where}: {key!r} must be {expected}, got {json.dumps(value)}")
  if "prompt" not in entry:
    raise UsageError(f'{where}: no "prompt"')
  return entry


def read_prompts_file(c: config_dict.ConfigDict) -> list[Job]:
  """Every prompt of --config.prompts_file with its settings, all checked (no checkpoint needed).

  A `.jsonl` file holds one JSON object per line ({"prompt": ..., optional PROMPT_FIELDS}); any
  other file one plain-text prompt per line. Blank lines are skipped.
  """
  path = c.prompts_file
  if not os.path.isfile(path):
    raise UsageError(f"--config.prompts_file: {path} not found")
  jsonl = path.endswith(".jsonl")
  jobs = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UsageError(f"--config.prompts_file: {path} is not UTF-8 text ({e.reason})") from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    entry = _prompt_line(path, number, line, jsonl)
    at = Origin(f"{path}:{number}: ", key_prefix="")
    if not entry["prompt"].strip():
      raise at.error("empty prompt")
    job_config = copy.deepcopy(c)
    for key, value in entry.items():
      job_config[key] = value  # ConfigDict turns an int into a float where the knob is a float
    jobs.append(Job(job_config, at, decode_settings(job_config, at)))
  if not jobs:
    raise UsageError(f"--config.prompts_file: {path} holds no prompts")
  return jobs


def prompt_ids(c: config_dict.ConfigDict, tok: TextTokenizer, messages: list[dict[str, str]]
               ) -> list[int]:
  if c.chat:
    return tok.encode_chat(messages, add_generation_prompt=True,
                           enable_thinking=bool(c.enable_thinking))
  return tok.encode_raw(messages[-1]["content"])


def first_messages(c: config_dict.ConfigDict) -> list[dict[str, str]]:
  return [{"role": "system", "content": c.system}] if c.system else []


# --- checkpoint -----------------------------------------------------------------------------------

def describe(c: config_dict.ConfigDict) -> Description:
  """Finds the checkpoint and reads its config and tokenizer (cheap; no weights yet)."""
  from dllm_jax import loader  # pylint: disable=g-import-not-at-top
  if not c.checkpoint:
    raise UsageError("--config.checkpoint is not set (a model directory, a .gguf file, or "
                     f"'{loader.EMBEDDED_NAME}' for the embedded default)")
  try:
    with ElapsedBar(f"reading {os.path.basename(c.checkpoint)}"):
      desc = loader.inspect(c.checkpoint)
  except (OSError, ValueError) as e:  # CheckpointError is a ValueError
    raise UsageError(f"--config.checkpoint: {_first_line(e)}") from None
  if desc.tokenizer is None:
    raise UsageError(f"--config.checkpoint: {desc.path} has no tokenizer (tokenizer.json not "
                     "found)")
  return desc


def check_chat(c: config_dict.ConfigDict, desc: Description) -> None:
  if c.chat and not desc.tokenizer.chat_template:
    raise UsageError(f"--config.chat=True but {desc.path} has no chat template; "
                     "use --config.chat=False for raw text")


def resolve(job: Job, desc: Description) -> None:
  """The job's settings against the checkpoint and its prompt (vocabulary, mask token, block
  length, positions, the cache length of --config.max_seq_len), before any weight is read."""
  c, at, settings = job.config, job.at, job.settings
  if settings.max_thinking_tokens is not None:
    end_think = desc.tokenizer.end_think_token_id()
    if end_think is None:
      raise at.error(f"{at.key('max_thinking_tokens')} needs a '</think>' token, which the "
                     f"tokenizer of {desc.path} does not have")
    settings = dataclasses.replace(settings, end_think_token_id=end_think)
  try:
    job.settings = settings.resolve(desc.config, [len(job.ids)])
  except ValueError as e:
    raise at.error(f"{at.key('mode')}={c.mode} on {desc.path}: "
                   f"{_knob_message(str(e), c.mode, at)}") from None
  check_length(c, desc.config, len(job.ids), job.settings, at)


def check_length(c: config_dict.ConfigDict, cfg: ModelConfig, prompt_len: int,
                 settings: DecodeSettings, at: Origin) -> None:
  """Prompt + new tokens + one round's overshoot must fit the cache (--config.max_seq_len)."""
  limit = c.max_seq_len or cfg.max_position_embeddings
  if limit > cfg.max_position_embeddings:
    raise UsageError(f"--config.max_seq_len={c.max_seq_len} exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  need = prompt_len + settings.max_new_tokens + settings.block
  if need > limit:
    raise at.error(f"prompt of {prompt_len} tokens + max_new_tokens={settings.max_new_tokens} + "
                   f"{'one token' if settings.mode == 'ar' else f'block_length={settings.block}'}"
                   f" = {need} exceeds the cache length {limit} (--config.max_seq_len)")


def make_mesh(c: config_dict.ConfigDict):  # -> jax.sharding.Mesh | None
  if not c.mesh_shape:
    return None
  from dllm_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    return sharding.make_mesh(c.mesh_shape)
  except ValueError as e:
    raise UsageError(f"--config.mesh_shape={c.mesh_shape!r}: {e}") from None


def enable_cache(c: config_dict.ConfigDict) -> None:
  from dllm_jax.compile_cache import enable_compilation_cache  # pylint: disable=g-import-not-at-top
  try:
    enable_compilation_cache(c.compilation_cache_dir)
  except OSError as e:
    raise UsageError(f"--config.compilation_cache_dir={c.compilation_cache_dir!r}: "
                     f"{_first_line(e)}") from None


def load_weights(c: config_dict.ConfigDict, desc: Description, modes: set[str], mesh) -> Loaded:
  """Reads the weights with a progress bar; the draft LoRA only when a prompt uses spec mode."""
  from dllm_jax import loader  # pylint: disable=g-import-not-at-top
  try:
    return loader.load(desc, dtype=c.dtype, mesh=mesh, lora=bool(c.lora) and "spec" in modes,
                       attention_impl=c.attention_impl, allow_nonfinite=c.allow_nonfinite,
                       progress=True, quantize=c.quantize or None)
  except (OSError, ValueError) as e:
    raise UsageError(_first_line(e)) from None


# --- generation and output ------------------------------------------------------------------------

@dataclasses.dataclass
class Session:
  """Everything a generation call needs once the weights are loaded."""
  config: config_dict.ConfigDict
  loaded: Loaded
  mesh: Any  # jax.sharding.Mesh | None

  @property
  def tokenizer(self) -> TextTokenizer:
    return self.loaded.tokenizer


class ElapsedBar:
  """An elapsed-time bar on stderr (terminals only) for steps without a known length: reading a
  GGUF header, compiling and computing the first tokens."""

  def __init__(self, desc: str):
    self._desc = desc
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> ElapsedBar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(desc=self._desc, bar_format="{desc}: {elapsed}", disable=None, file=sys.stderr)

    def spin():
      while not self._stop.wait(0.25):
        bar.refresh()
      bar.close()

    self._thread = threading.Thread(target=spin, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    if not self._stop.is_set():
      self._stop.set()
      self._thread.join()

  def __exit__(self, *exc) -> None:
    self.stop()


def run_generate(s: Session, settings: DecodeSettings, prompts: list[list[int]],
                 on_tokens=None) -> GenerateResult:
  """One `generate` call (its settings were resolved against the checkpoint already)."""
  from dllm_jax.decode import generate  # pylint: disable=g-import-not-at-top
  try:
    return generate(s.loaded.model, prompts, settings, mesh=s.mesh, on_tokens=on_tokens)
  except ValueError as e:  # e.g. a mesh that does not divide the batch: one line
    raise UsageError(_first_line(e)) from None


def generate_streamed(s: Session, settings: DecodeSettings, ids: list[int], stream: bool
                      ) -> GenerateResult:
  """Runs one prompt, streaming its text to stdout when `stream`."""
  from dllm_jax.tokenizer import StreamDecoder  # pylint: disable=g-import-not-at-top
  decoder = StreamDecoder(s.tokenizer)
  with ElapsedBar("compiling and prefilling" if stream else "generating") as spinner:

    def on_tokens(row: int, new: list[int]) -> None:
      spinner.stop()
      text = decoder.push(new)
      if text:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = run_generate(s, settings, [ids], on_tokens if stream else None)
  if stream:
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
  return result


def stats(c: config_dict.ConfigDict, prompt_len: int, result: GenerateResult, row: int = 0
          ) -> dict[str, Any]:
  n = len(result.tokens[row])
  seconds = result.prefill_seconds + result.decode_seconds
  return {"mode": c.mode, "prompt_tokens": prompt_len, "generated_tokens": n,
          "nfe": result.nfe[row], "tokens_per_forward": round(result.tokens_per_forward[row], 3),
          "tokens_per_second": round(n / seconds, 2) if seconds > 0 else None,
          "compile_seconds": round(result.compile_seconds, 2)}


def stats_line(s: dict[str, Any]) -> str:
  tps = "n/a" if s["tokens_per_second"] is None else f"{s['tokens_per_second']:.1f}"
  return (f"[stats] mode={s['mode']} prompt_tokens={s['prompt_tokens']} "
          f"generated_tokens={s['generated_tokens']} nfe={s['nfe']} "
          f"tokens_per_forward={s['tokens_per_forward']:.2f} tokens_per_s={tps} "
          f"(excluding compilation) compile_s={s['compile_seconds']:.1f}")


def record(s: Session, job: Job, result: GenerateResult, row: int) -> dict[str, Any]:
  """The JSON record of one prompt (row `row` of `result`)."""
  c = job.config
  return {
      "checkpoint": s.loaded.path, "prompt": c.prompt, "prompt_ids": job.ids,
      "text": s.tokenizer.decode(result.tokens[row]), "tokens": result.tokens[row],
      **stats(c, len(job.ids), result, row), "decode_nfe": result.decode_nfe[row],
      "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
      "accepted_lengths": result.accepted_lengths[row] if result.accepted_lengths else None,
      "config": c.to_dict()}


def write_records(path: str, records: list[dict[str, Any]]) -> None:
  """JSON lines to `path` atomically (temp file + rename: never a half-written file), or stdout
  for "-"."""
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if path == "-":
    sys.stdout.write(text)
    sys.stdout.flush()
    return
  from dllm_jax.atomic_files import write_text_atomic  # pylint: disable=g-import-not-at-top
  try:
    write_text_atomic(path, text)
  except (OSError, ValueError) as e:  # checked writable at start; the disk may still fill up
    sys.stdout.write(text)  # the generated text is not lost
    sys.stdout.flush()
    raise UsageError(f"{path}: not written ({_first_line(e)}); the records went to stdout "
                     "instead") from None


# --- main -----------------------------------------------------------------------------------------

def run_one_shot(s: Session, job: Job) -> None:
  c = s.config
  stream = c.stream and c.output_json != "-"
  result = generate_streamed(s, job.settings, job.ids, stream)
  rec = record(s, job, result, 0)
  if not stream and c.output_json != "-":
    print(rec["text"])
  print(stats_line(stats(c, len(job.ids), result)), file=sys.stderr)
  if c.output_json:
    write_records(c.output_json, [rec])


def run_batch(s: Session, jobs: list[Job]) -> None:
  """Generates every prompt, batching those with equal settings, and writes the records in input
  order once all are done."""
  groups: dict[DecodeSettings, list[int]] = {}  # prompts with equal settings share a call
  for i, job in enumerate(jobs):
    groups.setdefault(job.settings, []).append(i)
  size = s.config.batch_size
  batches = [rows[k:k + size] for rows in groups.values() for k in range(0, len(rows), size)]
  records: list[dict[str, Any]] = [{}] * len(jobs)
  for n, rows in enumerate(batches, 1):
    c, settings = jobs[rows[0]].config, jobs[rows[0]].settings
    with ElapsedBar(f"batch {n}/{len(batches)}"):
      result = run_generate(s, settings, [jobs[i].ids for i in rows])
    for row, i in enumerate(rows):
      records[i] = record(s, jobs[i], result, row)
    generated = sum(len(t) for t in result.tokens)
    seconds = result.prefill_seconds + result.decode_seconds
    print(f"[batch {n}/{len(batches)}] prompts={len(rows)} mode={c.mode} "
          f"generated_tokens={generated} tokens_per_s={generated / seconds:.1f} "
          f"(excluding compilation) compile_s={result.compile_seconds:.1f}", file=sys.stderr)
  write_records(s.config.output_jsonl, records)


def run_interactive(s: Session, desc: Description) -> None:
  """A multi-turn chat (raw-text mode: independent prompts). Empty line: skip; /reset; /exit."""
  c = s.config
  messages = first_messages(c)
  print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
  while True:
    try:
      line = input("> ")
    except UnicodeDecodeError as e:  # stdin bytes that are not UTF-8: refused, the chat goes on
      print(f"error: stdin: not valid UTF-8 text (byte {e.start} of the line); not sent",
            file=sys.stderr)
      continue
    except (EOFError, OSError, ValueError, RuntimeError):  # Ctrl-D, or no stdin at all: end
      print(file=sys.stderr)
      return
    try:
      check_text("stdin", line)
    except UsageError as e:
      print(f"error: {e}; not sent", file=sys.stderr)
      continue
    line = line.strip()
    if not line:
      continue
    if line == "/exit":
      return
    if line == "/reset":
      messages = first_messages(c)
      continue
    turn = messages + [{"role": "user", "content": line}]
    job = Job(c, FLAGS, decode_settings(c, FLAGS), prompt_ids(c, s.tokenizer, turn))
    try:
      resolve(job, desc)
    except UsageError as e:
      print(f"error: {e} (try /reset)", file=sys.stderr)
      continue
    result = generate_streamed(s, job.settings, job.ids, stream=True)
    print(stats_line(stats(c, len(job.ids), result)), file=sys.stderr)
    if c.chat:
      messages = turn + [{"role": "assistant", "content": s.tokenizer.decode(result.tokens[0])}]


def init_distributed(c: config_dict.ConfigDict) -> None:
  """Joins a multi-process run before any other JAX call; only process 0 prints."""
  if c.num_processes <= 1:
    return
  if not c.coordinator_address:
    raise UsageError(f"--config.num_processes={c.num_processes} needs "
                     "--config.coordinator_address=HOST:PORT")
  if not 0 <= c.process_id < c.num_processes:
    raise UsageError(f"--config.process_id={c.process_id}: expected 0 .. {c.num_processes - 1}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=c.coordinator_address,
                             num_processes=c.num_processes, process_id=c.process_id)
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with
    sys.stderr = open(os.devnull, "w")  # pylint: disable=consider-using-with


def main(argv: list[str]) -> int:
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(help_text([a for a in argv if a not in HELP_FLAGS]))
    return 0
  c = parse_config(argv)
  check_knobs(c)
  if c.interactive:
    jobs = []
  elif c.prompts_file:
    jobs = read_prompts_file(c)  # the whole file is checked before anything is loaded
  else:
    jobs = [Job(c, FLAGS, decode_settings(c, FLAGS))]
  init_distributed(c)
  desc = describe(c)
  check_chat(c, desc)
  modes = {job.config.mode for job in jobs} or {c.mode}
  for job in jobs:  # every prompt against the checkpoint before spending time on the weights
    jc = job.config
    job.ids = prompt_ids(jc, desc.tokenizer, first_messages(jc) + [
        {"role": "user", "content": jc.prompt}])
    resolve(job, desc)
  mesh = make_mesh(c)
  enable_cache(c)
  start = time.perf_counter()
  loaded = load_weights(c, desc, modes, mesh)
  print(f"loaded {desc.path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
  session = Session(c, loaded, mesh)
  if c.interactive:
    run_interactive(session, desc)
  elif c.prompts_file:
    run_batch(session, jobs)
  else:
    run_one_shot(session, jobs[0])
  return 0


def cli() -> int:
  # absl flags are parsed by hand (not app.run) so that every bad input exits with code 2.
  try:
    return main(sys.argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.__stderr__)  # every process reports its own bad input
    return EXIT_USAGE
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.__stderr__)
    return 130
  except BaseException:
    sys.stderr = sys.__stderr__  # a crash on any process must be visible
    raise


if __name__ == "__main__":
  sys.exit(cli())
