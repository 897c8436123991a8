"""Training the draft LoRA on the model's own greedy text raises self-speculation acceptance."""

import jax
import numpy as np
import pytest
from flax import nnx

from dllm_jax import LoRAConfig, NLDModel, preset
from dllm_jax.decode import AR, Spec, generate
from dllm_jax.training.objective import Objective
from dllm_jax.training.optim import init_lora, make_optimizer, wsd_schedule
from dllm_jax.training.trainer import Trainer

BLOCK = 8
CFG = preset("tiny").replace(block_size=BLOCK)
PROMPT_LEN, NEW = 8, 56
STEPS = 50


def mean_tokens_per_forward(model, prompts):
  out = generate(model, prompts.tolist(),
                 Spec(max_new_tokens=40, block_length=BLOCK, eos_token_ids=()))
  return float(np.mean(out.tokens_per_forward))


@pytest.mark.slow
def test_draft_lora_training_raises_acceptance():
  # A random base model whose own drafts are poor (how poor depends on the draw).
  model = NLDModel(CFG, lora=LoRAConfig(8, 16), rngs=nnx.Rngs(3))
  init_lora(model, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  # Self-generated training text: the base model's greedy continuations of random prompts.
  train_prompts = rng.integers(20, 250, size=(32, PROMPT_LEN))
  gen = generate(model, train_prompts.tolist(), AR(max_new_tokens=NEW, eos_token_ids=()))
  seqs = np.concatenate([train_prompts, np.array(gen.tokens)], 1).astype(np.int32)
  loss_mask = np.ones_like(seqs)
  loss_mask[:, :PROMPT_LEN] = 0

  test_prompts = rng.integers(20, 250, size=(6, PROMPT_LEN))
  before = mean_tokens_per_forward(model, test_prompts)

  schedule = wsd_schedule(1e-2, STEPS, 5, 10, 1e-3)
  trainer = Trainer(model, Objective.from_model_config(CFG, paradigm="draft"),
                    make_optimizer(schedule, weight_decay=0.0), trainable="lora")
  base_before = jax.tree.map(np.asarray, trainer.frozen)
  for step in range(STEPS):
    idx = rng.permutation(len(seqs))[:8]
    trainer.step(seqs[idx][None], loss_mask[idx][None])
  trained = trainer.model()
  after = mean_tokens_per_forward(trained, test_prompts)
  # The base stays frozen, so verification (and hence the output text) is unchanged ...
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(trainer.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # ... while the drafts now predict what the verifier accepts.
  print(f"spec tokens per forward: untrained drafter {before:.3f}, trained {after:.3f}")
  assert after > before + 0.3, (before, after)
