"""OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn, the `serve` extra).

  POST /v1/chat/completions   messages through the checkpoint's chat template
  POST /v1/completions        raw text (or token ids)
  GET  /v1/models, GET /health

`stream: true` answers with server-sent events (`data: {chunk}` ... `data: [DONE]`). The decoding
mode and its knobs are extra body fields (`mode`, `block_length`, `threshold`, `fixed_schedule`,
`ar_mix_weight`, `stop_token_ids`); what a request leaves out comes from `ServerConfig.defaults`.
Every error is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}. docs/serving.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dllm_jax.decode.settings import MAX_EOS, settings_for
from dllm_jax.serving.engine import (FINISH_CANCELLED, FINISH_ERROR, Engine, EngineStopped,
                                     PromptTooLong, QueueFull)
from dllm_jax.serving.engine import Request as EngineRequest
from dllm_jax.tokenizer import StreamDecoder, TextTokenizer

log = logging.getLogger(__name__)

UNAUTHENTICATED_PATHS = ("/health",)
MAX_STOP_STRINGS = 4


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """What the HTTP layer enforces and defaults.

  model_name: the id clients name in `model` (and /v1/models lists).
  api_key: when set, every endpoint but /health needs `Authorization: Bearer <api_key>`.
  max_body_bytes, max_connections: limits on a request body and on requests handled at once.
  default_max_tokens: `max_tokens` when a request leaves it out.
  defaults: mode, block_length, diffusion_threshold, spec_threshold, fixed_schedule,
    ar_mix_weight, temperature (not applied to quadratic requests, which are greedy) and seed
    (None: a fresh random seed per request) for fields a request leaves out.
  cors_origins: origins allowed cross-origin requests; empty: no CORS headers at all.
  retry_after_seconds: the Retry-After of a 429 (queue full) or 503 (connections, shutdown).
  """
  model_name: str
  api_key: str | None = None
  max_body_bytes: int = 1 << 20
  max_connections: int = 64
  default_max_tokens: int = 128
  defaults: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
      mode="ar", block_length=None, diffusion_threshold=0.9, spec_threshold=0.0,
      fixed_schedule=False, ar_mix_weight=None, temperature=0.0, seed=None))
  cors_origins: tuple[str, ...] = ()
  retry_after_seconds: int = 1


class APIError(Exception):
  def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}

  def response(self) -> JSONResponse:
    return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- request bodies -------------------------------------------------------------------------------

class _StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  include_usage: bool = False


class _Body(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  model: str | None = None
  max_tokens: int | None = Field(default=None, ge=1)
  temperature: float | None = Field(default=None, ge=0)
  seed: int | None = Field(default=None, ge=0, lt=2**32)
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = None
  n: int = 1
  stream: bool = False
  stream_options: _StreamOptions | None = None
  user: str | None = None  # accepted as OpenAI does; not used
  # NLD decoding (extra body fields)
  mode: Literal["ar", "diffusion", "spec", "quadratic"] | None = None
  block_length: int | None = None
  threshold: float | None = None
  fixed_schedule: bool | None = None
  ar_mix_weight: float | None = None


class _Message(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  role: Literal["system", "user", "assistant"]
  content: str


class ChatBody(_Body):
  messages: list[_Message] = Field(min_length=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Body):
  prompt: str | list[int] | list[str]


def _validation_error(e: ValidationError) -> APIError:
  first = e.errors()[0]
  param = ".".join(str(p) for p in first["loc"]) or None
  if first["type"] == "extra_forbidden":
    return APIError(400, f"{param}: unknown field", param=param, code="unknown_field")
  if first["type"] == "missing":
    return APIError(400, f"{param}: required", param=param, code="missing_field")
  return APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value")


# --- the app --------------------------------------------------------------------------------------

class _Guard:
  """ASGI middleware: the API key (constant-time compare) and the concurrent-request limit, each
  answered with its own OpenAI-shaped error before the app sees the request."""

  def __init__(self, app, config: ServerConfig):
    self.app, self.config = app, config
    self.active = 0
    self._key = None if config.api_key is None else f"Bearer {config.api_key}".encode()

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    error = None
    if self._key is not None and scope["path"] not in UNAUTHENTICATED_PATHS:
      given = dict(scope["headers"]).get(b"authorization", b"")
      if not hmac.compare_digest(given, self._key):
        error = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                         code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if error is None and self.active >= self.config.max_connections:
      error = APIError(503, f"too many concurrent requests (limit {self.config.max_connections})",
                       type_="server_error", code="too_many_connections",
                       headers={"Retry-After": str(self.config.retry_after_seconds)})
    if error is not None:
      return await error.response()(scope, receive, send)
    self.active += 1
    try:
      await self.app(scope, receive, send)
    finally:
      self.active -= 1


def create_app(engine: Engine, tokenizer: TextTokenizer, config: ServerConfig) -> FastAPI:
  """The FastAPI app; the caller owns the engine (started before, stopped after serving)."""
  app = FastAPI(title="dllm_jax", docs_url=None, redoc_url=None, openapi_url=None)
  app.add_middleware(_Guard, config=config)
  if config.cors_origins:  # outermost: it answers preflight requests, which carry no API key
    from fastapi.middleware.cors import CORSMiddleware  # pylint: disable=g-import-not-at-top
    app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                       allow_methods=["GET", "POST"], allow_headers=["Authorization",
                                                                     "Content-Type"])
  created = int(time.time())

  @app.exception_handler(APIError)
  async def _api_error(_, e: APIError):
    return e.response()

  @app.exception_handler(404)
  async def _not_found(request: Request, _):
    return APIError(404, f"no route {request.url.path}", code="not_found").response()

  @app.exception_handler(405)
  async def _bad_method(request: Request, _):
    return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                    code="method_not_allowed").response()

  @app.get("/health")
  async def health():
    return {"status": "ok", **engine.stats()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                        "created": created, "owned_by": "dllm_jax"}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body = await _parse(request, ChatBody, config)
    messages = [m.model_dump() for m in body.messages]
    try:
      prompt = tokenizer.encode_chat(messages)
    except Exception as e:  # a template may raise on a conversation it does not take
      raise APIError(400, f"messages: the chat template refused them: {e}", param="messages",
                     code="invalid_value") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return await _complete(request, engine, tokenizer, config, body, prompt, "messages",
                           max_tokens, param, chat=True)

  @app.post("/v1/completions")
  async def completions(request: Request):
    body = await _parse(request, CompletionBody, config)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
      if len(prompt) != 1:
        raise APIError(400, "prompt: one prompt per request (a list of one string)",
                       param="prompt", code="invalid_value")
      prompt = prompt[0]
    if isinstance(prompt, str):
      prompt = tokenizer.encode_raw(prompt)
    elif any(not 0 <= t < engine.cfg.vocab_size for t in prompt):
      raise APIError(400, f"prompt: token ids must lie in [0, {engine.cfg.vocab_size})",
                     param="prompt", code="invalid_value")
    return await _complete(request, engine, tokenizer, config, body, list(prompt), "prompt",
                           body.max_tokens, "max_tokens", chat=False)

  return app


async def _parse(request: Request, model: type[BaseModel], config: ServerConfig):
  size = 0
  chunks = []
  async for chunk in request.stream():
    size += len(chunk)
    if size > config.max_body_bytes:
      raise APIError(413, f"request body exceeds {config.max_body_bytes} bytes",
                     code="body_too_large")
    chunks.append(chunk)
  try:
    data = json.loads(b"".join(chunks))
  except (ValueError, UnicodeDecodeError) as e:
    raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
  if not isinstance(data, dict):
    raise APIError(400, "the body must be a JSON object", code="invalid_json")
  try:
    body = model.model_validate(data)
  except ValidationError as e:
    raise _validation_error(e) from None
  if body.model is not None and body.model != config.model_name:
    raise APIError(404, f"model {body.model!r} not found (this server serves "
                   f"{config.model_name!r})", param="model", code="model_not_found")
  if body.n != 1:
    raise APIError(400, f"n={body.n}: only n=1 is supported (send one request per choice)",
                   param="n", code="unsupported_value")
  if body.stream_options is not None and not body.stream:
    raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options",
                   code="invalid_value")
  return body


# Settings fields as the API names them.
_PARAMS = {"max_new_tokens": "max_tokens", "eos_token_ids": "stop_token_ids"}
# The NLD body fields each mode takes; the others are refused by name.
_MODE_FIELDS = {"ar": (), "diffusion": ("block_length", "threshold", "fixed_schedule"),
                "spec": ("block_length", "threshold"),
                "quadratic": ("block_length", "ar_mix_weight")}


def _settings(engine: Engine, config: ServerConfig, body: _Body, max_tokens: int | None,
              max_param: str):
  """The request's decode settings and its token limit; APIError(400) naming the field."""
  d = config.defaults
  mode = body.mode or d["mode"]
  if mode not in engine.config.modes:
    raise APIError(400, f"mode={mode!r} is not served (served: {', '.join(engine.config.modes)})",
                   param="mode", code="unsupported_value")
  limit = max_tokens or min(config.default_max_tokens, engine.config.max_new_tokens)
  if limit > engine.config.max_new_tokens:
    raise APIError(400, f"{max_param}={limit}: this server generates at most "
                   f"{engine.config.max_new_tokens} tokens", param=max_param,
                   code="invalid_value")
  for name in ("block_length", "threshold", "fixed_schedule", "ar_mix_weight"):
    if getattr(body, name) is not None and name not in _MODE_FIELDS[mode]:
      raise APIError(400, f"{name}: not a setting of {mode} decoding", param=name,
                     code="invalid_value")
  # Quadratic self-speculation is greedy: the server's default temperature does not apply to it
  # (a request that sends temperature > 0 with it is refused by the settings).
  default_temperature = 0.0 if mode == "quadratic" else d["temperature"]
  temperature = default_temperature if body.temperature is None else body.temperature
  seed = body.seed if body.seed is not None else d["seed"]
  knobs = dict(temperature=float(temperature),
               seed=secrets.randbits(32) if seed is None else int(seed))
  stop_ids = body.stop_token_ids or []
  if stop_ids:
    eos = list(dict.fromkeys([*engine.cfg.eos_token_ids, *stop_ids]))
    if len(eos) > MAX_EOS:
      raise APIError(400, f"stop_token_ids: at most {MAX_EOS - len(engine.cfg.eos_token_ids)} "
                     "ids besides the checkpoint's EOS", param="stop_token_ids",
                     code="invalid_value")
    if any(not 0 <= t < engine.cfg.vocab_size for t in stop_ids):
      raise APIError(400, f"stop_token_ids: ids must lie in [0, {engine.cfg.vocab_size})",
                     param="stop_token_ids", code="invalid_value")
    knobs["eos_token_ids"] = tuple(eos)
  if mode != "ar":
    block = body.block_length or d["block_length"] or engine.block_lengths[0]
    knobs["block_length"] = block
  if mode in ("diffusion", "spec"):
    knobs["threshold"] = body.threshold if body.threshold is not None else d[f"{mode}_threshold"]
  if mode == "diffusion":
    knobs["fixed_schedule"] = (d["fixed_schedule"] if body.fixed_schedule is None
                               else body.fixed_schedule)
  if mode == "quadratic":
    knobs["ar_mix_weight"] = (d["ar_mix_weight"] if body.ar_mix_weight is None
                              else body.ar_mix_weight)
  if mode in ("diffusion", "quadratic") and isinstance(block, int) and block > 0:
    # Whole blocks; the engine stops at `limit`.
    knobs["max_new_tokens"] = -(-limit // block) * block
  knobs.setdefault("max_new_tokens", limit)
  try:
    return settings_for(mode, **knobs), limit
  except ValueError as e:
    raise _settings_error(str(e), max_param) from None


def _settings_error(message: str, max_param: str) -> APIError:
  m = re.match(r"(\w+)[=:]", message)
  field = m.group(1) if m else None
  param = max_param if field == "max_new_tokens" else _PARAMS.get(field, field)
  if field and param != field:
    message = param + message[len(field):]
  return APIError(400, message, param=param, code="invalid_value")


class _TextStream:
  """Ids -> text increments, cut before the first stop string; text that may be the start of a
  stop string is held back until it is not."""

  def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str]):
    self._decoder = StreamDecoder(tokenizer)
    self._stops = [s for s in stops if s]
    self._hold = max((len(s) for s in self._stops), default=1) - 1
    self._text = ""
    self._sent = 0
    self.stopped = False

  def push(self, ids: Sequence[int], final: bool = False) -> str:
    if self.stopped:
      return ""
    self._text += self._decoder.push(ids)
    if final:
      self._text += self._decoder.flush()
    for stop in self._stops:
      at = self._text.find(stop, max(0, self._sent - len(stop) + 1))
      if at >= 0:
        self._text, self.stopped = self._text[:at], True
    end = len(self._text) if final or self.stopped else max(self._sent,
                                                            len(self._text) - self._hold)
    out, self._sent = self._text[self._sent:end], end
    return out


