"""Tensor x data parallel sharding: logical axis names -> mesh axes ("data", "model").

One table, `RULES`, maps every logical axis name used by the parameters (their `axes` metadata),
the KV cache and the activations to a mesh axis or to None (replicated):

  batch -> data;  q_heads, kv_heads, ffw, vocab -> model;  everything else replicated.

Tensor parallelism is Megatron-style: q/k/v and gate/up kernels are split along their output
(heads / MLP width), o_proj and down_proj along their input, so each layer needs one all-reduce
after attention and one after the MLP; the embedding and the output head are split over the
vocabulary. XLA's SPMD partitioner inserts the collectives from these parameter shardings; the
model code itself carries no sharding annotations.

Divisibility rules (checked by `validate_mesh`, each violation is a one-line error):
  * num_heads, intermediate_size and vocab_size must be divisible by the model axis. The q/k/v
    kernels are stored flat [d, heads*head_dim], so splitting the flat dimension is head-aligned
    only when the head count divides.
  * kv heads: if num_kv_heads % model == 0 they are split like the query heads (and the
    num_heads/num_kv_heads query heads of a group land on the device holding their kv head). If
    instead model % num_kv_heads == 0 (more model shards than kv heads, e.g. 8 kv heads on 16
    devices), k_proj/v_proj and the KV cache are *replicated* over the model axis: every device
    computes all kv heads, which costs the full KV cache on every model shard. Any other
    combination is an error.
  * the batch must be divisible by the data axis.

Meshes use `AxisType.Auto` so that sharding propagates through unannotated model code (JAX's
default `Explicit` axes would require every op to state its output sharding).

Multi-host: `make_mesh` lays the devices of `jax.devices()`, grouped by process, out row-major,
so the model axis varies fastest and a tensor-parallel group stays inside one host whenever the
model axis divides the number of local devices. `put` and `gather` move host values into and out
of arrays that span processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from dllm_jax.config import ModelConfig
from dllm_jax.kv_cache import KVCache

AXES = ("data", "model")

RULES: Mapping[str, str | None] = {
    "batch": "data",
    "sequence": None,
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "ffw": "model",
    "vocab": "model",
    "cache_len": None,
    "lora_rank": None,
}

CACHE_AXES = ("batch", "cache_len", "kv_heads", "head_dim")  # one layer's k or v


# --- meshes ---------------------------------------------------------------------------------------

def parse_mesh_shape(shape: tuple[int, int] | Sequence[int] | str) -> tuple[int, int]:
  """(data, model) from a tuple or a "data,model" string such as "2,4"."""
  if isinstance(shape, str):
    try:
      parsed = tuple(int(s) for s in shape.replace("x", ",").split(","))
    except ValueError:
      raise ValueError(f"mesh shape {shape!r}: expected 'data,model', e.g. '2,4'") from None
  else:
    parsed = tuple(int(s) for s in shape)
  if len(parsed) != 2 or min(parsed) < 1:
    raise ValueError(f"mesh shape {shape!r}: expected two positive sizes (data, model)")
  return parsed  # type: ignore[return-value]


def make_mesh(shape: tuple[int, int] | Sequence[int] | str, devices=None) -> Mesh:
  """A ("data", "model") mesh over `devices` (default: all devices of all processes)."""
  data, model = parse_mesh_shape(shape)
  if devices is None:  # grouped by process so that model-axis rows stay within one host
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if data * model != len(devices):
    raise ValueError(f"mesh shape (data={data}, model={model}) needs {data * model} devices, "
                     f"but {len(devices)} are available")
  grid = np.array(devices, dtype=object).reshape(data, model)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def kv_heads_replicated(cfg: ModelConfig, mesh: Mesh | AbstractMesh) -> bool:
  """True when the kv heads are replicated over the model axis (model % num_kv_heads == 0)."""
  model = mesh.shape["model"]
  return cfg.num_kv_heads % model != 0 and model % cfg.num_kv_heads == 0


def validate_mesh(cfg: ModelConfig, mesh: Mesh | AbstractMesh, batch: int | None = None) -> None:
  """Raises a one-line ValueError naming the dimension that the mesh cannot split evenly."""
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected {AXES} (use make_mesh)")
  data, model = mesh.shape["data"], mesh.shape["model"]
  for name, size in (("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size),
                     ("vocab_size", cfg.vocab_size)):
    if size % model:
      raise ValueError(f"{name}={size} is not divisible by the model axis ({model})")
  g = cfg.num_kv_heads
  if g % model and model % g:
    raise ValueError(f"num_kv_heads={g} and the model axis ({model}) do not divide one another: "
                     "kv heads are split when num_kv_heads % model == 0 and replicated when "
                     "model % num_kv_heads == 0")
  if batch is not None and batch % data:
    raise ValueError(f"batch={batch} is not divisible by the data axis ({data})")


def mesh_rules(cfg: ModelConfig, mesh: Mesh | AbstractMesh) -> dict[str, str | None]:
  """RULES specialised to `cfg` on `mesh`: validated, kv heads replicated where they must be."""
  validate_mesh(cfg, mesh)
  rules = dict(RULES)
  if kv_heads_replicated(cfg, mesh):
    rules["kv_heads"] = None
  return rules


# --- logical names -> shardings -------------------------------------------------------------------

def logical_spec(names: Sequence[str | None],
                 rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry these logical names (None = replicated)."""
  axes = []
  for name in names:
    if name is not None and name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(rules)}")
    axes.append(None if name is None else rules[name])
  used = [a for a in axes if a is not None]
  if len(used) != len(set(used)):
    raise ValueError(f"logical axes {tuple(names)} map two dimensions onto one mesh axis")
  return PartitionSpec(*axes)


