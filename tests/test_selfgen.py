"""Self-generated training data: each prompt completed with the model's greedy answer, checked
against a plain argmax loop over full causal forwards (no cache, no decoding engine)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.checkpoint import load_pretrained
from dllm_jax.tokenizer import TextTokenizer
from dllm_jax.training.selfgen import write_self_generated
from tiny_nld import write_checkpoint

MAX_NEW = 6


@functools.partial(jax.jit, static_argnums=0)
def causal_logits(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens, pattern="causal")[0]


def greedy(model, ids, eos_ids, width=64):
  """Right-padded to one width so every forward has the same shape (one compiled program): under
  the causal pattern the padding after position i cannot change the logits at i."""
  graphdef, state = nnx.split(model)
  ids = list(ids)
  out = []
  for _ in range(MAX_NEW):
    assert len(ids) <= width, "widen the reference's padding"
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(ids)] = ids
    logits = causal_logits(graphdef, state, jnp.asarray(padded))
    t = int(np.argmax(np.asarray(logits[0, len(ids) - 1], np.float32)))
    out.append(t)
    ids.append(t)
    if t in eos_ids:
      break
  return out


def test_answers_are_the_models_greedy_output(tmp_path):
  pre = load_pretrained(write_checkpoint(tmp_path / "ckpt"), dtype=jnp.float32)
  tok = TextTokenizer.from_dir(str(tmp_path / "ckpt"), bos_token_id=pre.config.bos_token_id,
                               eos_token_id=pre.config.eos_token_id)
  prompts = [{"messages": [{"role": "user", "content": "why is the sea blue ?"}]},
             {"text": "the sky is"},
             {"messages": [{"role": "user", "content": "write a haiku"}]}]
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
  out = tmp_path / "data" / "self.jsonl"
  write_self_generated(str(tmp_path / "prompts.jsonl"), str(out), pre.model, tok,
                       max_new_tokens=MAX_NEW, batch_size=2, log=lambda _: None)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == len(prompts)
  for prompt, row in zip(prompts, rows):
    ids = tok.encode_prompt(prompt)
    answer = tok.decode(greedy(pre.model, ids, set(pre.config.eos_token_ids)))
    if "messages" in prompt:
      assert row["messages"][:-1] == prompt["messages"]
      assert row["messages"][-1] == {"role": "assistant", "content": answer}
    else:
      assert row == {"text": prompt["text"] + answer}