def _usage(request: EngineRequest) -> dict:
  n = len(request.tokens)
  return {"prompt_tokens": len(request.prompt), "completion_tokens": n,
          "total_tokens": len(request.prompt) + n, "forwards": request.nfe,
          "tokens_per_forward": round(request.tokens_per_forward, 4)}


async def _complete(http: Request, engine: Engine, tokenizer: TextTokenizer, config: ServerConfig,
                    body: _Body, prompt: list[int], prompt_param: str, max_tokens: int | None,
                    max_param: str, *, chat: bool):
  settings, limit = _settings(engine, config, body, max_tokens, max_param)
  stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  if len(stops) > MAX_STOP_STRINGS:
    raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings", param="stop",
                   code="invalid_value")
  loop = asyncio.get_running_loop()
  changed = asyncio.Event()
  listener = lambda _: loop.call_soon_threadsafe(changed.set)
  try:
    request = engine.submit(prompt, settings, max_tokens=limit, listener=listener)
  except PromptTooLong as e:
    raise APIError(413, f"{prompt_param}: {e}", param=prompt_param,
                   code="context_length_exceeded") from None
  except QueueFull as e:
    raise APIError(429, f"{e}; retry later", type_="rate_limit_error", code="queue_full",
                   headers={"Retry-After": str(config.retry_after_seconds)}) from None
  except EngineStopped as e:
    raise APIError(503, str(e), type_="server_error", code="shutting_down",
                   headers={"Retry-After": str(config.retry_after_seconds)}) from None
  except ValueError as e:
    raise _settings_error(str(e), max_param) from None
  log.info("request %d: %s, %d prompt tokens", request.id, request.group, len(prompt))
  kind = "chat.completion" if chat else "text_completion"
  rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
  created = int(time.time())
  text = _TextStream(tokenizer, stops)
  include_usage = bool(body.stream_options and body.stream_options.include_usage)

  def finish_reason() -> str:
    """A stop string, and a cancellation by the server (shutdown), end the text like a stop."""
    if text.stopped or request.finish_reason == FINISH_CANCELLED:
      return "stop"
    return request.finish_reason

  def chunk(delta: str | None, reason: str | None, role: bool = False) -> dict:
    if chat:
      d = {} if delta is None else {"content": delta}
      if role:
        d["role"] = "assistant"
      choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
      return {"id": rid, "object": "chat.completion.chunk", "created": created,
              "model": config.model_name, "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created,
            "model": config.model_name, "choices": [{"index": 0, "text": delta or "",
                                                     "finish_reason": reason, "logprobs": None}]}

  async def updates() -> AsyncIterator[str]:
    """Text increments as the engine commits ids; ends when the request ends or a stop string
    appears (which cancels it, freeing the slot)."""
    seen = 0
    while True:
      await changed.wait()
      changed.clear()
      ids = request.tokens
      final = request.finished
      piece = text.push(ids[seen:], final=final)
      seen = len(ids)
      if piece:
        yield piece
      if text.stopped:
        request.cancel()
        return
      if final:
        if request.finish_reason == FINISH_ERROR:
          raise APIError(500, f"decoding failed: {request.error}", type_="server_error",
                         code="engine_error")
        return

  if body.stream:
    async def events() -> AsyncIterator[str]:
      try:
        if chat:
          yield _sse(chunk("", None, role=True))
        async for piece in updates():
          yield _sse(chunk(piece, None))
        yield _sse(chunk(None, finish_reason()))
        if include_usage:
          yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind,
                      "created": created, "model": config.model_name, "choices": [],
                      "usage": _usage(request)})
      except APIError as e:
        yield _sse(e.body())
      finally:
        # A client that went away (the response task is cancelled) frees its slot.
        if not request.finished:
          request.cancel()
          log.info("request %d: cancelled", request.id)
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  pieces = []
  try:
    gen = updates()
    while True:
      next_piece = asyncio.ensure_future(gen.__anext__())
      while not next_piece.done():
        await asyncio.wait([next_piece], timeout=0.25)
        if not next_piece.done() and await http.is_disconnected():
          next_piece.cancel()
          request.cancel()
          log.info("request %d: client went away, cancelled", request.id)
          raise APIError(499, "client closed the request", code="cancelled")
      try:
        pieces.append(next_piece.result())
      except StopAsyncIteration:
        break
  finally:
    if not request.finished:
      request.cancel()
  content = "".join(pieces)
  reason = finish_reason()
  usage = _usage(request)
  log.info("request %d: %s, %d tokens, %d forwards", request.id, reason, len(request.tokens),
           request.nfe)
  if chat:
    choice = {"index": 0, "message": {"role": "assistant", "content": content},
              "finish_reason": reason, "logprobs": None}
  else:
    choice = {"index": 0, "text": content, "finish_reason": reason, "logprobs": None}
  return {"id": rid, "object": kind, "created": created, "model": config.model_name,
          "choices": [choice], "usage": usage}


def _sse(data: dict) -> str:
  return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
