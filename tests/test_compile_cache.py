"""The persistent compilation cache: entries are written on the CPU, a second process compiles
nothing it already compiled (JAX logs a cache hit), and the switch-off values leave JAX alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from dllm_jax import compile_cache

PROGRAM = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from dllm_jax.compile_cache import enable_compilation_cache
    print(enable_compilation_cache(sys.argv[1]))
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(float(f(jnp.ones((8, 8)))))
""")


def _run(cache: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", PROGRAM, cache], capture_output=True, text=True,
                        env=env, timeout=300, check=True)


def test_second_process_hits_the_cache(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}
  cache = tmp_path / "cache"
  first = _run(str(cache), env)
  assert first.stdout.splitlines()[0] == str(cache)
  entries = sorted(p.name for p in cache.iterdir())
  assert any(name.startswith("jit__lambda") for name in entries), entries
  second = _run(str(cache), env)
  assert second.stdout.splitlines()[1] == first.stdout.splitlines()[1]
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr, second.stderr
  assert "Persistent compilation cache hit" not in first.stderr


def test_switched_off_and_default_locations(tmp_path, monkeypatch):
  for off in ("", "none", "None", None):
    assert compile_cache.enable_compilation_cache(off) is None
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_cache_dir() == str(tmp_path / "dllm_jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "dllm_jax" / "jax")
