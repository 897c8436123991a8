"""The serving engine (dllm_jax/serving/engine.py): every request's ids equal `generate` on that
request alone while requests of all four modes and different knobs share the slots, continuous
batching (joining mid-flight, slots freed on finish and cancel), a bounded queue, and no
compilation once the engine has started."""

from __future__ import annotations

import contextlib
import threading

import jax
import pytest

import decode_reference as ref
from dllm_jax.decode import AR, Diffusion, Quadratic, Spec, generate
from dllm_jax.serving import Engine, EngineConfig, PromptTooLong, QueueFull

# N and the structured model are those of tests/test_decode_parity.py and tests/test_quadratic.py,
# so `generate`'s programs for the cases below that those tests also run (batch 1, block 4) are
# compiled once in the session and come from the compilation cache the second time.
N, EOS, WAIT = 32, 63, 60.0
# Every test shares an engine (or server) whose start-up compiles the programs of all four modes.
pytestmark = pytest.mark.slow

# (prompt, settings): the four modes, greedy and sampled, thresholds, fixed schedule, AR/draft mix,
# EOS or not, different lengths; more requests than slots, so some wait for a slot to free.
CASES = [
    ([5, 9, 20, 33, 41], AR(max_new_tokens=N, eos_token_ids=EOS)),
    ([60, 2, 3], Diffusion(max_new_tokens=N, block_length=4, threshold=0.9, eos_token_ids=EOS)),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13], Spec(max_new_tokens=N, block_length=4,
                                                   eos_token_ids=())),
    ([7, 8, 9], Diffusion(max_new_tokens=N, block_length=4, temperature=0.8, seed=5,
                          fixed_schedule=True, eos_token_ids=())),
    ([3, 4], AR(max_new_tokens=N, temperature=1.0, seed=3)),
    ([3, 4, 11, 50], Spec(max_new_tokens=N, block_length=4, temperature=0.7, seed=9,
                          threshold=0.5, eos_token_ids=())),
    ([44, 45, 46, 47, 48, 49, 50], Diffusion(max_new_tokens=N, block_length=4, threshold=0.5,
                                             eos_token_ids=EOS)),
    ([9, 30, 31, 32, 33, 34], Quadratic(max_new_tokens=N, block_length=4, eos_token_ids=EOS)),
    ([12, 6, 40], Quadratic(max_new_tokens=N, block_length=4, ar_mix_weight=0.5,
                            eos_token_ids=())),
]


@pytest.fixture(scope="module")
def model():
  return ref.structured_model()


@pytest.fixture(scope="module")
def engine(model):
  # Two prompt buckets (16, 32): the cache rows are longer than those of `generate` on a short
  # prompt, which must not change any id.
  e = Engine(model, EngineConfig(slots=3, max_prompt_tokens=32, max_new_tokens=N,
                                 block_lengths=(4,), queue_size=10))
  e.start()
  yield e
  e.stop(cancel=True, timeout=WAIT)


@pytest.fixture(scope="module")
def expected(model):
  """generate on each request alone; spec may overshoot max_new_tokens, the engine stops there."""
  return [generate(model, [p], s) for p, s in CASES]


def _same_as_alone(request, want, settings):
  assert request.finished, request.id
  assert request.tokens == want.tokens[0][:settings.max_new_tokens]
  assert request.nfe == want.nfe[0]


def _idle(engine):
  return engine.stats()["busy"] == 0 and engine.stats()["queued"] == 0


def test_mixed_modes_in_flight_equal_generate_alone_and_nothing_compiles(engine, expected):
  compiles = []

  def listen(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    requests = [engine.submit(p, s) for p, s in CASES[:4]]  # 3 slots: one waits
    requests += [engine.submit(p, s) for p, s in CASES[4:]]
    for r in requests:
      assert r.wait(WAIT)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  for r, want, (_, settings) in zip(requests, expected, CASES):
    _same_as_alone(r, want, settings)
    assert r.finish_reason == ("stop" if r.tokens[-1] in r.settings.eos_token_ids else "length")
  assert compiles == []
  assert {r.slot for r in requests} == {0, 1, 2}
  assert _idle(engine)


def test_a_request_joins_while_another_decodes(engine, expected):
  joined = []

  def on_first_ids(request):  # runs on the engine thread: the long request has more to decode
    if not joined:
      joined.append(engine.submit(*CASES[1]))

  long_one = engine.submit(*CASES[2], listener=on_first_ids)
  assert long_one.wait(WAIT) and joined[0].wait(WAIT)
  assert joined[0].first_token_at < long_one.finished_at
  assert joined[0].slot != long_one.slot
  _same_as_alone(long_one, expected[2], CASES[2][1])
  _same_as_alone(joined[0], expected[1], CASES[1][1])
  assert _idle(engine)


def test_cancel_frees_the_slot_and_the_next_request_is_unaffected(engine, expected):
  def cancel(request):
    request.cancel()

  cancelled = engine.submit(*CASES[0], listener=cancel)
  assert cancelled.wait(WAIT)
  assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) < N
  assert _idle(engine)
  after = engine.submit(*CASES[5])  # reuses the freed cache row
  assert after.wait(WAIT)
  _same_as_alone(after, expected[5], CASES[5][1])


