"""Training runs on the tiny model: both losses fall, gradient accumulation is exact, a killed run
resumes bit for bit, chat data is masked to the responses, the adapter export loads back, and LoRA
fine-tuning of the joint objective exports merged weights."""

import json
import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from dllm_jax import LoRAConfig, NLDModel, preset
from dllm_jax.model import lora_linears
from dllm_jax.checkpoint import LORA_DIR, export_hf, load_pretrained
from dllm_jax.training import data as data_lib
from dllm_jax.training.export import export_peft_adapter, merge_lora
from dllm_jax.training.objective import PARADIGMS, Objective
from dllm_jax.training.optim import init_lora, make_optimizer, wsd_schedule
from dllm_jax.training.run import train
from dllm_jax.training.trainer import Trainer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CFG = preset("tiny").replace(block_size=8)
EOS = CFG.eos_token_id


def encode(text):
  """A character-level codec inside the tiny vocabulary (ids 120..239, clear of MASK=100)."""
  return [120 + ord(c) % 120 for c in text]


def counting_corpus(rng, rows, n):
  """Rows of 'count upwards by a per-row stride' (mod 10): learnable left-to-right and in-fill."""
  start, stride = rng.integers(0, 10, rows), rng.integers(1, 4, rows)
  digits = (start[:, None] + stride[:, None] * np.arange(n)[None]) % 10
  return (130 + 10 * stride[:, None] + digits).astype(np.int32)


@pytest.mark.slow
def test_training_lowers_diffusion_and_ar_losses(rng):
  tokens = counting_corpus(rng, 64, 32)
  eval_tokens = counting_corpus(np.random.default_rng(1), 16, 32)
  ones = np.ones_like(eval_tokens)
  schedule = wsd_schedule(1e-2, 40, 4, 10, 1e-3)
  objective = Objective.from_model_config(CFG, paradigm="block_diff")
  trainer = Trainer(NLDModel(CFG, rngs=nnx.Rngs(0)), objective, make_optimizer(schedule),
                    schedule=schedule)
  key = jax.random.PRNGKey(7)  # the same masks before and after
  before = trainer.evaluate(eval_tokens, ones, key)
  for step in range(40):
    idx = np.random.default_rng(step).permutation(64)[:16]
    trainer.step(tokens[idx][None], np.ones((1, 16, 32), np.int32))
  after = trainer.evaluate(eval_tokens, ones, key)
  assert after["ar_ce"] < before["ar_ce"] - 1.0, (before, after)
  assert after["diff_ce"] < before["diff_ce"] - 1.0, (before, after)


def test_gradient_accumulation_equals_one_big_batch(rng):
  """Two micro-batches of 2 = one batch of 4, including the global token-count normaliser
  (plain SGD: Adam's first step would hide a wrongly scaled gradient)."""
  tokens = counting_corpus(rng, 4, 16)
  loss_mask = (rng.random((4, 16)) < 0.5).astype(np.int32)
  loss_mask[0] = 1  # unequal token counts per micro-batch
  obj = Objective.from_model_config(CFG, paradigm="autoregressive")
  params = []
  for micro, batch in ((1, 4), (2, 2)):
    trainer = Trainer(NLDModel(CFG, rngs=nnx.Rngs(0)), obj, optax.sgd(1.0))
    trainer.step(tokens.reshape(micro, batch, 16), loss_mask.reshape(micro, batch, 16))
    params.append(trainer.state["params"])
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # And the update is not trivially zero.
  fresh = nnx.to_pure_dict(nnx.state(NLDModel(CFG, rngs=nnx.Rngs(0)), nnx.Param))
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(fresh))]
  assert max(moved) > 1e-3


