"""Fine-tuning NLD models: the joint AR + diffusion objective (docs/model.md §6), the draft-LoRA
objective, optax AdamW with a warmup-stable-decay schedule, packed jsonl data, orbax checkpoints
with exact resume, and PEFT adapter export. `scripts/train.py` drives it from a config file."""

from dllm_jax.training.checkpointing import CheckpointStore
from dllm_jax.training.data import PackedDataset
from dllm_jax.training.export import export_peft_adapter
from dllm_jax.training.objective import PARADIGMS, Objective, compute_loss, forward_process
from dllm_jax.training.optim import init_lora, make_optimizer, wsd_schedule
from dllm_jax.training.run import train
from dllm_jax.training.trainer import Trainer

__all__ = ["CheckpointStore", "PackedDataset", "export_peft_adapter", "PARADIGMS", "Objective",
           "compute_loss", "forward_process", "init_lora", "make_optimizer", "wsd_schedule",
           "train", "Trainer"]
