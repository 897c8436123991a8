"""Training steps on a data-parallel and a data x tensor-parallel mesh of simulated CPU devices give
the parameters of the same steps on one device.

The device count is fixed when jax is imported, so the sharded runs happen in a subprocess started
with `--xla_force_host_platform_device_count=4`; it runs the one-device reference too (on a 1x1
mesh over its first device) and prints the largest parameter difference per mesh.
"""

import subprocess
import sys

import pytest

from conftest import cpu_env

WORKER = r"""
import jax, numpy as np, optax
from flax import nnx
from dllm_jax import NLDModel, preset, sharding
from dllm_jax.training.objective import Objective
from dllm_jax.training.trainer import Trainer

cfg = preset("tiny").replace(block_size=8)
tokens = np.random.default_rng(0).integers(20, 90, size=(2, 4, 32)).astype(np.int32)
loss_mask = np.ones_like(tokens)
loss_mask[:, :, :5] = 0

def run(shape, devices):
  trainer = Trainer(NLDModel(cfg, rngs=nnx.Rngs(0)),
                    Objective.from_model_config(cfg, paradigm="block_diff"), optax.sgd(0.5),
                    mesh=sharding.make_mesh(shape, devices))
  for _ in range(2):
    trainer.step(tokens, loss_mask)
  up = trainer.state["params"]["encoder"]["layers"][0]["mlp"]["up_proj"]["kernel"]
  return [np.asarray(x) for x in jax.tree.leaves(trainer.state["params"])], up.sharding.spec

ref, _ = run((1, 1), jax.devices()[:1])
for shape in ((4, 1), (2, 2)):
  got, spec = run(shape, jax.devices())
  print(shape, max(float(np.abs(a - b).max()) for a, b in zip(ref, got)), spec)
"""


@pytest.mark.slow
def test_sharded_training_steps_match_one_device():
  out = subprocess.run([sys.executable, "-c", WORKER], env=cpu_env(devices=4), capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2, out.stdout
  for line, shape in zip(lines, ("(4, 1)", "(2, 2)")):
    assert line.startswith(shape), line
    assert float(line.split()[2]) < 1e-5, line
  assert "'model'" in lines[1]  # the 2x2 run really split the MLP over the model axis
