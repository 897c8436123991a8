r"""Generate text with an NLD checkpoint, or offline with the embedded SmolLM2-135M-Instruct default.

  python scripts/generate.py                                   # embedded default, AR, offline
  python scripts/generate.py --config=configs/nld_8b.py \
      --config.checkpoint=/path/to/Nemotron-Labs-Diffusion-8B --config.mode=spec \
      --config.prompt="What is 84 * 3 / 2?"
  python scripts/generate.py --config.interactive=True         # multi-turn chat

Text is streamed to stdout as tokens are committed (per AR token, diffusion block or accepted
speculative run); progress bars and one stats line go to stderr. Bad input exits with code 2 and a
one-line message naming the flag or file at fault. See docs/cli.md for every knob.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from absl import flags
from ml_collections import config_dict, config_flags

if TYPE_CHECKING:  # dllm_jax (and JAX) are imported once the flags are valid: usage errors are fast
  from dllm_jax.config import ModelConfig
  from dllm_jax.decode import GenerateResult
  from dllm_jax.gguf import GGUFCheckpoint
  from dllm_jax.model import NLDModel
  from dllm_jax.tokenizer import TextTokenizer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                              "default.py")
MODES = ("ar", "diffusion", "spec")
DTYPES = ("auto", "float32", "bfloat16")
# The keys of dllm_jax.decode.LAYER_LAYOUTS (checked before the heavy imports).
LAYER_LAYOUT_NAMES = ("auto", "scan", "unrolled")
EXIT_USAGE = 2


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit code 2."""


# --- configuration --------------------------------------------------------------------------------

