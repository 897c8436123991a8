"""Optimiser, learning-rate schedule and the choice of trainable parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dllm_jax.model import NLDModel, lora_linears

TRAINABLE = ("full", "lora")


def trainable_filter(trainable: str) -> nnx.filterlib.Filter:
  """'full': every base weight (an adapter, if built, stays frozen); 'lora': only the adapter."""
  if trainable == "full":
    # LoRAParam subclasses Param, so it is excluded explicitly.
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  if trainable == "lora":
    return nnx.LoRAParam
  raise ValueError(f"unknown trainable={trainable!r}; expected one of {TRAINABLE}")


def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int, decay_steps: int,
                 final_lr: float) -> optax.Schedule:
  """Warmup-stable-decay: linear 0 -> peak, constant, then linear peak -> final at the end."""
  if warmup_steps + decay_steps > total_steps:
    raise ValueError(f"warmup_steps {warmup_steps} + decay_steps {decay_steps} exceed "
                     f"total steps {total_steps}")
  stable = total_steps - warmup_steps - decay_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup_steps),
       optax.constant_schedule(peak_lr),
       optax.linear_schedule(peak_lr, final_lr, decay_steps)],
      boundaries=[warmup_steps, warmup_steps + stable])


def _decay_mask(params):
  # No weight decay on RMSNorm scales (as Megatron and most LLM recipes).
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (decoupled weight decay, not on norm scales)."""
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts)


def init_lora(model: NLDModel, key: jax.Array) -> None:
  """PEFT's initialisation of fresh adapters on every target: A ~ U(+-1/sqrt(fan_in)) (kaiming
  a=sqrt(5)), B = 0.

  A zero A (as a checkpoint loader leaves an absent adapter) would give A and B zero gradients.
  """
  linears = lora_linears(model)
  for k, (_, _, linear) in zip(jax.random.split(key, len(linears)), linears):
    a = linear.lora_a
    bound = 1.0 / jnp.sqrt(a.shape[-2])
    a[...] = jax.random.uniform(k, a.shape, jnp.float32, -bound, bound)
    linear.lora_b[...] = jnp.zeros(linear.lora_b.shape, jnp.float32)
