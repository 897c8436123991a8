"""The jitted train step (gradient accumulation, global token-count averaging) and its state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dllm_jax import sharding
from dllm_jax.model import NLDModel
from dllm_jax.training.objective import Objective, compute_loss
from dllm_jax.training.optim import trainable_filter

TrainState = dict[str, Any]  # {"params", "opt_state", "step", "key"}: a plain pytree for orbax


def _path_keys(path) -> tuple:
  return tuple(k.key for k in path if hasattr(k, "key"))


class Trainer:
  """Holds the frozen part of the model and a TrainState; `step` runs one optimiser update.

  The trainable parameters live as a pure nested dict of fp32 arrays (the master weights); the
  model's compute dtype (bf16 on GPU) applies inside the forward. Each step consumes a batch
  [micro_batches, batch, seq_len]: the micro-batches' gradients of the loss *sums* are accumulated
  and divided once by the summed normaliser, so accumulation equals one big batch exactly.
  Sharding: on a dllm_jax.sharding mesh ("data", "model"; default: every device on "data") the
  batch is split over "data" and the parameters (and with them the optimiser moments) follow
  `param_shardings`, so "model" > 1 adds tensor parallelism; XLA inserts the gradient all-reduce.
  """

  def __init__(self, model: NLDModel, objective: Objective, tx: optax.GradientTransformation, *,
               trainable: str = "full", seed: int = 0, mesh: Mesh | None = None,
               schedule: optax.Schedule | None = None):
    if trainable == "lora" and objective.paradigm != "draft" and not objective.adapter_forward:
      raise ValueError(f"trainable='lora' with paradigm {objective.paradigm!r} needs "
                       "objective.adapter_forward: otherwise no forward uses the adapter")
    if objective.adapter_forward and model.lora is None:
      raise ValueError("objective.adapter_forward is set but the model has no LoRA adapter")
    self.mesh = mesh or sharding.make_mesh((jax.device_count(), 1))
    sharding.shard_model(model, self.mesh)
    graphdef, params_state, self.frozen = nnx.split(model, trainable_filter(trainable), ...)
    params = nnx.to_pure_dict(params_state)
    leaves_paths = [_path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(params_state)]
    if leaves_paths != [_path_keys(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]:
      raise RuntimeError("nnx.State and its pure dict flatten in different orders")
    if not leaves_paths:
      raise ValueError(f"trainable={trainable!r} selects no parameters in this model")
    self.graphdef, self.objective, self.tx, self.schedule = graphdef, objective, tx, schedule
    self._params_def = jax.tree.structure(params_state)
    replicated = NamedSharding(self.mesh, P())
    self._batch_sharding = sharding.logical_sharding(self.mesh, (None, "batch", None))
    # Moments follow their parameter's sharding, everything else (counts) is replicated; stating
    # it keeps the step's input and output shardings equal, so the step compiles once.
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: replicated)
    self.state: TrainState = {
        "params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "key": jax.device_put(jax.random.PRNGKey(seed), replicated)}
    self._step = jax.jit(self._train_step, donate_argnums=(0,))
    self._eval = jax.jit(self._loss_sums)

  # --- pure functions (traced) -------------------------------------------------------------

  def _model(self, params, frozen) -> NLDModel:
    state = jax.tree.unflatten(self._params_def, jax.tree.leaves(params))
    return nnx.merge(self.graphdef, state, frozen)

  def _loss_sums(self, params, frozen, tokens, loss_mask, key):
    return compute_loss(self._model(params, frozen), self.objective, tokens, loss_mask, key)

  def _train_step(self, state: TrainState, frozen, tokens, loss_mask):
    step_key = jax.random.fold_in(state["key"], state["step"])
    micro_keys = jax.random.split(step_key, tokens.shape[0])

    def micro(carry, xs):
      grads, norm, metrics = carry
      tok, mask, key = xs
      def loss_fn(p):
        loss_sum, n, m = self._loss_sums(p, frozen, tok, mask, key)
        return loss_sum, (n, m)
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss_sum, (n, m)), g = grad_fn(state["params"])
      m = dict(m, loss_sum=loss_sum)
      return (jax.tree.map(jnp.add, grads, g), norm + n,
              {k: metrics[k] + m[k] for k in metrics}), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    metric_shape = jax.eval_shape(lambda: self._loss_sums(state["params"], frozen, tokens[0],
                                                          loss_mask[0], micro_keys[0]))[2]
    metrics0 = {k: jnp.zeros((), jnp.float32) for k in [*metric_shape, "loss_sum"]}
    (grads, norm, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), metrics0),
                                          (tokens, loss_mask, micro_keys))
    norm = jnp.maximum(norm, 1.0)  # a batch with nothing to predict gives zero grads, not NaN
    grads = jax.tree.map(lambda g: g / norm, grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    out = _summarise(sums, norm)
    out["grad_norm"] = optax.global_norm(grads)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "key": state["key"]}
    return new_state, out

  # --- host API ------------------------------------------------------------------------------

  def step(self, tokens: np.ndarray, loss_mask: np.ndarray) -> dict[str, float]:
    """One update from host arrays [micro_batches, batch, seq_len]; returns scalar metrics."""
    if tokens.ndim != 3 or tokens.shape != loss_mask.shape:
      raise ValueError(f"batch must be [micro_batches, batch, seq_len] tokens and loss_mask, got "
                       f"{tokens.shape} and {loss_mask.shape}")
    if tokens.shape[1] % self.mesh.shape["data"]:
      raise ValueError(f"batch size {tokens.shape[1]} is not divisible by the "
                       f"{self.mesh.shape['data']} data-parallel devices")
    lr_step = int(self.state["step"])
    batch = (sharding.put(np.asarray(tokens, np.int32), self._batch_sharding),
             sharding.put(np.asarray(loss_mask, np.int32), self._batch_sharding))
    self.state, metrics = self._step(self.state, self.frozen, *batch)
    out = {k: float(v) for k, v in metrics.items()}
    if self.schedule is not None:
      out["lr"] = float(self.schedule(lr_step))
    return out

  def evaluate(self, tokens: np.ndarray, loss_mask: np.ndarray, key: jax.Array) -> dict[str, float]:
    """Loss metrics of one [batch, seq_len] batch with the masks drawn from `key` (no update)."""
    loss_sum, norm, sums = self._eval(self.state["params"], self.frozen, jnp.asarray(tokens),
                                      jnp.asarray(loss_mask), key)
    return {k: float(v) for k, v in _summarise(dict(sums, loss_sum=loss_sum), norm).items()}

  def model(self) -> NLDModel:
    """The model with the current parameters (shares arrays with the trainer state)."""
    return self._model(self.state["params"], self.frozen)

  @property
  def current_step(self) -> int:
    return int(self.state["step"])


def _summarise(sums: dict[str, jax.Array], norm: jax.Array) -> dict[str, jax.Array]:
  """Per-token means: the optimised loss, and unweighted diffusion / AR cross-entropies."""
  out = {"loss": sums["loss_sum"] / jnp.maximum(norm, 1.0)}
  if "diff_ce_sum" in sums:
    out["diff_ce"] = sums["diff_ce_sum"] / jnp.maximum(sums["diff_count"], 1.0)
    out["masked_tokens"] = sums["diff_count"]
  if "ar_ce_sum" in sums:
    out["ar_ce"] = sums["ar_ce_sum"] / jnp.maximum(sums["ar_count"], 1.0)
  return out
