r"""Serve a checkpoint over HTTP with an OpenAI-compatible API (continuous batching, all four
decoding modes in flight at once).

  python scripts/serve.py                                      # embedded SmolLM2, 127.0.0.1:8000
  python scripts/serve.py --config=configs/serve_nld.py --config.checkpoint=/path/to/NLD-8B
  python scripts/serve.py --config.port=9000 --config.api_key=secret --config.slots=8

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Every
program is compiled before the server starts listening (a progress bar on stderr; the compilation
cache makes the next start faster). SIGTERM or Ctrl-C stops accepting, lets requests in flight
finish for up to --config.shutdown_timeout seconds, cancels the rest and exits 0. Bad input exits
with code 2 and a one-line message. See docs/serving.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import signal
import sys

from ml_collections import config_dict

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "serve.py")
API_KEY_ENV = "DLLM_API_KEY"
MODES = ("ar", "diffusion", "spec", "quadratic")
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_USAGE = 2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as cli  # pylint: disable=g-import-not-at-top,wrong-import-position

UsageError = cli.UsageError


def parse_config(argv: list[str]) -> config_dict.ConfigDict:
  return cli.parse_config(argv, DEFAULT_CONFIG, "server config file")


def help_text(argv: list[str]) -> str:
  c = parse_config(argv)
  notes = cli.knob_descriptions(DEFAULT_CONFIG)
  lines = [__doc__.strip(), "", "Knobs (set with --config.<key>=<value>; defaults as the config "
           "file in use sets them):", ""]
  for key in notes:
    value = c[key]
    shown = shlex.quote(value) if isinstance(value, str) else str(value)
    lines += [f"  --config.{key}={shown}", f"      {notes[key]}"]
  return "\n".join(lines)


def _csv(c, key: str) -> list[str]:
  return [p.strip() for p in c[key].split(",") if p.strip()]


def check(c: config_dict.ConfigDict) -> dict:
  """Every knob that needs no checkpoint; returns the parsed lists."""
  if not c.checkpoint:
    raise UsageError("--config.checkpoint: required (a model directory, a .gguf file or "
                     "'smollm2')")
  modes = _csv(c, "modes")
  if not modes or any(m not in MODES for m in modes):
    raise UsageError(f"--config.modes={c.modes!r}: expected a comma-separated subset of "
                     f"{', '.join(MODES)}")
  if c.mode not in modes:
    raise UsageError(f"--config.mode={c.mode!r}: not among the served --config.modes={c.modes}")
  try:
    blocks = tuple(int(b) for b in _csv(c, "block_lengths"))
  except ValueError:
    raise UsageError(f"--config.block_lengths={c.block_lengths!r}: expected comma-separated "
                     "integers") from None
  if any(b < 2 for b in blocks):
    raise UsageError(f"--config.block_lengths={c.block_lengths!r}: each must be >= 2")
  if c.block_length is not None and blocks and c.block_length not in blocks:
    raise UsageError(f"--config.block_length={c.block_length}: not among --config.block_lengths")
  for key in ("slots", "queue_size", "max_connections", "max_body_bytes", "max_prompt_tokens",
              "max_tokens_limit", "default_max_tokens"):
    if c[key] < 1:
      raise UsageError(f"--config.{key}={c[key]}: must be >= 1")
  if c.default_max_tokens > c.max_tokens_limit:
    raise UsageError(f"--config.default_max_tokens={c.default_max_tokens}: exceeds "
                     f"--config.max_tokens_limit={c.max_tokens_limit}")
  if not 0 <= c.port <= 65535:
    raise UsageError(f"--config.port={c.port}: expected 0..65535")
  if c.shutdown_timeout < 0:
    raise UsageError(f"--config.shutdown_timeout={c.shutdown_timeout}: must be >= 0")
  if c.log_level not in LOG_LEVELS:
    raise UsageError(f"--config.log_level={c.log_level!r}: expected one of "
                     f"{', '.join(LOG_LEVELS)}")
  if c.dtype not in cli.DTYPES:
    raise UsageError(f"--config.dtype={c.dtype!r}: expected one of {', '.join(cli.DTYPES)}")
  if c.quantize not in cli.QUANTIZE_MODES:
    raise UsageError(f"--config.quantize={c.quantize!r}: expected one of "
                     f"{', '.join(repr(m) for m in cli.QUANTIZE_MODES)}")
  if c.attention_impl not in cli.ATTENTION_IMPLS:
    raise UsageError(f"--config.attention_impl={c.attention_impl!r}: expected one of "
                     f"{', '.join(cli.ATTENTION_IMPLS)}")
  if c.temperature < 0:
    raise UsageError(f"--config.temperature={c.temperature}: must be >= 0")
  if c.temperature > 0 and not c.sampling:
    raise UsageError("--config.temperature > 0 needs --config.sampling=True")
  for key in ("diffusion_threshold", "spec_threshold"):
    if not 0 <= c[key] <= 1:
      raise UsageError(f"--config.{key}={c[key]}: expected a number in [0, 1]")
  if c.ar_mix_weight is not None and not 0 <= c.ar_mix_weight <= 1:
    raise UsageError(f"--config.ar_mix_weight={c.ar_mix_weight}: expected a number in [0, 1]")
  return dict(modes=tuple(modes), blocks=blocks or None)


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def main(argv: list[str]) -> int:
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(help_text([a for a in argv if a not in ("--help", "-h", "--helpfull")]))
    return 0
  c = parse_config(argv)
  parsed = check(c)
  api_key = c.api_key or os.environ.get(API_KEY_ENV) or None
  logging.basicConfig(level=c.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
  if not is_loopback(c.host) and api_key is None:
    logging.warning("binding %s without an API key: anyone who can reach it can use it", c.host)

  import jax  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  from dllm_jax import compile_cache, loader, sharding  # pylint: disable=g-import-not-at-top
  from dllm_jax.serving import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from dllm_jax.serving.http import ServerConfig, create_app  # pylint: disable=g-import-not-at-top

  try:
    compile_cache.enable_compilation_cache(c.compilation_cache_dir)
  except OSError as e:
    raise UsageError(f"--config.compilation_cache_dir: {e}") from None
  try:
    desc = loader.inspect(c.checkpoint)
  except (OSError, ValueError) as e:
    raise UsageError(f"--config.checkpoint: {cli._first_line(e)}") from None  # pylint: disable=protected-access
  if desc.tokenizer is None:
    raise UsageError(f"--config.checkpoint={c.checkpoint}: has no tokenizer.json")
  mesh = None
  if c.mesh_shape:
    try:
      mesh = sharding.make_mesh(c.mesh_shape)
    except ValueError as e:
      raise UsageError(f"--config.mesh_shape: {e}") from None
  loaded = loader.load(desc, dtype=c.dtype, mesh=mesh, lora=c.lora,
                       attention_impl=c.attention_impl, progress=True,
                       quantize=c.quantize or None)
  try:
    engine = Engine(loaded.model, EngineConfig(
        slots=c.slots, max_prompt_tokens=c.max_prompt_tokens, max_new_tokens=c.max_tokens_limit,
        modes=parsed["modes"], block_lengths=parsed["blocks"], sampling=c.sampling,
        batched=c.batched, queue_size=c.queue_size, spec_mask_token_id=c.mask_token_id),
                    mesh=mesh)
  except ValueError as e:
    raise UsageError(f"--config: {e}") from None
  if c.block_length is not None and c.block_length not in engine.block_lengths:
    raise UsageError(f"--config.block_length={c.block_length}: not a served block length")
  engine.start(progress=True)
  logging.info("compiled %d programs in %.1f s on %s", len(engine.groups) * 2 + len(engine.buckets),
               engine.compile_seconds, jax.devices()[0].platform)
  name = c.model_name or os.path.basename(os.path.normpath(c.checkpoint))
  server_config = ServerConfig(
      model_name=name, api_key=api_key, max_body_bytes=c.max_body_bytes,
      max_connections=c.max_connections, default_max_tokens=c.default_max_tokens,
      defaults=dict(mode=c.mode, block_length=c.block_length,
                    diffusion_threshold=c.diffusion_threshold, spec_threshold=c.spec_threshold,
                    fixed_schedule=c.fixed_schedule, ar_mix_weight=c.ar_mix_weight,
                    temperature=c.temperature, seed=c.seed),
      cors_origins=tuple(_csv(c, "cors_origins")))
  app = create_app(engine, loaded.tokenizer, server_config)
  server = uvicorn.Server(uvicorn.Config(app, host=c.host, port=c.port, log_level=c.log_level,
                                         timeout_graceful_shutdown=c.shutdown_timeout,
                                         access_log=True))
  # uvicorn handles SIGINT / SIGTERM (stop accepting, wait for requests in flight) and then raises
  # the signal again for the handler that was in place before it: by then the server has stopped,
  # so that handler ignores it and the process exits 0.
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: None)
  try:
    server.run()
  finally:
    engine.stop(cancel=True, timeout=60)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main(sys.argv))
  except UsageError as e:
    print(f"serve.py: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
