"""A training run from an ml_collections config: model, data, optimiser, checkpoints, export.

Config fields (see configs/train_*.py):
  seed, checkpoint, mesh_shape, compilation_cache_dir
  model.{preset, dtype, param_dtype, lora_rank, lora_alpha, lora_targets, overrides}
  objective.{paradigm, eps, ar_loss_weight, dlm_loss_weight, mask_token_id,
             draft_blocks_per_pass}
  data.{path, tokenizer, seq_len, batch_size, micro_batches, seed, prompts, gen_max_new_tokens,
        gen_batch_size}
  optim.{peak_lr, final_lr, warmup_steps, decay_steps, b1, b2, eps, weight_decay, clip_norm}
  train.{steps, trainable, log_every}
  save.{dir, every, keep}
  export.{peft_dir, hf_dir, hf_dtype}
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dllm_jax import sharding
from dllm_jax.checkpoint import export_hf, hf_tensor_shapes
from dllm_jax.config import ModelConfig, preset
from dllm_jax.loader import inspect, load, resolve_dtype
from dllm_jax.model import LoRAConfig, NLDModel
from dllm_jax.tokenizer import TextTokenizer
from dllm_jax.training.checkpointing import CheckpointStore
from dllm_jax.training.data import Encode, PackedDataset, RenderChat
from dllm_jax.training.export import export_peft_adapter, merge_lora
from dllm_jax.training.objective import Objective
from dllm_jax.training.optim import init_lora, make_optimizer, wsd_schedule
from dllm_jax.training.selfgen import write_self_generated
from dllm_jax.training.trainer import Trainer


@dataclasses.dataclass
class Source:
  """What a run starts from: the model, its tokenizer (if known) and a directory of side files."""
  model: NLDModel
  tokenizer: TextTokenizer | None
  directory: str | None  # config.json extras and tokenizer files for the HF export
  shipped_adapter: bool = False  # the checkpoint came with its draft LoRA


def build_model(config: ml_collections.ConfigDict) -> Source:
  """The model to train: `checkpoint` (an HF/converted directory, a llama .gguf file, or
  "smollm2", the embedded SmolLM2-135M-Instruct; dllm_jax.load), or random from `model.preset`
  when `checkpoint` is empty.

  model.overrides replace ModelConfig fields of presets and GGUF models (an AR model needs
  mask_token_id and block_size to train for diffusion). A requested LoRA adapter starts fresh
  (PEFT initialisation) unless the checkpoint ships one.
  """
  mc, seed = config.model, config.seed
  dtype, param_dtype = resolve_dtype(mc.dtype), resolve_dtype(mc.param_dtype)
  lora = (LoRAConfig(mc.lora_rank, mc.lora_alpha, _targets(mc.lora_targets))
          if mc.lora_rank else None)
  overrides = mc.overrides.to_dict()
  if not config.checkpoint:
    cfg: ModelConfig = preset(mc.preset).replace(**overrides)
    model = NLDModel(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, rngs=nnx.Rngs(seed))
    if lora is not None:
      init_lora(model, jax.random.PRNGKey(seed + 1))
    return Source(model, None, None)
  desc = inspect(config.checkpoint)
  cfg = desc.config
  if overrides:
    if desc.kind != "gguf":
      raise ValueError(f"model.overrides {sorted(overrides)} apply to presets and GGUF files, "
                       f"not to checkpoint={config.checkpoint!r} (edit its config.json)")
    cfg = desc.config.replace(**overrides)
    if hf_tensor_shapes(cfg) != hf_tensor_shapes(desc.config):
      raise ValueError(f"model.overrides {sorted(overrides)} change the weight shapes of "
                       f"{desc.path}")
  loaded = load(desc, dtype=dtype, param_dtype=param_dtype, lora=bool(lora), progress=True)
  model = loaded.model
  model.cfg = cfg  # the same architecture, possibly with a mask id and block size for diffusion
  if lora is not None and loaded.draft_lora is not None and loaded.draft_lora != lora:
    raise ValueError(f"model.lora_* ask for {lora}, but {config.checkpoint} ships an adapter "
                     f"{loaded.draft_lora}; make them agree")
  if lora is not None and loaded.draft_lora is None:
    model = _with_fresh_lora(model, lora, seed)
  directory = None if loaded.kind == "gguf" else loaded.path
  return Source(model, loaded.tokenizer, directory,
                shipped_adapter=loaded.draft_lora is not None)


def _targets(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """model.lora_targets: "q_proj,v_proj,o_proj" (as on the command line) or a sequence."""
  if isinstance(spec, str):
    return tuple(t.strip() for t in spec.split(",") if t.strip())
  return tuple(spec)


def _with_fresh_lora(base: NLDModel, lora: LoRAConfig, seed: int) -> NLDModel:
  """`base` rebuilt with an adapter: base weights shared, adapter PEFT-initialised."""
  model = nnx.eval_shape(lambda: NLDModel(base.cfg, dtype=base.dtype, lora=lora,
                                          rngs=nnx.Rngs(seed)))
  graphdef, lora_state, _ = nnx.split(model, nnx.LoRAParam, ...)
  lora_state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), lora_state)
  model = nnx.merge(graphdef, lora_state, nnx.state(base))
  init_lora(model, jax.random.PRNGKey(seed + 1))
  return model


def text_codec(tokenizer: TextTokenizer) -> tuple[Encode, RenderChat | None]:
  """encode (raw text, BOS as the tokenizer config asks) and the chat renderer of a tokenizer."""
  render = None
  if tokenizer.chat_template:
    render = lambda messages, gen: tokenizer.render_chat(messages, add_generation_prompt=gen)
  return tokenizer.encode_raw, render


def train(config: ml_collections.ConfigDict, *, encode: Encode | None = None,
          render_chat: RenderChat | None = None, stop_after: int | None = None,
          log: Callable[[str], Any] = print) -> Trainer:
  """Runs (or resumes) the training run of `config`; returns the trainer at the end.

  encode / render_chat: text -> ids and the chat template; default: data.tokenizer (or the
  checkpoint's tokenizer). stop_after: end after this many total steps without the final save
  and exports, as an interrupted run would. With data.prompts set and data.path absent, data.path
  is first filled with the starting model's own answers to those prompts.
  """
  source = build_model(config)
  model, cfg = source.model, source.model.cfg
  dc = config.data
  tokenizer = source.tokenizer
  if dc.tokenizer:
    tokenizer = TextTokenizer.from_dir(dc.tokenizer, bos_token_id=cfg.bos_token_id,
                                       eos_token_id=cfg.eos_token_id)
  if encode is None:
    if tokenizer is None:
      raise ValueError("data.tokenizer is not set and the model comes with no tokenizer")
    encode, render_chat = text_codec(tokenizer)
  if dc.prompts and not os.path.exists(dc.path):
    if tokenizer is None:
      raise ValueError("data.prompts needs a tokenizer: set data.tokenizer")
    log(f"generating {dc.path} from the prompts in {dc.prompts} with the starting model")
    write_self_generated(dc.prompts, dc.path, model, tokenizer,
                         max_new_tokens=dc.gen_max_new_tokens, batch_size=dc.gen_batch_size,
                         log=log)
  obj = config.objective
  objective = Objective.from_model_config(
      cfg, paradigm=obj.paradigm or None, eps=obj.eps, ar_loss_weight=obj.ar_loss_weight,
      dlm_loss_weight=obj.dlm_loss_weight, mask_token_id=obj.mask_token_id,
      draft_blocks_per_pass=obj.draft_blocks_per_pass or None)
  if config.train.trainable == "lora" and objective.paradigm != "draft":
    if source.shipped_adapter:
      raise ValueError(f"{config.checkpoint} ships a draft adapter (linear_spec_lora/): "
                       f"train it with objective.paradigm='draft', or set train.trainable='full'")
    objective = dataclasses.replace(objective, adapter_forward=True)
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
  dataset = PackedDataset.from_jsonl(dc.path, encode=encode, render_chat=render_chat,
                                     eos_id=cfg.eos_token_id, pad_id=pad_id, seq_len=dc.seq_len,
                                     seed=dc.seed)
  tc, oc = config.train, config.optim
  schedule = wsd_schedule(oc.peak_lr, tc.steps, oc.warmup_steps, oc.decay_steps, oc.final_lr)
  tx = make_optimizer(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay,
                      clip_norm=oc.clip_norm)
  mesh = sharding.make_mesh(config.mesh_shape) if config.mesh_shape else None
  trainer = Trainer(model, objective, tx, trainable=tc.trainable, seed=config.seed, mesh=mesh,
                    schedule=schedule)
  log(f"model: {cfg.num_layers} layers, d={cfg.hidden_size}, vocab {cfg.vocab_size}; "
      f"paradigm {objective.paradigm}, trainable {tc.trainable}; data: {len(dataset)} rows of "
      f"{dc.seq_len} tokens from {dc.path}")

  store = None
  if config.save.dir:
    store = CheckpointStore(config.save.dir, save_every=config.save.every, keep=config.save.keep)
    if store.latest_step() is not None:
      trainer.state, meta = store.restore(trainer.state)
      log(f"resumed from {store.directory} at step {meta['step']} "
          f"(data position {meta['data_position']})")
  try:
    _loop(trainer, dataset, config, store, stop_after, log)
  finally:
    if store is not None:
      store.close()
  if stop_after is None or trainer.current_step >= tc.steps:
    _export(trainer, config, source.directory or dc.tokenizer or None, tokenizer, log)
  return trainer


def _meta(step: int) -> dict[str, int]:
  # Batch s is a pure function of s, so the data position is the number of batches consumed.
  return {"step": step, "data_position": step}


def _loop(trainer: Trainer, dataset: PackedDataset, config, store, stop_after, log) -> None:
  tc, dc = config.train, config.data
  end = tc.steps if stop_after is None else min(tc.steps, stop_after)
  tokens_per_step = dc.micro_batches * dc.batch_size * dc.seq_len
  window_start, window_tokens = time.perf_counter(), 0
  for step in range(trainer.current_step, end):
    metrics = trainer.step(*dataset.batch(step, dc.micro_batches, dc.batch_size))
    window_tokens += tokens_per_step
    done = step + 1
    if store is not None:
      store.save(trainer.state, _meta(done), force=done == tc.steps)
    if done % tc.log_every == 0 or done == end:
      elapsed = time.perf_counter() - window_start
      parts = [f"step {done}/{tc.steps}"]
      parts += [f"{k} {metrics[k]:.4f}" for k in ("loss", "diff_ce", "ar_ce") if k in metrics]
      parts += [f"lr {metrics['lr']:.2e}", f"grad_norm {metrics['grad_norm']:.3f}",
                f"{window_tokens / elapsed:,.0f} tok/s"]
      log(" | ".join(parts))
      window_start, window_tokens = time.perf_counter(), 0


def _export(trainer: Trainer, config, source_dir: str | None, tokenizer: TextTokenizer | None,
            log) -> None:
  ec = config.export
  if ec.peft_dir:
    export_peft_adapter(trainer.model(), ec.peft_dir, config.checkpoint or None)
    log(f"wrote PEFT adapter to {ec.peft_dir}")
  if ec.hf_dir:
    with tempfile.TemporaryDirectory() as tmp:
      if source_dir is None and tokenizer is not None:  # e.g. a GGUF source: write its tokenizer
        _write_tokenizer_files(tokenizer, tmp)
        source_dir = tmp
      model = trainer.model()
      if trainer.objective.adapter_forward:
        model = merge_lora(model)
      out = export_hf(model, ec.hf_dir, dtype=jnp.dtype(ec.hf_dtype), source_dir=source_dir)
    merged = " (LoRA merged into the weights)" if trainer.objective.adapter_forward else ""
    log(f"wrote HF checkpoint to {out}{merged}")


def _write_tokenizer_files(tokenizer: TextTokenizer, directory: str) -> None:
  """The files TextTokenizer.from_dir reads: tokenizer.json, tokenizer_config.json, template."""
  tokenizer.tokenizer.save(os.path.join(directory, "tokenizer.json"))
  tok_cfg = {"add_bos_token": tokenizer.add_bos_token, **tokenizer.special_tokens}
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tok_cfg, f, indent=2)
  if tokenizer.chat_template:
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(tokenizer.chat_template)