def _tiny_run_config(tmp_path, data_path, steps):
  config = runpy.run_path(str(CONFIGS / "train_tiny.py"))["get_config"]()
  config.model.overrides.block_size = 8
  config.data.path = str(data_path)
  config.data.seq_len = 32
  config.data.batch_size = 2
  config.data.micro_batches = 2
  config.optim.warmup_steps = 1
  config.optim.decay_steps = 2
  config.train.steps = steps
  config.train.log_every = 1
  config.save.dir = str(tmp_path / "ckpt")
  config.save.every = 2
  config.save.keep = 2
  return config


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, rng):
  data_path = tmp_path / "data.jsonl"
  with open(data_path, "w") as f:
    for _ in range(24):
      f.write(json.dumps({"text": "".join(rng.choice(list("abcdefgh"), size=20))}) + "\n")
  full = train(_tiny_run_config(tmp_path / "a", data_path, 6), encode=encode, log=lambda _: None)
  # Interrupted after step 5 with the last checkpoint at step 4: the resumed run redoes step 5.
  cfg_b = _tiny_run_config(tmp_path / "b", data_path, 6)
  train(cfg_b, encode=encode, stop_after=5, log=lambda _: None)
  lines = []
  resumed = train(cfg_b, encode=encode, log=lines.append)
  assert any("resumed" in line and "step 4" in line for line in lines), lines
  assert any("tok/s" in line for line in lines)
  assert resumed.current_step == full.current_step == 6
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kept = sorted(os.listdir(tmp_path / "b" / "ckpt"))
  assert kept == ["4", "6"], kept  # keep-N


MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "sure"}]


def _render(think_in_prompt):
  def render(messages, add_generation_prompt):
    text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
    return text + (f"<assistant>{think_in_prompt}" if add_generation_prompt else "")
  return render


def test_chat_loss_mask_covers_only_responses():
  render = _render("")
  [(ids, mask)] = data_lib.tokenize_chat(MESSAGES, encode, render)
  text = render(MESSAGES, False)
  assert ids == encode(text)
  want = np.zeros(len(text), int)
  for span in ("yo|", "sure|"):  # the response and its end-of-turn marker
    start = text.index("<assistant>" + span) + len("<assistant>")
    want[start:start + len(span)] = 1
  np.testing.assert_array_equal(mask, want)


def test_chat_with_think_pair_only_in_generation_prompt():
  """Responses follow the generation prompt exactly as at inference (think pair included); the
  history then no longer extends the tokens so far, so each turn becomes its own example."""
  render = _render("<think></think>")
  examples = data_lib.tokenize_chat(MESSAGES, encode, render)
  want_texts = ["<user>hi|<assistant><think></think>yo|",
                "<user>hi|<assistant>yo|<user>ok?|<assistant><think></think>sure|"]
  assert [ids for ids, _ in examples] == [encode(t) for t in want_texts]
  for (_, mask), text, resp in zip(examples, want_texts, ("yo|", "sure|")):
    np.testing.assert_array_equal(mask, [0] * (len(text) - len(resp)) + [1] * len(resp))


def test_packing_and_batches():
  examples = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8], [1, 1, 1, 1, 1])]
  tokens, mask = data_lib.pack(examples, 3, pad_id=0)
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [4, 5, 6], [7, 8, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1], [1, 1, 0]])
  ds = data_lib.PackedDataset(tokens, mask, seed=3)
  first_epoch = ds.rows(0, 3)[0]
  assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, tokens))  # a permutation per epoch
  b0, _ = ds.batch(1, 2, 2)
  np.testing.assert_array_equal(b0.reshape(4, 3), ds.rows(4, 4)[0])  # pure function of the index