def test_a_failing_listener_fails_nothing_else(engine, expected):
  def broken(request):
    raise RuntimeError("listener bug")

  first = engine.submit(*CASES[0], listener=broken)
  second = engine.submit(*CASES[1])
  assert first.wait(WAIT) and second.wait(WAIT)
  _same_as_alone(first, expected[0], CASES[0][1])
  _same_as_alone(second, expected[1], CASES[1][1])


@contextlib.contextmanager
def engine_thread_held(engine):
  """Submits CASES[0] with a listener that keeps the engine thread in its first call, so nothing
  leaves the queue meanwhile; yields that request once the thread is held. On exit the request is
  cancelled and the thread let go."""
  gate, held = threading.Event(), []

  def hold(request):
    if not held:
      held.append(request)
      gate.wait(WAIT)

  first = engine.submit(*CASES[0], listener=hold)
  try:
    for _ in range(int(WAIT * 20)):
      if held:
        break
      threading.Event().wait(0.05)
    assert held, "the engine thread never called the listener"
    yield first
  finally:
    first.cancel()
    gate.set()


def test_the_queue_is_bounded(engine):
  queued = []
  with engine_thread_held(engine) as first:
    try:
      queued = [engine.submit(*CASES[4]) for _ in range(engine.config.queue_size)]
      with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(*CASES[4])
    finally:
      for r in queued:
        r.cancel()
  for r in [first, *queued]:
    assert r.wait(WAIT) and r.finish_reason == "cancelled"
  assert _idle(engine)


def test_batched_steps_keep_slots_apart(model, expected):
  """batched=True: one vmapped step per group over all slots. Greedy requests of two modes, one
  cancelled mid-flight, the others equal to generate alone (the structured model's confident
  choices leave no near-tie for batch rounding to flip)."""
  e = Engine(model, EngineConfig(slots=2, max_prompt_tokens=16, max_new_tokens=N,
                                 modes=("ar", "spec"), block_lengths=(4,), sampling=False,
                                 batched=True))
  e.start()
  try:
    cancelled = e.submit(CASES[2][0], CASES[2][1], listener=lambda r: r.cancel())
    requests = [e.submit(*CASES[0]), e.submit(*CASES[2])]
    for r in [cancelled, *requests]:
      assert r.wait(WAIT)
  finally:
    e.stop(cancel=True, timeout=WAIT)
  assert cancelled.finish_reason == "cancelled"
  _same_as_alone(requests[0], expected[0], CASES[0][1])
  _same_as_alone(requests[1], expected[2], CASES[2][1])


def test_bad_requests_are_refused_with_the_field_named(engine):
  with pytest.raises(PromptTooLong, match="33 tokens"):
    engine.submit(list(range(1, 34)), AR(max_new_tokens=4))
  with pytest.raises(ValueError,
                     match=f"max_new_tokens={2 * N}: this server generates at most {N}"):
    engine.submit([1, 2], AR(max_new_tokens=2 * N))
  with pytest.raises(ValueError, match="block_length=8 is not served"):
    engine.submit([1, 2], Spec(max_new_tokens=8, block_length=8))
  with pytest.raises(ValueError, match="outside"):
    engine.submit([1, 999], AR(max_new_tokens=4))


# --- the HTTP layer (dllm_jax/serving/http.py) through the official openai client ----------------

KEY = "test-key"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  import tiny_nld
  from dllm_jax.tokenizer import TextTokenizer
  directory = tmp_path_factory.mktemp("tokenizer")
  tiny_nld.write_tokenizer(directory, 256)
  return TextTokenizer.from_dir(str(directory), bos_token_id=1, eos_token_id=11)


