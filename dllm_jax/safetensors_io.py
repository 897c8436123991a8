"""safetensors files without torch: header parsing and checks, streaming reads and writes.

Headers are parsed and checked against the file size before any tensor data is read; tensors are
then read one at a time with plain file reads (no mmap, so the page cache never counts against the
process). Writing streams too: the header first, then each tensor as it is produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from dllm_jax.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Byte sizes of every safetensors dtype (for header checks); the float dtypes tensors are read as.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
ST_FLOAT = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
            "F32": np.dtype(np.float32)}
NP_TO_ST = {v: k for k, v in ST_FLOAT.items()}
# Float dtype -> (unsigned int of its width, exponent bits): all exponent bits set is NaN or Inf.
_EXPONENT_BITS = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
                  np.dtype(np.float16): (np.uint16, 0x7C00),
                  np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}
ST_TO_HF_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor as described by a safetensors header; `offset` is absolute in the file."""
  key: str
  file: Path
  dtype: str
  shape: tuple[int, ...]
  offset: int
  nbytes: int


def has_nonfinite(x: np.ndarray, chunk: int = 1 << 20) -> bool:
  """Whether `x` holds a NaN or an Inf, tested on the exponent bits `chunk` elements at a time.

  The temporaries stay at one chunk, and the bit test runs at memory speed on bfloat16, where
  np.isfinite goes element by element through ml_dtypes (4x slower, docs/checkpoints.md).
  """
  bits = _EXPONENT_BITS.get(x.dtype)
  if bits is None or not x.flags.c_contiguous:
    return not np.isfinite(x).all()
  uint, exponent = bits[0], bits[0](bits[1])
  flat = x.reshape(-1).view(uint)
  return any(np.any((flat[i:i + chunk] & exponent) == exponent) for i in range(0, flat.size, chunk))


def _read_error(path: Path, e: OSError) -> CheckpointError:
  return CheckpointError(f"{path}: cannot read ({e.strerror or e})")


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
  """Parses a safetensors header and checks every tensor against the file size (reads no data)."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: file not found")
  try:
    size = path.stat().st_size
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      n = int.from_bytes(head, "little")
      if 8 + n > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header needs {8 + n} bytes, "
                              f"file has {size})")
      raw = f.read(n)
  except OSError as e:
    raise _read_error(path, e) from None
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  infos: dict[str, TensorInfo] = {}
  for key, meta in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
      start, end = (int(o) for o in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from None
    if dtype not in _ST_ITEMSIZE:
      raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
    need = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if end - start != need:
      raise CheckpointError(f"{path}: tensor {key!r} spans {end - start} bytes, but shape "
                            f"{shape} {dtype} needs {need}")
    if 8 + n + end > size:
      raise CheckpointError(f"{path}: truncated safetensors file (tensor {key!r} ends at byte "
                            f"{8 + n + end}, file has {size})")
    infos[key] = TensorInfo(key, path, dtype, shape, 8 + n + start, end - start)
  return infos


def index_checkpoint(model_dir: Path) -> dict[str, TensorInfo]:
  """Headers of `model.safetensors`, or of every shard named by `model.safetensors.index.json`."""
  model_dir = Path(model_dir)
  single, index = model_dir / WEIGHTS_NAME, model_dir / INDEX_NAME
  if single.exists():  # as transformers: the single file wins when both exist
    return read_safetensors_header(single)
  if not index.exists():
    raise CheckpointError(f"{model_dir}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
  try:
    raw = index.read_bytes()
  except OSError as e:
    raise _read_error(index, e) from None
  try:
    weight_map = json.loads(raw)["weight_map"]
    files = sorted(set(weight_map.values()))
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
  infos: dict[str, TensorInfo] = {}
  for name in files:
    if not (model_dir / name).is_file():
      raise CheckpointError(f"{index}: shard {name!r} not found in {model_dir}")
    for key, info in read_safetensors_header(model_dir / name).items():
      if key in infos:
        raise CheckpointError(f"tensor {key!r} appears in both {infos[key].file.name} and {name}")
      infos[key] = info
  for key, name in weight_map.items():
    if key not in infos or infos[key].file.name != name:
      raise CheckpointError(f"{index}: lists tensor {key!r} in {name}, which does not contain it")
  return infos


class TensorReader:
  """Reads tensors one at a time with plain reads, keeping one open handle per file."""

  def __init__(self):
    self._files: dict[Path, Any] = {}

  def __call__(self, info: TensorInfo) -> np.ndarray:
    dtype = ST_FLOAT.get(info.dtype)
    if dtype is None:
      raise CheckpointError(f"tensor {info.key!r} in {info.file.name} has dtype {info.dtype}, "
                            f"expected one of {', '.join(ST_FLOAT)}")
    out = np.empty(info.shape, dtype)
    try:
      f = self._files.get(info.file)
      if f is None:
        f = self._files[info.file] = open(info.file, "rb")  # pylint: disable=consider-using-with
      f.seek(info.offset)
      got = f.readinto(out.reshape(-1).view(np.uint8))
    except OSError as e:
      raise _read_error(info.file, e) from None
    if got != info.nbytes:
      raise CheckpointError(f"{info.file}: truncated while reading tensor {info.key!r}")
    return out

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files.clear()

  def __enter__(self) -> TensorReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_safetensors(path: Path, tensors: Iterable[tuple[str, np.dtype, tuple[int, ...],
                                                          Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Streams tensors into a safetensors file: header first, then each tensor as it is produced.

  `tensors` yields (key, numpy dtype, shape, produce) and `produce()` is called once per tensor, so
  only one tensor is materialised at a time.
  """
  tensors = list(tensors)
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for key, dtype, shape, _ in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[key] = {"dtype": NP_TO_ST[np.dtype(dtype)], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer pads
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for key, dtype, shape, produce in tensors:
      x = np.ascontiguousarray(produce(), dtype=dtype)
      if x.shape != tuple(shape):
        raise ValueError(f"tensor {key!r} produced shape {x.shape}, header says {tuple(shape)}")
      f.write(x.reshape(-1).view(np.uint8).data)
