"""Sharding rules, mesh errors, and sharded runs on 8 simulated CPU devices and on 2 processes.

The pytest process keeps its single device: the multi-device runs happen in tests/sharding_worker.py
started as subprocesses (the device count is fixed when jax is imported), and their results are
compared here with the same model run without a mesh on this process's one device.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from dllm_jax import LoRAConfig, abstract_model, preset
from dllm_jax import sharding as shd

sys.path.insert(0, os.path.dirname(__file__))
import sharding_worker as worker  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import cpu_env

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
TIMEOUT_S = 300


def abstract_mesh(data: int, model: int) -> AbstractMesh:
  return AbstractMesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# --- meshes and rules (this process) --------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("2,4", (2, 4)), ("8x1", (8, 1)), ((1, 8), (1, 8))])
def test_parse_mesh_shape(text, expected):
  assert shd.parse_mesh_shape(text) == expected


@pytest.mark.parametrize("bad", ["2", "2,4,1", "a,b", "0,8", (2,)])
def test_parse_mesh_shape_rejects(bad):
  with pytest.raises(ValueError, match="mesh shape"):
    shd.parse_mesh_shape(bad)


def test_make_mesh_needs_matching_device_count():
  with pytest.raises(ValueError, match=r"needs 8 devices, but 1 are available"):
    shd.make_mesh("2,4")
  mesh = shd.make_mesh((1, 1))
  assert mesh.axis_names == ("data", "model")
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize("overrides,mesh,batch,culprit", [
    (dict(num_heads=6, num_kv_heads=2), (1, 4), None, "num_heads=6"),
    (dict(num_heads=12, num_kv_heads=3), (1, 2), None, "num_kv_heads=3"),
    (dict(num_heads=12, num_kv_heads=6), (1, 4), None, "num_kv_heads=6"),
    (dict(num_heads=8, intermediate_size=100), (1, 8), None, "intermediate_size=100"),
    (dict(vocab_size=250), (1, 4), None, "vocab_size=250"),
    (dict(), (4, 1), 6, "batch=6"),
])
def test_validate_mesh_errors(overrides, mesh, batch, culprit):
  cfg = preset("tiny").replace(**overrides)
  with pytest.raises(ValueError, match=culprit):
    shd.validate_mesh(cfg, abstract_mesh(*mesh), batch=batch)


def test_validate_mesh_rejects_foreign_axis_names():
  mesh = AbstractMesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
  with pytest.raises(ValueError, match="mesh axes"):
    shd.validate_mesh(preset("tiny"), mesh)


@pytest.mark.parametrize("name,model,replicated", [
    ("nld-8b", 8, False), ("nld-8b", 4, False), ("nld-8b", 16, True), ("tiny", 2, False),
    ("tiny", 4, True), ("tiny", 1, False)])
def test_kv_head_rule(name, model, replicated):
  cfg = preset(name)
  mesh = abstract_mesh(1, model)
  assert shd.kv_heads_replicated(cfg, mesh) == replicated
  assert shd.mesh_rules(cfg, mesh)["kv_heads"] == (None if replicated else "model")


def test_logical_spec_errors():
  assert shd.logical_spec(("batch", None, "vocab")) == P("data", None, "model")
  with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
    shd.logical_spec(("batch", "heads"))
  with pytest.raises(ValueError, match="onto one mesh axis"):
    shd.logical_spec(("q_heads", "vocab"))


# Written out by hand from the Megatron layout: which dimension of each parameter is split over
# the model axis (None: replicated). "*" stands for every layer index.
SPLIT_DIM = {
    "encoder/embed_tokens/embedding": 0,
    "diffusion_head/kernel": 1,
    "encoder/norm/weight": None,
    "encoder/layers/*/input_layernorm/weight": None,
    "encoder/layers/*/post_attention_layernorm/weight": None,
    "encoder/layers/*/self_attn/q_proj/kernel": 1,
    "encoder/layers/*/self_attn/k_proj/kernel": 1,
    "encoder/layers/*/self_attn/v_proj/kernel": 1,
    "encoder/layers/*/self_attn/o_proj/kernel": 0,
    "encoder/layers/*/mlp/gate_proj/kernel": 1,
    "encoder/layers/*/mlp/up_proj/kernel": 1,
    "encoder/layers/*/mlp/down_proj/kernel": 0,
    # LoRA factors a [in, r], b [r, out]: split where their kernel is, the rank dimension
    # replicated.
    "encoder/layers/*/self_attn/q_proj/lora_a": None,
    "encoder/layers/*/self_attn/q_proj/lora_b": 1,
    "encoder/layers/*/self_attn/k_proj/lora_a": None,
    "encoder/layers/*/self_attn/k_proj/lora_b": 1,
    "encoder/layers/*/self_attn/v_proj/lora_a": None,
    "encoder/layers/*/self_attn/v_proj/lora_b": 1,
    "encoder/layers/*/self_attn/o_proj/lora_a": 0,
    "encoder/layers/*/self_attn/o_proj/lora_b": None,
    "encoder/layers/*/mlp/gate_proj/lora_a": None,
    "encoder/layers/*/mlp/gate_proj/lora_b": 1,
    "encoder/layers/*/mlp/up_proj/lora_a": None,
    "encoder/layers/*/mlp/up_proj/lora_b": 1,
    "encoder/layers/*/mlp/down_proj/lora_a": 0,
    "encoder/layers/*/mlp/down_proj/lora_b": None,
}
KV_KERNELS = ("encoder/layers/*/self_attn/k_proj/kernel",
              "encoder/layers/*/self_attn/v_proj/kernel",
              "encoder/layers/*/self_attn/k_proj/lora_b",
              "encoder/layers/*/self_attn/v_proj/lora_b")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def generic(path: str) -> str:
  """A parameter path with its layer index replaced by "*"."""
  return re.sub(r"^encoder/layers/\d+/", "encoder/layers/*/", path)


def split_dim(path: str, kv_replicated: bool) -> int | None:
  path = generic(path)
  return None if kv_replicated and path in KV_KERNELS else SPLIT_DIM[path]


def flat(tree) -> dict:
  return {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))}


@pytest.mark.parametrize("model_axis", [2, 4])
def test_param_shardings_follow_megatron_layout(model_axis):
  cfg = preset("tiny")  # 2 kv heads: split on 2 devices, replicated on 4
  mesh = abstract_mesh(2, model_axis)
  state = nnx.state(abstract_model(cfg, lora=LoRAConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)))
  shardings = flat(shd.param_shardings(state, mesh, shd.mesh_rules(cfg, mesh)))
  shapes = flat(state)
  assert {generic(p) for p in shardings} == set(SPLIT_DIM)
  for path, var in shardings.items():
    dim = split_dim(path, kv_replicated=model_axis == 4)
    spec = [None] * len(shapes[path].shape)
    if dim is not None:
      spec[dim] = "model"
    assert var.value.spec == P(*spec), path


def test_param_shardings_reject_mismatched_axes():
  state = nnx.State({"w": nnx.Param(np.zeros((2, 3, 4), np.float32), axes=("embed",))})
  with pytest.raises(ValueError, match=r"\['w'\]: axes \('embed',\) do not match its shape"):
    shd.param_shardings(state, abstract_mesh(1, 2))


def test_cache_shardings():
  cache = shd.cache_shardings(abstract_mesh(2, 2), preset("tiny"))
  assert len(cache.k) == len(cache.v) == preset("tiny").num_layers  # one buffer pair per layer
  assert {x.spec for x in cache.k + cache.v} == {P("data", None, "model", None)}
  assert cache.lengths.spec == P("data")
  replicated = shd.cache_shardings(abstract_mesh(2, 4), preset("tiny"))
  assert {x.spec for x in replicated.k} == {P("data", None, None, None)}


# --- sharded runs (subprocesses) ------------------------------------------------------------------

def run_worker(args: list[str], devices: int, log: Path) -> subprocess.Popen:
  """Starts the worker with `devices` simulated CPU devices; its output goes to `log`."""
  env = cpu_env(devices=devices)
  with open(log, "w") as f:  # a file, not a pipe: nobody reads it while the worker runs
    proc = subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=f,
                            stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def finish(*procs: subprocess.Popen) -> None:
  """Waits for every process; on a failure or timeout kills the rest (a lone peer would hang)."""
  failures = []
  for proc in procs:
    try:
      proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    if proc.returncode != 0:
      output = proc.log.read_text()[-4000:]
      failures.append(f"{' '.join(map(str, proc.args))} exited {proc.returncode}:\n{output}")
      for other in procs:
        if other.poll() is None:
          other.kill()
  assert not failures, "\n".join(failures)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  """Starts the 8-device job and the two-process job at once; yields their processes and outputs."""
  out = tmp_path_factory.mktemp("sharding")
  port = free_port()
  jobs = {"meshes": ([run_worker(["meshes", str(out / "meshes.npz")], 8, out / "meshes.log")],
                     [out / "meshes.npz"]),
          "multihost": ([run_worker(["multihost", str(out / f"p{i}.npz"), "--port", str(port),
                                     "--process-id", str(i), "--num-processes", "2"],
                                    4, out / f"p{i}.log") for i in range(2)],
                        [out / f"p{i}.npz" for i in range(2)])}
  yield jobs
  for procs, _ in jobs.values():
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def results(job) -> list[dict]:
  procs, paths = job
  finish(*procs)
  loaded = []
  for path in paths:
    with np.load(path) as data:
      loaded.append(dict(data))
  return loaded


@pytest.fixture(scope="module")
def reference(workers):
  """The run without a mesh, on this process's single device (while the workers run)."""
  del workers
  assert jax.device_count() == 1
  model = worker.build_model()
  result, _ = worker.greedy_ar(model, *worker.make_prompts())
  result.update(worker.generate_all(model))
  return result


