"""Files and directories that appear complete or not at all: written beside their destination,
then renamed onto it.

A temporary sibling is named `.{name}.partial-{host}-{pid}-{random}`. A writer killed before its
rename (`kill -9`, a power cut) leaves it behind; the next write of the same name on the same host
removes such leftovers whose process is gone. Other hosts' leftovers (a shared filesystem) and
those of a live process are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
import shutil
import socket
import tempfile

from dllm_jax.errors import CheckpointError


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def _partial_prefix(path: Path) -> str:
  return f".{path.name}.partial-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only checks that the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _remove_leftovers(path: Path) -> None:
  """Removes the temporary siblings of `path` whose writer on this host is no longer alive.
  Names without host and pid (or of another host) are kept."""
  prefix, host = _partial_prefix(path), socket.gethostname()
  with contextlib.suppress(FileNotFoundError):
    for entry in path.parent.iterdir():
      if not entry.name.startswith(prefix):
        continue
      owner = entry.name[len(prefix):].rsplit("-", 2)  # host may contain dashes; pid and suffix not
      if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or int(owner[1]) <= 0:
        continue
      if _pid_alive(int(owner[1])):
        continue
      if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          entry.unlink()


def _temp_prefix(path: Path) -> str:
  return f"{_partial_prefix(path)}{socket.gethostname()}-{os.getpid()}-"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` through a temp file beside `path` and a rename: the file appears complete or
  not at all, with the permissions a plain open() would give it (not mkstemp's 0600)."""
  path = Path(path).absolute()
  _remove_leftovers(path)
  fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _not_written(out_dir: Path, tmp: Path | None, e: OSError) -> str:
  """One line for an OSError met while writing `out_dir`: the errno text and the path it names,
  with a path inside the temporary directory shown where it would have been in `out_dir`."""
  reason = e.strerror or str(e)
  where = Path(os.fsdecode(e.filename)) if e.filename is not None else None
  if where is not None and tmp is not None and where.is_relative_to(tmp):
    where = out_dir / where.relative_to(tmp)
  elif where is not None and where.parent == out_dir.parent and \
      where.name.startswith(_partial_prefix(out_dir)):
    where = out_dir.parent  # the temporary directory could not be created there
  return f"{out_dir}: not written ({reason}{f': {where}' if where not in (None, out_dir) else ''})"


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, replace: bool = False):
  """Yields a temp dir beside `out_dir` that is renamed onto it only if the body succeeds.

  replace: remove an existing `out_dir` just before the rename (else an existing one is an error).
  The result has the permissions of a plain mkdir (the process umask), not mkdtemp's 0700.
  An OSError (a full disk, a permission) becomes a one-line CheckpointError naming the path and
  the errno text; so does another writer creating `out_dir` first (its output is kept whole). On
  any error the temp dir is removed. Leftovers of killed writers are removed first (see above).
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.exists() and not replace:
    raise CheckpointError(f"{out_dir}: already exists (remove it first)")
  try:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
  except OSError as e:
    raise CheckpointError(_not_written(out_dir, None, e)) from None
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what a plain mkdir gives
    if replace and out_dir.exists():
      shutil.rmtree(out_dir)
    try:
      os.rename(tmp, out_dir)
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        raise
      raise CheckpointError(f"{out_dir}: created meanwhile by another writer (left as it is; "
                            "this result was discarded)") from None
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):
      raise CheckpointError(_not_written(out_dir, tmp, e)) from None
    raise