def test_bad_jsonl_line_is_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "a"}\n{"txt": "b"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    data_lib.read_jsonl(path)


TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def test_peft_adapter_export_loads_back(tmp_path):
  """Adapters on several targets: PEFT names and shapes as docs/model.md §2.3, and a bit-exact
  reload."""
  lora = LoRAConfig(4, 16, targets=TARGETS)
  model = NLDModel(CFG, lora=lora, rngs=nnx.Rngs(0))
  for i, (_, _, linear) in enumerate(lora_linears(model)):
    linear.lora_b[...] = jax.random.normal(jax.random.PRNGKey(1 + i), linear.lora_b.shape)
  base_dir = tmp_path / "hf"
  export_hf(NLDModel(CFG, rngs=nnx.Rngs(0)), base_dir)
  export_peft_adapter(model, base_dir / LORA_DIR)
  umask = os.umask(0)
  os.umask(umask)
  for d in (base_dir, base_dir / LORA_DIR):  # as a plain mkdir would make them
    assert (d.stat().st_mode & 0o777) == 0o777 & ~umask, d
  cfg = json.loads((base_dir / LORA_DIR / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 16, list(TARGETS))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(str(base_dir / LORA_DIR / "adapter_model.safetensors"))
  q_width, d, f = CFG.num_heads * CFG.head_dim, CFG.hidden_size, CFG.intermediate_size
  widths = {"q_proj": (d, q_width), "v_proj": (d, CFG.num_kv_heads * CFG.head_dim),
            "o_proj": (q_width, d), "down_proj": (f, d)}  # (in, out), from docs/model.md §2.3
  assert len(tensors) == 2 * len(TARGETS) * CFG.num_layers
  for target, (d_in, d_out) in widths.items():
    module = "mlp" if target == "down_proj" else "self_attn"
    key = f"base_model.model.encoder.layers.1.{module}.{target}.lora_{{}}.weight"
    assert tensors[key.format("A")].shape == (4, d_in)  # [r, in]
    assert tensors[key.format("B")].shape == (d_out, 4)  # [out, r]
    assert tensors[key.format("A")].dtype == np.float32
  loaded = load_pretrained(base_dir, dtype=jnp.float32, lora="required")
  assert loaded.lora == lora
  want, got = lora_linears(model), lora_linears(loaded.model)
  assert [(t, i) for t, i, _ in got] == [(t, i) for t in TARGETS for i in range(CFG.num_layers)]
  for (target, i, g), (_, _, w) in zip(got, want):
    for name in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(getattr(g, name)[...], getattr(w, name)[...],
                                    err_msg=f"{target} layer {i}")


def test_lora_only_training_on_several_targets(rng):
  """trainable='lora': the base weights stay bit-identical, every adapter factor moves."""
  model = NLDModel(CFG, lora=LoRAConfig(4, 16, targets=TARGETS), rngs=nnx.Rngs(0))
  init_lora(model, jax.random.PRNGKey(1))
  base_before = [np.asarray(x) for x in jax.tree.leaves(
      nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))]
  lora_before = {(t, i): (np.asarray(l.lora_a[...]), np.asarray(l.lora_b[...]))
                 for t, i, l in lora_linears(model)}
  schedule = optax.constant_schedule(1e-2)
  trainer = Trainer(model, Objective.from_model_config(CFG, paradigm="draft"),
                    make_optimizer(schedule, weight_decay=0.0), trainable="lora")
  tokens = counting_corpus(rng, 4, 16)
  for _ in range(2):
    trainer.step(tokens[None], np.ones((1, 4, 16), np.int32))
  trained = trainer.model()
  base_after = jax.tree.leaves(nnx.state(trained, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  assert len(base_after) == len(base_before)
  for a, b in zip(base_before, base_after):
    np.testing.assert_array_equal(a, np.asarray(b))
  for target, i, linear in lora_linears(trained):
    a0, b0 = lora_before[target, i]
    assert np.abs(np.asarray(linear.lora_a[...]) - a0).max() > 0, (target, i)
    assert np.abs(np.asarray(linear.lora_b[...]) - b0).max() > 0, (target, i)


def test_unknown_lora_target_is_named():
  with pytest.raises(ValueError, match="'qkv_proj' is unknown") as e:
    LoRAConfig(4, 16, targets=("q_proj", "qkv_proj"))
  assert "\n" not in str(e.value)
  config = runpy.run_path(str(CONFIGS / "train_tiny.py"))["get_config"]()
  config.model.lora_rank = 4
  config.model.lora_targets = "o_proj,gate"
  with pytest.raises(ValueError, match="'gate' is unknown"):
    train(config, encode=encode, log=lambda _: None)


def test_merge_lora_equals_forward_with_adapter():
  """The merged kernels compute what the forward with the adapter computes, in every mode."""
  model = NLDModel(CFG, lora=LoRAConfig(4, 16, targets=TARGETS), rngs=nnx.Rngs(0))
  for i, (_, _, linear) in enumerate(lora_linears(model)):
    linear.lora_b[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(1 + i), linear.lora_b.shape)
  merged = merge_lora(model)
  assert merged.lora is None
  tokens = jnp.asarray(counting_corpus(np.random.default_rng(0), 2, 16))
  for pattern in ("causal", "bidirectional", "block_diff"):
    x = jnp.concatenate([tokens, tokens], axis=1) if pattern == "block_diff" else tokens
    with_adapter, _ = model(x, pattern=pattern, lora=True)
    without, _ = model(x, pattern=pattern)
    got, _ = merged(x, pattern=pattern)
    assert np.abs(np.asarray(with_adapter) - np.asarray(without)).max() > 1e-2  # the delta matters
    np.testing.assert_allclose(np.asarray(got), np.asarray(with_adapter), atol=2e-5, rtol=1e-5,
                               err_msg=pattern)


@pytest.mark.slow
def test_lora_fine_tuning_of_the_joint_objective(tmp_path, rng):
  """trainable='lora' with block_diff on a briefly pretrained base: both losses fall, and the HF
  export holds the merged weights (no draft adapter), reproducing the adapted model's logits.
  (A random base cannot be LoRA-tuned: its small random head caps the logits' scale.)"""
  data_path = tmp_path / "data.jsonl"
  with open(data_path, "w") as f:
    for row in counting_corpus(rng, 48, 32):
      f.write(json.dumps({"text": "".join(chr(t - 120) for t in row)}) + "\n")
  pre = _tiny_run_config(tmp_path / "pre", data_path, 10)
  pre.save.dir, pre.optim.peak_lr = "", 1e-2
  pre.export.hf_dir = str(tmp_path / "pretrained")
  train(pre, encode=encode, log=lambda _: None)
  config = _tiny_run_config(tmp_path / "lora", data_path, 60)
  config.save.dir = ""
  config.checkpoint = pre.export.hf_dir
  config.model.overrides = ml_collections.ConfigDict()
  config.model.lora_rank, config.model.lora_alpha = 8, 16.0
  config.model.lora_targets = ",".join(TARGETS)
  config.train.trainable = "lora"
  config.optim.peak_lr, config.optim.weight_decay = 1e-2, 0.0
  config.export.hf_dir, config.export.hf_dtype = str(tmp_path / "hf"), "float32"
  lines = []
  trainer = train(config, encode=encode, log=lines.append)
  assert trainer.objective.adapter_forward
  losses = np.array([(float(l.split("diff_ce ")[1].split()[0]),
                      float(l.split("ar_ce ")[1].split()[0])) for l in lines if l.startswith("step ")])
  first, last = losses[:3].mean(axis=0), losses[-3:].mean(axis=0)
  assert np.all(last < first - 0.25), (first, last)
  assert any("LoRA merged" in l for l in lines), lines
  assert not (tmp_path / "hf" / LORA_DIR).exists()
  loaded = load_pretrained(tmp_path / "hf", dtype=jnp.float32)
  assert loaded.lora is None
  tokens = jnp.asarray(counting_corpus(np.random.default_rng(3), 2, 16))
  want, _ = trainer.model()(tokens, pattern="bidirectional", lora=True)
  got, _ = loaded.model(tokens, pattern="bidirectional")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_lora_fine_tuning_refuses_a_shipped_draft_adapter(tmp_path):
  model = NLDModel(CFG, lora=LoRAConfig(4, 16, targets=("o_proj",)), rngs=nnx.Rngs(0))
  export_hf(model, tmp_path / "nld")
  config = _tiny_run_config(tmp_path, tmp_path / "unused.jsonl", 2)
  config.checkpoint = str(tmp_path / "nld")
  config.model.overrides = ml_collections.ConfigDict()
  config.model.lora_rank, config.model.lora_alpha, config.model.lora_targets = 4, 16.0, "o_proj"
  config.train.trainable = "lora"
  with pytest.raises(ValueError, match="ships a draft adapter"):
    train(config, encode=encode, log=lambda _: None)


def test_config_overrides_are_refused_for_directories(tmp_path):
  export_hf(NLDModel(CFG, rngs=nnx.Rngs(0)), tmp_path / "nld")
  config = _tiny_run_config(tmp_path, tmp_path / "unused.jsonl", 2)  # overrides block_size
  config.checkpoint = str(tmp_path / "nld")
  with pytest.raises(ValueError, match="apply to presets and GGUF files"):
    train(config, encode=encode, log=lambda _: None)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("train_*.py")
                                        if p.name != "train_common.py"))
def test_training_configs_are_consistent(name):
  """Every shipped job file builds, and its knobs pass the checks a run would make later."""
  c = runpy.run_path(str(CONFIGS / name))["get_config"]()
  assert c.objective.paradigm in PARADIGMS
  assert c.train.trainable in ("full", "lora")
  if c.train.trainable == "lora":
    assert c.model.lora_rank > 0
  if c.model.lora_rank:
    LoRAConfig(c.model.lora_rank, c.model.lora_alpha, tuple(c.model.lora_targets.split(",")))
  block = c.model.overrides.get("block_size")
  if block and c.objective.paradigm in ("block_diff", "draft"):
    assert c.data.seq_len % block == 0
  wsd_schedule(c.optim.peak_lr, c.train.steps, c.optim.warmup_steps, c.optim.decay_steps,
               c.optim.final_lr)