@pytest.fixture(scope="module")
def mesh_results(workers, reference):
  del reference  # computed first, concurrently with the workers
  return results(workers["meshes"])[0]


def check_matches_reference(got: dict, reference: dict) -> None:
  np.testing.assert_allclose(got["prefill_logits"], reference["prefill_logits"], atol=2e-5)
  np.testing.assert_allclose(got["prefill_k"], reference["prefill_k"], atol=2e-5)
  np.testing.assert_array_equal(got["tokens"], reference["tokens"])
  np.testing.assert_array_equal(got["cache_lengths"], reference["cache_lengths"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", worker.MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_decode_matches_single_device(shape, mesh_results, reference):
  prefix = f"{shape[0]}x{shape[1]}/"
  got = {k[len(prefix):]: v for k, v in mesh_results.items() if k.startswith(prefix)}
  check_matches_reference(got, reference)
  for mode in worker.GENERATE.get(shape, ()):
    np.testing.assert_array_equal(got[f"generate:{mode}"], reference[f"generate:{mode}"],
                                  err_msg=f"generate(mode={mode!r})")


@pytest.mark.slow
@pytest.mark.parametrize("shape", worker.MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_params_and_cache_are_distributed(shape, mesh_results):
  data, model = shape
  cfg = worker.CFG
  kv_replicated = cfg.num_kv_heads % model != 0
  prefix = f"{shape[0]}x{shape[1]}/bytes:"
  shard_bytes = {k[len(prefix):]: v for k, v in mesh_results.items() if k.startswith(prefix)}
  shapes = flat(nnx.state(abstract_model(cfg, lora=worker.LORA)))
  per_device = np.zeros(data * model)
  expected_per_device = 0.0
  for path, shape_dtype in shapes.items():
    total = math.prod(shape_dtype.shape) * 4
    parts = 1 if split_dim(path, kv_replicated) is None else model
    np.testing.assert_array_equal(shard_bytes[path], total // parts, err_msg=path)
    per_device += shard_bytes[path]
    expected_per_device += total / parts
  np.testing.assert_array_equal(per_device, expected_per_device)
  batch = len(worker.PROMPT_LENGTHS)
  layer_cache = batch * worker.MAX_LEN * cfg.num_kv_heads * cfg.head_dim * 4  # one layer's k
  cache_parts = data * (1 if kv_replicated else model)
  for i in range(cfg.num_layers):
    np.testing.assert_array_equal(shard_bytes[f"cache/k/{i}"], layer_cache // cache_parts)


@pytest.mark.slow
def test_two_process_decode_matches_single_process(workers, reference):
  for i, got in enumerate(results(workers["multihost"])):
    assert int(got["process_index"]) == i and int(got["global_devices"]) == 8
    # Each tensor-parallel group (a row of the mesh) lies within one process.
    np.testing.assert_array_equal(got["mesh_processes"], [[0] * 4, [1] * 4])
    check_matches_reference(got, reference)
    # Each process holds 4 of the 8 shards; (2, 4) splits the q kernel over 4 model shards.
    q = got["bytes:encoder/layers/0/self_attn/q_proj/kernel"]
    q_total = cfg_bytes("encoder/layers/0/self_attn/q_proj/kernel")
    np.testing.assert_array_equal(q, np.full(4, q_total // worker.MULTIHOST_MESH[1]))


def cfg_bytes(path: str) -> int:
  return math.prod(flat(nnx.state(abstract_model(worker.CFG, lora=worker.LORA)))[path].shape) * 4
