"""orbax checkpoints of a training run: periodic saves, keep-N, exact resume.

A checkpoint holds the whole TrainState (trainable fp32 params, optimiser state, step, base RNG
key) plus JSON metadata (data position, step). Masks of step s are drawn from fold_in(key, s) and
batch s is a pure function of s, so restoring these resumes the run bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dllm_jax.training.trainer import TrainState


class CheckpointStore:
  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ValueError(f"checkpoint save_every={save_every} and keep={keep} must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                             create=True))

  def save(self, state: TrainState, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves at state["step"] if the interval says so (or `force`); returns whether it did."""
    return self.manager.save(
        int(state["step"]),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Restores `step` (default: latest) onto the structure, shapes and shardings of `like`."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
