r"""Load generator for scripts/serve.py: streaming chat completions at rising concurrency, per mode.

  python scripts/serve.py &                                    # the server, on 127.0.0.1:8000
  python scripts/bench_serve.py                                # ar and spec, concurrency 1..16
  python scripts/bench_serve.py --modes=ar,diffusion,spec --concurrency=1,4 --requests=8

For every mode and concurrency level it sends `--requests` requests (default: the concurrency,
at least 4) with at most `concurrency` in flight, mixing short and long prompts and
output lengths, and prints one table row: requests/s, aggregate output tokens/s, time to first
token (TTFT) and inter-token latency (ITL) at p50 and p99. ITL of a request is (time of its last
text chunk - time of its first) / (completion tokens - 1): a diffusion block or a speculative run
arrives as one chunk, so per-chunk gaps would not be per token. Only ever talks to 127.0.0.1 and
stops by itself (every request and the whole run have time limits).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import urllib.parse

import httpx
import numpy as np

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot who learns to paint, in about five sentences, with a "
    "happy ending and one surprising twist involving the ocean.",
    "List three prime numbers.",
    "Summarise the plot of a heist film you invent: the crew, the target, the plan, and what "
    "goes wrong. Keep it brief.",
]
MAX_TOKENS = (16, 48, 96)
LOOPBACK = ("127.0.0.1", "localhost")


@dataclasses.dataclass
class Sample:
  ttft: float
  itl: float | None
  tokens: int


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
  p.add_argument("--api_key", default=os.environ.get("DLLM_API_KEY", ""),
                 help="bearer token (default: $DLLM_API_KEY)")
  p.add_argument("--modes", default="ar,spec", help="comma-separated decoding modes")
  p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
  p.add_argument("--requests", type=int, default=0,
                 help="requests per level (0: the concurrency, at least 4)")
  p.add_argument("--max_tokens", default=",".join(map(str, MAX_TOKENS)),
                 help="output lengths to cycle through")
  p.add_argument("--request_timeout", type=float, default=300.0, help="seconds per request")
  p.add_argument("--total_timeout", type=float, default=3600.0, help="seconds for the whole run")
  args = p.parse_args(argv[1:])
  host = urllib.parse.urlparse(args.url).hostname
  if host not in LOOPBACK:
    p.error(f"--url={args.url}: only 127.0.0.1 / localhost is allowed")
  try:
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.lengths = [int(m) for m in args.max_tokens.split(",")]
  except ValueError:
    p.error("--concurrency and --max_tokens take comma-separated integers")
  if min(args.levels) < 1 or min(args.lengths) < 1:
    p.error("--concurrency and --max_tokens must be positive")
  args.modes = [m for m in args.modes.split(",") if m]
  return args


async def one_request(client: httpx.AsyncClient, model: str, mode: str, prompt: str,
                      max_tokens: int) -> Sample:
  body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
          "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "mode": mode,
          "temperature": 0}
  start = time.perf_counter()
  first = last = None
  tokens = 0
  async with client.stream("POST", "/v1/chat/completions", json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[len("data: "):])
      if "error" in event:
        raise RuntimeError(event["error"]["message"])
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
      for choice in event.get("choices", []):
        if choice["delta"].get("content"):
          now = time.perf_counter()
          first = now if first is None else first
          last = now
  if first is None:  # nothing but an immediate EOS
    first = last = time.perf_counter()
  itl = (last - first) / (tokens - 1) if tokens > 1 else None
  return Sample(first - start, itl, tokens)


async def level(client, model, mode, concurrency, n, lengths) -> dict:
  gate = asyncio.Semaphore(concurrency)

  async def bounded(i):
    async with gate:
      return await one_request(client, model, mode, PROMPTS[i % len(PROMPTS)],
                               lengths[i % len(lengths)])

  start = time.perf_counter()
  results = await asyncio.gather(*(bounded(i) for i in range(n)), return_exceptions=True)
  wall = time.perf_counter() - start
  samples = [r for r in results if isinstance(r, Sample)]
  failures = [r for r in results if not isinstance(r, Sample)]
  for e in failures[:1]:
    print(f"{mode} x{concurrency}: {len(failures)} failed, e.g. {type(e).__name__}: {e}",
          file=sys.stderr)
  ttft = np.array([s.ttft for s in samples] or [np.nan])
  itl = np.array([s.itl for s in samples if s.itl is not None] or [np.nan])
  return dict(mode=mode, concurrency=concurrency, requests=len(samples), failed=len(failures),
              rps=len(samples) / wall,
              tokens_per_s=sum(s.tokens for s in samples) / wall,
              ttft_p50=np.nanpercentile(ttft, 50), ttft_p99=np.nanpercentile(ttft, 99),
              itl_p50=np.nanpercentile(itl, 50), itl_p99=np.nanpercentile(itl, 99))


def table(rows: list[dict]) -> str:
  head = ("| mode | concurrency | requests ok / failed | req/s | output tok/s | TTFT p50 (ms) "
          "| TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |")
  out = [head, "|" + "---|" * 9]
  for r in rows:
    out.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} / {r['failed']} | "
               f"{r['rps']:.2f} | "
               f"{r['tokens_per_s']:.1f} | {1e3 * r['ttft_p50']:.0f} | {1e3 * r['ttft_p99']:.0f} | "
               f"{1e3 * r['itl_p50']:.1f} | {1e3 * r['itl_p99']:.1f} |")
  return "\n".join(out)


async def run(args, rows: list[dict]) -> None:
  """Appends one row per (mode, concurrency) to `rows` as each level ends."""
  headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
  timeout = httpx.Timeout(args.request_timeout)
  limits = httpx.Limits(max_connections=max(args.levels))
  async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout,
                               limits=limits, trust_env=False) as client:
    models = (await client.get("/v1/models")).raise_for_status().json()
    model = models["data"][0]["id"]
    await one_request(client, model, args.modes[0], PROMPTS[0], 4)  # warm the HTTP path
    for mode in args.modes:
      for c in args.levels:
        n = args.requests or max(4, c)
        rows.append(await level(client, model, mode, c, n, args.lengths))
        r = rows[-1]
        print(f"{mode} x{c}: {r['rps']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s", file=sys.stderr)


def main(argv) -> int:
  args = parse_args(argv)
  rows: list[dict] = []
  status = 0
  try:
    asyncio.run(asyncio.wait_for(run(args, rows), args.total_timeout))
  except (httpx.HTTPError, RuntimeError, TimeoutError) as e:
    print(f"bench_serve.py: stopped early: {type(e).__name__}: {e}", file=sys.stderr)
    status = 1
  if rows:  # what was measured before a failure is still worth printing
    print(table(rows))
  return status if rows else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