def logical_sharding(mesh: Mesh | AbstractMesh, names: Sequence[str | None],
                     rules: Mapping[str, str | None] = RULES) -> NamedSharding:
  """NamedSharding on `mesh` for an array whose dimensions carry these logical names."""
  return NamedSharding(mesh, logical_spec(names, rules))


def _param_names(path, var: nnx.Variable) -> tuple[str | None, ...]:
  """Logical names of a parameter's dimensions."""
  shape = var.shape
  names = tuple(var.get_metadata().get("axes") or ())
  if not names:
    return (None,) * len(shape)
  if len(names) != len(shape):
    raise ValueError(f"parameter {jax.tree_util.keystr(tuple(path))}: axes {names} do not "
                     f"match its shape {tuple(shape)}")
  return names


def param_shardings(state: nnx.State, mesh: Mesh | AbstractMesh,
                    rules: Mapping[str, str | None] = RULES) -> nnx.State:
  """The state with every Variable's value replaced by its NamedSharding (same tree structure).

  Works on concrete and on abstract (`nnx.eval_shape`) state. Use `mesh_rules(cfg, mesh)` for
  `rules` to get the kv-head replication rule and the divisibility checks.
  """
  def one(path, var):
    if not isinstance(var, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    return var.replace(logical_sharding(mesh, _param_names(path, var), rules))

  return jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_shardings(mesh: Mesh | AbstractMesh, cfg: ModelConfig) -> KVCache:
  """KVCache of shardings: each layer's k/v [batch, cache_len, kv_heads, head_dim], lengths
  [batch]. Hashable, so it can be a jit static argument."""
  rules = mesh_rules(cfg, mesh)
  kv = (logical_sharding(mesh, CACHE_AXES, rules),) * cfg.num_layers
  return KVCache(kv, kv, logical_sharding(mesh, ("batch",), rules))


# --- placing values -------------------------------------------------------------------------------

def put(x, sharding: NamedSharding) -> jax.Array:
  """Places a host value (identical on every process) on `sharding`, across processes if needed."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array as numpy, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Moves the model's parameters onto their mesh shardings in place; returns the model."""
  rules = mesh_rules(model.cfg, mesh)
  state = nnx.state(model)
  shardings = param_shardings(state, mesh, rules)
  placed = jax.tree.map(put, state, shardings)
  nnx.update(model, placed)
  return model
