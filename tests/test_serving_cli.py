"""scripts/serve.py as a process: bad knobs exit 2 with one line; it serves a tiny checkpoint on
127.0.0.1 and exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import tiny_nld

SCRIPT = str(pathlib.Path(__file__).parent.parent / "scripts" / "serve.py")
WAIT = 240.0


def _run(*args):
  return subprocess.run([sys.executable, "-P", SCRIPT, *args], capture_output=True, text=True,
                        timeout=WAIT, check=False)


def test_bad_knobs_exit_2_with_one_line():
  for args, culprit in ((["--config.modes=ar,quantum"], "--config.modes"),
                        (["--config.mode=diffusion"], "--config.mode"),
                        (["--config.port=70000"], "--config.port"),
                        (["--config.quantize=int4"], "--config.quantize"),
                        (["--config.nope=1"], "--config.nope")):
    r = _run(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert culprit in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  r = _run("--help")
  assert r.returncode == 0 and "--config.api_key=" in r.stdout


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url, timeout=5.0):
  with urllib.request.urlopen(url, timeout=timeout) as r:
    return r.status, json.loads(r.read())


def test_serves_then_exits_0_on_sigterm(tmp_path):
  ckpt = tiny_nld.write_checkpoint(tmp_path / "ckpt")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "DLLM_API_KEY"}
  proc = subprocess.Popen(
      [sys.executable, "-P", SCRIPT, f"--config.checkpoint={ckpt}", "--config.modes=ar",
       "--config.mode=ar", "--config.sampling=False", "--config.slots=1",
       "--config.max_prompt_tokens=16", "--config.max_tokens_limit=4",
       "--config.default_max_tokens=4", f"--config.port={port}",
       "--config.compilation_cache_dir=none", "--config.log_level=warning"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    deadline = time.monotonic() + WAIT
    while True:
      assert proc.poll() is None, proc.communicate()[1]
      try:
        status, health = _get(f"http://127.0.0.1:{port}/health")
        break
      except OSError:
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.5)
    assert status == 200 and health["slots"] == 1
    body = json.dumps({"prompt": "the sea is", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
      answer = json.loads(r.read())
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "the sea is" not in stderr  # request text is not logged
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