def parse_config(argv: list[str]) -> config_dict.ConfigDict:
  """`--config=<file> --config.<key>=<value> ...` -> the config, or UsageError naming the culprit."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
      if not os.path.isfile(path):
        raise UsageError(f"--config: config file {path} not found")
  fv = flags.FlagValues()
  try:
    holder = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "generation config file",
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


def check_knobs(c: config_dict.ConfigDict) -> None:
  """Checks every knob that does not need the checkpoint."""
  if c.mode not in MODES:
    raise UsageError(f"--config.mode={c.mode!r}: expected one of {', '.join(MODES)}")
  if c.dtype not in DTYPES:
    raise UsageError(f"--config.dtype={c.dtype!r}: expected one of {', '.join(DTYPES)}")
  if c.layer_layout not in LAYER_LAYOUT_NAMES:
    raise UsageError(f"--config.layer_layout={c.layer_layout!r}: expected one of "
                     f"{', '.join(LAYER_LAYOUT_NAMES)}")
  if c.max_new_tokens < 1:
    raise UsageError(f"--config.max_new_tokens={c.max_new_tokens}: must be >= 1")
  if c.block_length is not None:
    check_block_length(c)
  if c.temperature < 0:
    raise UsageError(f"--config.temperature={c.temperature}: must be >= 0")
  if c.max_seq_len < 0:
    raise UsageError(f"--config.max_seq_len={c.max_seq_len}: must be >= 0 (0: model maximum)")
  if c.max_thinking_tokens is not None and c.max_thinking_tokens < 0:
    raise UsageError(f"--config.max_thinking_tokens={c.max_thinking_tokens}: must be >= 0")
  if c.output_json and c.interactive:
    raise UsageError("--config.output_json cannot be combined with --config.interactive")
  if c.output_json and c.output_json != "-":
    parent = os.path.dirname(os.path.abspath(c.output_json))
    if not os.path.isdir(parent):
      raise UsageError(f"--config.output_json={c.output_json}: directory {parent} does not exist")
  if not c.interactive and not c.prompt:
    raise UsageError("--config.prompt is empty")


# --- checkpoint -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
  """A checkpoint resolved and checked, weights not yet read."""
  kind: str  # "gguf" or "dir"
  path: str
  cfg: ModelConfig  # as stored in the checkpoint
  tokenizer: TextTokenizer
  gguf: GGUFCheckpoint | None = None  # for kind == "gguf"


def resolve_source(c: config_dict.ConfigDict) -> Source:
  """Finds the checkpoint and reads its config and tokenizer (cheap; no weights yet)."""
  from dllm_jax import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from dllm_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from dllm_jax.tokenizer import TextTokenizer  # pylint: disable=g-import-not-at-top
  if not c.checkpoint:
    raise UsageError("--config.checkpoint is not set (a model directory, a .gguf file, or "
                     f"'{gguf_lib.EMBEDDED_NAME}' for the embedded default)")
  path = c.checkpoint
  if path == gguf_lib.EMBEDDED_NAME:
    try:
      path = gguf_lib.embedded_default_path()
    except FileNotFoundError as e:
      raise UsageError(str(e)) from None
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise UsageError(f"--config.checkpoint: GGUF file {path} not found")
    try:
      with ElapsedBar(f"reading {os.path.basename(path)}"):
        ckpt = gguf_lib.load_gguf(path)
    except ValueError as e:
      raise UsageError(str(e)) from None
    return Source("gguf", path, ckpt.config, ckpt.tokenizer, ckpt)
  if not os.path.isdir(path):
    raise UsageError(f"--config.checkpoint: checkpoint directory {path} not found")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise UsageError(f"--config.checkpoint: {config_path} not found")
  try:
    with open(config_path, encoding="utf-8") as f:
      cfg = ModelConfig.from_hf_config(json.load(f))
  except (json.JSONDecodeError, ValueError, TypeError) as e:
    raise UsageError(f"{config_path}: {_first_line(e)}") from None
  try:
    tok = TextTokenizer.from_dir(path, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(f"missing or bad tokenizer: {e}") from None
  return Source("dir", path, cfg, tok)


def serving_config(c: config_dict.ConfigDict, src: Source) -> ModelConfig:
  """The ModelConfig decoding runs with; refuses modes the checkpoint cannot serve. An unset
  --config.block_length becomes the checkpoint's block_size here."""
  cfg = src.cfg
  if c.mode == "diffusion" and cfg.mask_token_id is None:
    raise UsageError(f"--config.mode=diffusion: checkpoint {src.path} has no mask token "
                     "(an autoregressive model); use mode=ar or mode=spec")
  if c.mode == "spec" and cfg.mask_token_id is None:
    if c.mask_token_id is None:
      raise UsageError(f"--config.mode=spec: checkpoint {src.path} has no mask token; set "
                       "--config.mask_token_id to an id the model never produces, or use mode=ar")
    if not 0 <= c.mask_token_id < cfg.vocab_size:
      raise UsageError(f"--config.mask_token_id={c.mask_token_id}: outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
    # Drafts from an AR model are poor, but the causal verify keeps greedy output exact.
    cfg = cfg.replace(mask_token_id=c.mask_token_id)
  if c.block_length is None:  # the block the checkpoint was trained with
    c.block_length = cfg.block_size
    check_block_length(c)
  if c.chat and not src.tokenizer.chat_template:
    raise UsageError(f"--config.chat=True but {src.path} has no chat template; "
                     "use --config.chat=False for raw text")
  return cfg


def end_think_id(c: config_dict.ConfigDict, src: Source) -> int | None:
  if c.max_thinking_tokens is None:
    return None
  tid = src.tokenizer.end_think_token_id()
  if tid is None:
    raise UsageError("--config.max_thinking_tokens needs a '</think>' token, which the "
                     f"tokenizer of {src.path} does not have")
  return tid


def check_block_length(c: config_dict.ConfigDict) -> None:
  if c.mode != "ar":
    min_block = 2 if c.mode == "spec" else 1  # spec: a seed plus at least one drafted position
    if c.block_length < min_block:
      raise UsageError(f"--config.block_length={c.block_length}: must be >= {min_block} in "
                       f"{c.mode} mode")
  if c.mode == "diffusion" and c.max_new_tokens % c.block_length:
    raise UsageError(f"--config.max_new_tokens={c.max_new_tokens} is not a multiple of "
                     f"--config.block_length={c.block_length} (diffusion decodes whole blocks)")


def check_length(c: config_dict.ConfigDict, cfg: ModelConfig, prompt_len: int) -> None:
  """Prompt + new tokens (+ one block of overshoot) must fit the cache and the model's positions."""
  limit = c.max_seq_len or cfg.max_position_embeddings
  if limit > cfg.max_position_embeddings:
    raise UsageError(f"--config.max_seq_len={c.max_seq_len} exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  block = 1 if c.mode == "ar" else c.block_length
  need = prompt_len + c.max_new_tokens + block
  if need > limit:
    raise UsageError(f"prompt of {prompt_len} tokens + max_new_tokens={c.max_new_tokens} + "
                     f"{'one token' if c.mode == 'ar' else f'block_length={block}'} = {need} "
                     f"exceeds the cache length {limit} (--config.max_seq_len)")


def load_model(c: config_dict.ConfigDict, src: Source, cfg: ModelConfig, mesh
               ) -> tuple[NLDModel, bool]:
  """Reads the weights (with a progress bar) into an NLDModel; returns (model, has draft LoRA)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dllm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dllm_jax import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  name = c.dtype if c.dtype != "auto" else (
      "float32" if jax.default_backend() == "cpu" else "bfloat16")
  dtype = jnp.dtype(name)
  if src.kind == "gguf":
    return gguf_lib.model_from_gguf(src.gguf, cfg=cfg, dtype=dtype, mesh=mesh, progress=True), False
  try:
    pre = ckpt_lib.load_pretrained(src.path, dtype=dtype, mesh=mesh,
                                   lora=bool(c.lora) and c.mode == "spec", progress=True)
  except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
    raise UsageError(_first_line(e)) from None
  pre.model.cfg = cfg  # the serving config (same architecture, possibly a drafting mask id)
  return pre.model, pre.lora is not None


def make_mesh(c: config_dict.ConfigDict):  # -> jax.sharding.Mesh | None
  if not c.mesh_shape:
    return None
  from dllm_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    return sharding.make_mesh(c.mesh_shape)
  except ValueError as e:
    raise UsageError(f"--config.mesh_shape={c.mesh_shape!r}: {e}") from None


# --- prompting and output -------------------------------------------------------------------------

def prompt_ids(c: config_dict.ConfigDict, tok: TextTokenizer, messages: list[dict[str, str]]
               ) -> list[int]:
  if c.chat:
    return tok.encode_chat(messages, add_generation_prompt=True,
                           enable_thinking=bool(c.enable_thinking))
  return tok.encode_raw(messages[-1]["content"])


def first_messages(c: config_dict.ConfigDict) -> list[dict[str, str]]:
  return [{"role": "system", "content": c.system}] if c.system else []


@dataclasses.dataclass
class Session:
  """Everything a generation call needs once the weights are loaded."""
  config: config_dict.ConfigDict
  src: Source
  model: NLDModel
  draft_lora: bool  # the model carries the draft LoRA
  think_id: int | None  # </think> id when a thinking budget is set
  mesh: Any  # jax.sharding.Mesh | None


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


def generate_once(s: Session, ids: list[int], stream: bool) -> tuple[GenerateResult, str]:
  """Runs one generation, streaming text to stdout when `stream`; returns (result, text)."""
  from dllm_jax.decode import LAYER_LAYOUTS, generate  # pylint: disable=g-import-not-at-top
  from dllm_jax.tokenizer import StreamDecoder  # pylint: disable=g-import-not-at-top
  c, tok = s.config, s.src.tokenizer
  decoder = StreamDecoder(tok)
  threshold = {"diffusion": c.diffusion_threshold, "spec": c.spec_threshold}.get(c.mode, 0.0)
  with ElapsedBar("compiling and prefilling" if stream else "generating") as spinner:

    def on_tokens(row: int, new: list[int]) -> None:
      spinner.stop()
      text = decoder.push(new)
      if text:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
      result = generate(
          s.model, [ids], mode=c.mode, max_new_tokens=c.max_new_tokens,
          block_length=c.block_length, threshold=threshold, temperature=c.temperature,
          seed=c.seed, max_thinking_tokens=c.max_thinking_tokens, end_think_token_id=s.think_id,
          causal_context=c.causal_context,
          draft_lora=s.draft_lora if c.mode == "spec" else None,
          mesh=s.mesh, on_tokens=on_tokens if stream else None,
          unroll_layers=LAYER_LAYOUTS[c.layer_layout])
    except ValueError as e:  # generate's argument checks: one line naming the argument
      raise UsageError(_first_line(e)) from None
  if stream:
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
  return result, tok.decode(result.tokens[0])


def stats(c: config_dict.ConfigDict, prompt_len: int, result: GenerateResult) -> dict[str, Any]:
  n = len(result.tokens[0])
  seconds = result.prefill_seconds + result.decode_seconds
  return {"mode": c.mode, "prompt_tokens": prompt_len, "generated_tokens": n,
          "nfe": result.nfe[0], "tokens_per_forward": round(result.tokens_per_forward[0], 3),
          "tokens_per_second": round(n / seconds, 2) if seconds > 0 else None,
          "compile_seconds": round(result.compile_seconds, 2)}


def stats_line(s: dict[str, Any]) -> str:
  tps = "n/a" if s["tokens_per_second"] is None else f"{s['tokens_per_second']:.1f}"
  return (f"[stats] mode={s['mode']} prompt_tokens={s['prompt_tokens']} "
          f"generated_tokens={s['generated_tokens']} nfe={s['nfe']} "
          f"tokens_per_forward={s['tokens_per_forward']:.2f} tokens_per_s={tps} "
          f"(excluding compilation) compile_s={s['compile_seconds']:.1f}")


def write_json(path: str, record: dict[str, Any]) -> None:
  """Writes `record` to `path` atomically (temp file + rename): never a half-written file."""
  text = json.dumps(record, ensure_ascii=False) + "\n"
  if path == "-":
    sys.stdout.write(text)
    return
  from dllm_jax.atomic_files import write_text_atomic  # pylint: disable=g-import-not-at-top
  write_text_atomic(path, text)


# --- main -----------------------------------------------------------------------------------------

def run_one_shot(s: Session) -> None:
  c = s.config
  messages = first_messages(c) + [{"role": "user", "content": c.prompt}]
  ids = prompt_ids(c, s.src.tokenizer, messages)
  stream = c.stream and c.output_json != "-"
  result, text = generate_once(s, ids, stream)
  if not stream and c.output_json != "-":
    print(text)
  st = stats(c, len(ids), result)
  print(stats_line(st), file=sys.stderr)
  if c.output_json:
    write_json(c.output_json, {
        "checkpoint": s.src.path, "prompt": c.prompt, "prompt_ids": ids, "text": text,
        "tokens": result.tokens[0], **st, "decode_nfe": result.decode_nfe[0],
        "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
        "accepted_lengths": (result.accepted_lengths or [None])[0],
        "config": c.to_dict()})


def run_interactive(s: Session) -> None:
  """A multi-turn chat (raw-text mode: independent prompts). Empty line: skip; /reset; /exit."""
  c = s.config
  messages = first_messages(c)
  print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
  while True:
    try:
      line = input("> ")
    except EOFError:
      print(file=sys.stderr)
      return
    line = line.strip()
    if not line:
      continue
    if line == "/exit":
      return
    if line == "/reset":
      messages = first_messages(c)
      continue
    turn = messages + [{"role": "user", "content": line}]
    ids = prompt_ids(c, s.src.tokenizer, turn)
    try:
      check_length(c, s.model.cfg, len(ids))
    except UsageError as e:
      print(f"error: {e} (try /reset)", file=sys.stderr)
      continue
    result, text = generate_once(s, ids, stream=True)
    print(stats_line(stats(c, len(ids), result)), file=sys.stderr)
    if c.chat:
      messages = turn + [{"role": "assistant", "content": text}]


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
  c = parse_config(argv)
  check_knobs(c)
  init_distributed(c)
  src = resolve_source(c)
  cfg = serving_config(c, src)
  think_id = end_think_id(c, src)
  if not c.interactive:  # check the prompt before spending time on the weights
    messages = first_messages(c) + [{"role": "user", "content": c.prompt}]
    check_length(c, cfg, len(prompt_ids(c, src.tokenizer, messages)))
  mesh = make_mesh(c)
  start = time.perf_counter()
  model, draft_lora = load_model(c, src, cfg, mesh)
  print(f"loaded {src.path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
  session = Session(c, src, model, draft_lora, think_id, mesh)
  if c.interactive:
    run_interactive(session)
  else:
    run_one_shot(session)
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
