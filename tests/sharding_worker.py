"""Sharded runs in a process of its own, for tests/test_sharding.py.

The device count is fixed when jax is first imported, so the tests start this script with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` in its environment, keeping the pytest
process on one device. Two jobs:

  python tests/sharding_worker.py meshes OUT.npz
      on 8 devices, for each mesh in MESHES: parameter/cache placement, a ragged prefill, a
      greedy decode, and on the meshes of GENERATE `generate` in their modes; everything the tests
      check goes to OUT.npz.
  python tests/sharding_worker.py multihost OUT.npz --port P --process-id I --num-processes N
      one process of a jax.distributed job on localhost: the same prefill and greedy decode on a
      mesh spanning all processes; every process saves its gathered result.

The model, the batch and the greedy loop are defined here once and imported by the tests, which
run them without a mesh on a single device as the reference.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax import KVCache, LoRAConfig, NLDModel, preset
from dllm_jax import sharding as shd
from dllm_jax.decode import generate, settings_for
from dllm_jax.model import lora_linears

MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
# `generate` on the meshes that take both branches of the kv-head rule (replicated on 8 model
# shards, split on 4) and split the batch; prefill and greedy decode run on every mesh. (2, 4) runs
# every mode; on (1, 8) spec (a bidirectional draft block and a causal verify against the cache)
# and quadratic (its own pattern) meet every attention pattern that AR and diffusion use, and each
# mode compiled over 8 devices costs seconds of the suite.
MODES = ("ar", "diffusion", "spec", "quadratic")
GENERATE = {(1, 8): ("spec", "quadratic"), (2, 4): MODES}
MULTIHOST_MESH = (2, 4)
# 8 query / 4 kv heads: kv heads are split on model axes 1, 2, 4 and replicated on 8.
CFG = preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=16)
PROMPT_LENGTHS = (3, 7, 5, 12, 1, 9, 4, 10)
MAX_LEN = 32
DECODE_STEPS = 6
# Adapters on projections split along their input and along their output, kv heads included.
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
GENERATE_KW = dict(max_new_tokens=8, block_length=4)


def build_model() -> NLDModel:
  """The test model, with non-zero draft LoRAs so that spec drafts differ from plain diffusion."""
  model = NLDModel(CFG, lora=LORA, rngs=nnx.Rngs(0))
  for i, (_, _, linear) in enumerate(lora_linears(model)):
    lora_b = linear.lora_b
    lora_b[...] = 0.02 * jax.random.normal(jax.random.key(1 + i), lora_b.shape, lora_b.dtype)
  return model


def make_prompts() -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompts [B, T] (no mask token) and their lengths [B]."""
  lengths = np.array(PROMPT_LENGTHS, np.int32)
  rng = np.random.default_rng(0)
  tokens = rng.integers(12, CFG.vocab_size, (len(lengths), lengths.max())).astype(np.int32)
  tokens[tokens == CFG.mask_token_id] += 1
  tokens[np.arange(lengths.max())[None, :] >= lengths[:, None]] = 0
  return tokens, lengths