@pytest.fixture(scope="module")
def server(engine, tokenizer):
  """uvicorn on 127.0.0.1 (a free port) in a thread, over the module's engine."""
  import uvicorn
  from dllm_jax.serving.http import ServerConfig, create_app
  config = ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=4096, max_connections=8,
                        default_max_tokens=8,
                        defaults=dict(mode="ar", block_length=None, diffusion_threshold=0.9,
                                      spec_threshold=0.0, fixed_schedule=False,
                                      ar_mix_weight=None, temperature=0.0, seed=None))
  app = create_app(engine, tokenizer, config)
  uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  for _ in range(int(WAIT * 10)):
    if uv.started:
      break
    threading.Event().wait(0.1)
  port = uv.servers[0].sockets[0].getsockname()[1]
  yield f"http://127.0.0.1:{port}"
  uv.should_exit = True
  thread.join(WAIT)


@pytest.fixture(scope="module")
def client(server):
  import openai
  return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=WAIT)


MESSAGES = [{"role": "user", "content": "why is the sky blue ?"}]


def test_chat_equals_the_engine_and_reports_usage(client, engine, tokenizer):
  # The engine equals generate (above); here the HTTP layer must equal the engine, on a prompt of
  # the second bucket.
  prompt = tokenizer.encode_chat(MESSAGES)
  want = engine.submit(prompt, Spec(max_new_tokens=N, block_length=4))
  assert want.wait(WAIT)
  ids = want.tokens
  got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=N,
                                       extra_body={"mode": "spec", "block_length": 4})
  assert got.object == "chat.completion" and got.model == "tiny"
  assert got.choices[0].message.content == tokenizer.decode(ids)
  assert got.choices[0].finish_reason == want.finish_reason
  usage = got.usage.model_dump()
  assert len(prompt) > 16 and usage["prompt_tokens"] == len(prompt)
  assert usage["completion_tokens"] == len(ids) and usage["total_tokens"] == len(prompt) + len(ids)
  assert usage["forwards"] == want.nfe
  assert usage["tokens_per_forward"] == pytest.approx(len(ids) / want.nfe, abs=1e-4)

  chunks = list(client.chat.completions.create(
      model="tiny", messages=MESSAGES, max_completion_tokens=N, stream=True,
      stream_options={"include_usage": True}, extra_body={"mode": "spec", "block_length": 4}))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == got.choices[0].message.content
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_completions_stop_strings_and_stop_ids(client, model, tokenizer):
  prompt = tokenizer.encode_raw("the sea is")
  settings = Diffusion(max_new_tokens=N, block_length=4, eos_token_ids=())
  ids = generate(model, [prompt], settings).tokens[0]
  full = tokenizer.decode(ids)
  got = client.completions.create(model="tiny", prompt="the sea is", max_tokens=N,
                                  extra_body={"mode": "diffusion", "block_length": 4})
  assert got.choices[0].text == full
  stop = tokenizer.decode(ids[3:5])
  cut = client.completions.create(model="tiny", prompt="the sea is", max_tokens=N, stop=[stop],
                                  extra_body={"mode": "diffusion", "block_length": 4})
  assert cut.choices[0].text == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = client.completions.create(model="tiny", prompt="the sea is", max_tokens=N,
                                       stop=stop, stream=True,
                                       extra_body={"mode": "diffusion", "block_length": 4})
  assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
  stop_id = client.completions.create(model="tiny", prompt=prompt, max_tokens=N,
                                      extra_body={"mode": "ar", "stop_token_ids": [ids[0]]})
  assert stop_id.choices[0].finish_reason == "stop" and stop_id.usage.completion_tokens == 1


def test_quadratic_over_http_equals_generate(client, model, tokenizer):
  # max_tokens need not be a whole number of blocks: the engine decodes whole blocks and stops.
  prompt = tokenizer.encode_raw("the sea is")
  want = generate(model, [prompt], Quadratic(max_new_tokens=N, block_length=4, ar_mix_weight=0.5,
                                             eos_token_ids=())).tokens[0][:N - 2]
  got = client.completions.create(model="tiny", prompt="the sea is", max_tokens=N - 2,
                                  extra_body={"mode": "quadratic", "block_length": 4,
                                              "ar_mix_weight": 0.5})
  assert got.choices[0].text == tokenizer.decode(want)
  assert got.usage.completion_tokens == len(want) == N - 2


