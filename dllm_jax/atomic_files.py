"""Files and directories that appear complete or not at all: written beside their destination,
then renamed onto it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import shutil
import tempfile

from dllm_jax.errors import CheckpointError


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` through a temp file beside `path` and a rename: the file appears complete or
  not at all, with the permissions a plain open() would give it (not mkstemp's 0600)."""
  path = Path(path).absolute()
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, replace: bool = False):
  """Yields a temp dir beside `out_dir` that is renamed onto it only if the body succeeds.

  replace: remove an existing `out_dir` just before the rename (else an existing one is an error).
  The result has the permissions of a plain mkdir (the process umask), not mkdtemp's 0700.
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not replace:
    raise CheckpointError(f"{out_dir}: already exists (remove it first)")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what a plain mkdir gives
    if replace and out_dir.exists():
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