def greedy_ar(model: NLDModel, tokens: np.ndarray, lengths: np.ndarray,
              mesh=None) -> tuple[dict, KVCache]:
  """Ragged causal prefill, then DECODE_STEPS greedy tokens through the KV cache.

  With a mesh, inputs, cache and logits carry explicit shardings and the cache is donated, as a
  sharded decoder would run it. Returns (host results, the final cache as device arrays).
  """
  graphdef, state = nnx.split(model)
  rules = None if mesh is None else shd.mesh_rules(CFG, mesh)

  def place(x, names):
    return jnp.asarray(x) if mesh is None else shd.put(x, shd.logical_sharding(mesh, names, rules))

  cache = KVCache.init(CFG, tokens.shape[0], MAX_LEN)
  cache = KVCache(tuple(place(k, shd.CACHE_AXES) for k in cache.k),
                  tuple(place(v, shd.CACHE_AXES) for v in cache.v), place(cache.lengths, ("batch",)))
  if mesh is None:
    jit = functools.partial(jax.jit, donate_argnums=2)
  else:
    logits_sh = shd.logical_sharding(mesh, ("batch", None, "vocab"), rules)
    jit = functools.partial(jax.jit, donate_argnums=2,
                            out_shardings=(logits_sh, shd.cache_shardings(mesh, CFG)))

  @jit
  def prefill(state, tokens, cache, n_new):
    return nnx.merge(graphdef, state)(tokens, cache=cache, n_new=n_new)

  @jit
  def step(state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, cache=cache)

  lengths_dev = place(lengths, ("batch",))
  logits, cache = prefill(state, place(tokens, ("batch", None)), cache, lengths_dev)
  result = dict(prefill_logits=shd.gather(logits),
                prefill_k=np.stack([shd.gather(k) for k in cache.k]))
  last = jnp.take_along_axis(logits, (lengths_dev - 1)[:, None, None], axis=1)
  out = []
  for i in range(DECODE_STEPS):
    out.append(jnp.argmax(last[:, -1], axis=-1).astype(jnp.int32)[:, None])
    if i + 1 < DECODE_STEPS:
      last, cache = step(state, out[-1], cache)
  result.update(tokens=shd.gather(jnp.concatenate(out, axis=1)),
                cache_lengths=shd.gather(cache.lengths))
  return result, cache


def generate_all(model: NLDModel, mesh=None,
                 modes: tuple[str, ...] = MODES) -> dict[str, np.ndarray]:
  """Greedy ids of each of `modes` for the mixed-length prompts, -1 past each row's end."""
  tokens, lengths = make_prompts()
  prompts = [row[:n].tolist() for row, n in zip(tokens, lengths)]
  results = {}
  for mode in modes:
    rows = generate(model, prompts, settings_for(mode, skip_other_modes=True, **GENERATE_KW),
                    mesh=mesh).tokens
    # A speculative round may run past max_new_tokens by up to one block.
    width = GENERATE_KW["max_new_tokens"] + GENERATE_KW["block_length"]
    padded = np.full((len(rows), width), -1, np.int32)
    for b, row in enumerate(rows):
      padded[b, :len(row)] = row
    results[f"generate:{mode}"] = padded
  return results


def placement(model: NLDModel, cache: KVCache) -> dict[str, np.ndarray]:
  """Bytes of every addressable shard of each parameter and of the cache keys, keyed by path."""
  arrays = {"/".join(str(k.key) for k in path): var[...]
            for path, var in jax.tree_util.tree_leaves_with_path(
                nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))}
  arrays.update({f"cache/k/{i}": k for i, k in enumerate(cache.k)})
  return {f"bytes:{path}": np.array([s.data.nbytes for s in x.addressable_shards])
          for path, x in arrays.items()}


def run_mesh(shape: tuple[int, int], modes: tuple[str, ...]) -> dict[str, np.ndarray]:
  mesh = shd.make_mesh(shape)
  model = shd.shard_model(build_model(), mesh)
  result, cache = greedy_ar(model, *make_prompts(), mesh=mesh)
  result.update(placement(model, cache))
  if modes:
    result.update(generate_all(model, mesh, modes))
  return result


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("job", choices=("meshes", "multihost"))
  parser.add_argument("out")
  parser.add_argument("--port", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--num-processes", type=int)
  args = parser.parse_args()
  if args.job == "meshes":
    results = {}
    for shape in MESHES:
      for key, value in run_mesh(shape, GENERATE.get(shape, ())).items():
        results[f"{shape[0]}x{shape[1]}/{key}"] = value
  else:
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
    results = run_mesh(MULTIHOST_MESH, ())
    results["mesh_processes"] = np.vectorize(lambda d: d.process_index)(
        shd.make_mesh(MULTIHOST_MESH).devices)
    results["process_index"] = np.array(jax.process_index())
    results["global_devices"] = np.array(jax.device_count())
  np.savez(args.out, **results)


if __name__ == "__main__":
  main()
