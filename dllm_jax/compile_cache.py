"""JAX's persistent compilation cache for the scripts: a second run of the same command loads its
compiled XLA programs from disk instead of compiling them again.

Tracing and lowering to StableHLO still run in every process (the cache key is computed from the
lowered program), so what a cached run saves is the XLA compilation itself.
"""

from __future__ import annotations

import os

import jax

DEFAULT = "auto"  # default_cache_dir()
DISABLED = ("", "none")


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/dllm_jax/jax, or ~/.cache/dllm_jax/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dllm_jax", "jax")


def enable_compilation_cache(directory: str | None = DEFAULT) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` and returns its absolute path.

  directory: "auto" = default_cache_dir(); "", "none" or None leave the cache off (returns None).
  Every program is cached however quickly it compiled and however small it is: JAX's defaults
  skip programs that compile in under a second, which would leave out the decode programs of
  small models on a fast CPU. Call it before the first compilation (JAX opens the cache then).
  Raises OSError when the directory cannot be created or written.
  """
  if directory is None or directory.strip().lower() in DISABLED:
    return None
  path = default_cache_dir() if directory == DEFAULT else os.path.abspath(
      os.path.expanduser(directory))
  # Whoever can write to the cache can make this user run code: keep it private.
  os.makedirs(path, mode=0o700, exist_ok=True)
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"compilation cache directory {path} is not writable")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path