def test_models_health_and_auth(client, server):
  import httpx
  import openai
  assert [m.id for m in client.models.list().data] == ["tiny"]
  health = httpx.get(f"{server}/health", trust_env=False)
  assert health.status_code == 200 and health.json()["status"] == "ok"
  for key in ("wrong", ""):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
      bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
  assert httpx.get(f"{server}/v1/models", trust_env=False).status_code == 401
  # No CORS unless configured: a cross-origin caller gets no allow-origin header.
  r = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                "Origin": "https://elsewhere.example"},
                trust_env=False)
  assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_concurrent_connection_limit():
  import asyncio
  from dllm_jax.serving.http import ServerConfig, _Guard  # pylint: disable=protected-access
  release = asyncio.Event()

  async def slow_app(scope, receive, send):
    await release.wait()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})

  async def call(guard):
    sent = []

    async def send(message):
      sent.append(message)

    scope = {"type": "http", "path": "/v1/models", "headers": [], "method": "GET"}
    await guard(scope, None, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

  async def scenario():
    guard = _Guard(slow_app, ServerConfig(model_name="tiny", max_connections=2))
    busy = [asyncio.ensure_future(call(guard)) for _ in range(2)]
    await asyncio.sleep(0)
    status, body = await call(guard)
    release.set()
    return status, body, [await b for b in busy]

  status, body, others = asyncio.run(scenario())
  assert status == 503 and b"too many concurrent requests (limit 2)" in body
  assert [s for s, _ in others] == [200, 200]


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(temperature=-1.0), 400, "temperature"),
    (dict(n=2), 400, "n"),
    (dict(max_tokens=N + 1), 400, "max_tokens"),
    (dict(extra_body={"mode": "quantum"}), 400, "mode"),
    (dict(extra_body={"mode": "diffusion", "threshold": 2.0}), 400, "threshold"),
    (dict(extra_body={"mode": "spec", "block_length": 8}), 400, "block_length"),
    (dict(temperature=0.5, extra_body={"mode": "quadratic"}), 400, "temperature"),
    (dict(extra_body={"mode": "quadratic", "threshold": 0.5}), 400, "threshold"),
    (dict(extra_body={"mode": "quadratic", "ar_mix_weight": 1.5}), 400, "ar_mix_weight"),
    (dict(extra_body={"mode": "spec", "ar_mix_weight": 0.5}), 400, "ar_mix_weight"),
    (dict(extra_body={"bogus": 1}), 400, "bogus"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(messages=[{"role": "user", "content": "sea " * 40}]), 413, "messages"),
    (dict(max_completion_tokens=0), 400, "max_completion_tokens"),
])
def test_errors_are_openai_shaped_and_name_the_field(client, kwargs, status, param):
  import openai
  kwargs = {"model": "tiny", "messages": MESSAGES, **kwargs}
  with pytest.raises(openai.APIStatusError) as e:
    client.chat.completions.create(**kwargs)
  assert e.value.status_code == status
  assert e.value.body["param"] == param and e.value.body["message"]
  assert set(e.value.body) == {"message", "type", "param", "code"}


def test_body_limit(server):
  import httpx
  r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                 content=b"{" + b" " * 5000 + b"}", trust_env=False)
  assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]


def test_full_queue_answers_429_and_a_client_that_leaves_is_cancelled(engine, client, server,
                                                                      monkeypatch):
  import httpx
  import openai
  submitted = []
  submit = engine.submit

  def recording_submit(*args, **kw):
    submitted.append(submit(*args, **kw))
    return submitted[-1]

  queued = []
  with engine_thread_held(engine) as first:
    try:
      monkeypatch.setattr(engine, "submit", recording_submit)
      # A streaming client reads the first event, then goes away while its request waits.
      body = {"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 8}
      with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, trust_env=False,
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT) as r:
        assert r.status_code == 200
        next(r.iter_lines())
      for _ in range(int(WAIT * 20)):
        if submitted and submitted[0].cancelled:
          break
        threading.Event().wait(0.05)
      assert submitted[0].cancelled
      queued = [submit(*CASES[4]) for _ in range(engine.config.queue_size - 1)]
      with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES)
      assert e.value.response.headers["retry-after"] == "1"
      assert e.value.body["code"] == "queue_full"
    finally:
      for r in queued:
        r.cancel()
  assert submitted[0].wait(WAIT) and submitted[0].finish_reason == "cancelled"
  for r in [first, *queued]:
    assert r.wait(WAIT)
  assert _idle(engine)
