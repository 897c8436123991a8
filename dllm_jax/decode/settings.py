"""Decoding settings: one frozen dataclass per mode, each with its own defaults and checks.

    generate(model, prompts, AR(max_new_tokens=128))
    generate(model, prompts, Diffusion(threshold=0.5))
    generate(model, prompts, Spec(block_length=16))
    generate(model, prompts, Quadratic(block_length=8))

Construction checks every value on its own (types, ranges) with a one-line ValueError naming the
field, before any model or weight is touched; `resolve` then checks what depends on the model
(ids inside its vocabulary, a mask token, block multiples, positions) and fills the defaults that
come from the checkpoint (EOS ids, block length). Nothing else in the library defaults or
validates a decoding setting. The defaults are the reference's (docs/model.md §5): block 32,
threshold 0.9 for diffusion and 0 for self-speculation, greedy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

from dllm_jax.config import ModelConfig

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
MAX_EOS = 8  # EOS ids a program compares against (padded with -1)


def _check_int(name: str, value, low: int, high: int = INT32_MAX) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise ValueError(f"{name}={value!r}: expected an integer in [{low}, {high}]")


def _check_unit(name: str, value) -> None:
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or not 0 <= value <= 1):
    raise ValueError(f"{name}={value!r}: expected a number in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSettings:
  """What every mode shares.

  max_new_tokens: ids generated per prompt at most.
  temperature: 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature).
  seed: the noise of sampled decoding (a row's draws depend on seed, step and row only).
  eos_token_ids: stop ids; None = the checkpoint's; () = never stop early.
  max_thinking_tokens, end_think_token_id: the thinking budget, on when both are set: past the
    budget a row that has not closed its thinking gets `end_think_token_id`.
  """
  mode: ClassVar[str]

  max_new_tokens: int = 512
  temperature: float = 0.0
  seed: int = 0
  eos_token_ids: tuple[int, ...] | None = None
  max_thinking_tokens: int | None = None
  end_think_token_id: int | None = None

  def __post_init__(self):
    _check_int("max_new_tokens", self.max_new_tokens, 1)
    if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
        or not math.isfinite(self.temperature) or self.temperature < 0):
      raise ValueError(f"temperature={self.temperature!r}: expected a finite number >= 0")
    _check_int("seed", self.seed, 0, UINT32_MAX)
    if self.eos_token_ids is not None:
      eos = self.eos_token_ids
      eos = (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
      if isinstance(eos, (str, bytes)) or not isinstance(eos, Sequence):
        raise ValueError(f"eos_token_ids={self.eos_token_ids!r}: expected a sequence of ids")
      for e in eos:
        _check_int("eos_token_ids", e, 0)
      if len(eos) > MAX_EOS:
        raise ValueError(f"eos_token_ids: at most {MAX_EOS} ids, got {len(eos)}")
      object.__setattr__(self, "eos_token_ids", tuple(eos))
    if self.max_thinking_tokens is not None:
      _check_int("max_thinking_tokens", self.max_thinking_tokens, 0)
    if self.end_think_token_id is not None:
      _check_int("end_think_token_id", self.end_think_token_id, 0)

  @property
  def thinking_budget(self) -> bool:
    return self.max_thinking_tokens is not None and self.end_think_token_id is not None

  @property
  def block(self) -> int:
    """Tokens one round may write past `max_new_tokens` sizing; AR writes one at a time."""
    return 1

  def resolve(self, cfg: ModelConfig, prompt_lengths: Sequence[int]) -> DecodeSettings:
    """Checks against the model and the prompts; returns the settings with the checkpoint's
    defaults filled in (EOS ids, block length)."""
    eos = cfg.eos_token_ids if self.eos_token_ids is None else self.eos_token_ids
    out = dataclasses.replace(self, eos_token_ids=tuple(eos or ()))
    for name, ids in (("eos_token_ids", out.eos_token_ids),
                      ("end_think_token_id", (out.end_think_token_id,)
                       if out.end_think_token_id is not None else ())):
      for i in ids:
        if i >= cfg.vocab_size:
          raise ValueError(f"{name}: id {i} is outside the vocabulary [0, {cfg.vocab_size})")
    reach = max(prompt_lengths) + out.max_new_tokens + out.overshoot
    if reach > cfg.max_position_embeddings:
      raise ValueError(f"longest prompt ({max(prompt_lengths)}) + max_new_tokens"
                       f"{out.overshoot_term if out.overshoot else ''} = {reach} exceeds the "
                       f"model's max_position_embeddings={cfg.max_position_embeddings}")
    return out

  @property
  def overshoot(self) -> int:
    """Positions a round may use past max_new_tokens (speculation verifies a whole block)."""
    return 0

  overshoot_term: ClassVar[str] = " + block_length"  # how errors spell `overshoot`


@dataclasses.dataclass(frozen=True, kw_only=True)
class AR(DecodeSettings):
  """Autoregressive decoding: one causal forward per token (docs/model.md §5.2)."""
  mode: ClassVar[str] = "ar"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Blocks(DecodeSettings):
  """block_length: tokens per diffusion block / speculative draft; None = the checkpoint's
  block_size (the block it was trained with: 32 for NLD)."""
  block_length: int | None = None
  min_block: ClassVar[int] = 1

  def __post_init__(self):
    super().__post_init__()
    if self.block_length is not None:
      _check_int("block_length", self.block_length, self.min_block)

  @property
  def block(self) -> int:
    return self.block_length

  def _check_multiple(self):
    """For the modes that decode whole blocks."""
    if self.max_new_tokens % self.block_length:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} is not a multiple of "
                       f"block_length={self.block_length} ({self.mode} decodes whole blocks)")

  def _resolve_blocks(self, cfg: ModelConfig, mask_token_id: int | None) -> _Blocks:
    out = self if self.block_length is not None else dataclasses.replace(
        self, block_length=cfg.block_size)
    if out.block_length < self.min_block:
      raise ValueError(f"block_length={out.block_length} (the checkpoint's block_size): must be "
                       f">= {self.min_block} in {self.mode} mode")
    if mask_token_id is None:
      raise ValueError(f"{self.mode} decoding needs a mask token, but the model config has "
                       "mask_token_id=None" + (" (set mask_token_id to an id the model never "
                                               "produces)" if self.mode == "spec" else ""))
    if not 0 <= mask_token_id < cfg.vocab_size:
      raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary "
                       f"[0, {cfg.vocab_size})")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diffusion(_Blocks):
  """Block diffusion (docs/model.md §5.1): each block of MASKs is denoised in parallel against
  the cached prefix, then committed to the cache by one causal forward.

  threshold: commit every masked position whose confidence is >= threshold, plus the most
    confident one. fixed_schedule: instead, commit a fixed number of positions per step
    (M // B, one more for the first M % B steps), the reference's `threshold=None`.
  causal_context: False prefills the prompt bidirectionally and starts every block all-MASK
    instead of with the causally predicted seed.
  max_new_tokens must be a multiple of block_length (whole blocks are decoded).
  """
  mode: ClassVar[str] = "diffusion"
  threshold: float = 0.9
  fixed_schedule: bool = False
  causal_context: bool = True

  def __post_init__(self):
    super().__post_init__()
    _check_unit("threshold", self.threshold)
    for name in ("fixed_schedule", "causal_context"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")
    if self.block_length is not None:
      self._check_multiple()

  def resolve(self, cfg, prompt_lengths):
    out = self._resolve_blocks(cfg, cfg.mask_token_id)
    out._check_multiple()
    return DecodeSettings.resolve(out, cfg, prompt_lengths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec(_Blocks):
  """Linear self-speculation (docs/model.md §5.3): a diffusion draft of the block (draft LoRA
  on), verified by one causal forward; the longest agreeing prefix plus one token is kept.

  threshold: draft confidence threshold; 0 fills the whole draft in one forward.
  draft_lora: draft with the model's LoRA adapter; None = when the model has one.
  mask_token_id: the id drafts start from; None = the checkpoint's. An autoregressive checkpoint
    has none: any id the model never produces works (greedy output stays exact).
  """
  mode: ClassVar[str] = "spec"
  min_block: ClassVar[int] = 2  # a seed plus at least one drafted position
  threshold: float = 0.0
  draft_lora: bool | None = None
  mask_token_id: int | None = None

  def __post_init__(self):
    super().__post_init__()
    _check_unit("threshold", self.threshold)
    if self.draft_lora is not None and not isinstance(self.draft_lora, bool):
      raise ValueError(f"draft_lora={self.draft_lora!r}: expected True, False or None")
    if self.mask_token_id is not None:
      _check_int("mask_token_id", self.mask_token_id, 0)

  @property
  def overshoot(self) -> int:
    return self.block_length

  def resolve(self, cfg, prompt_lengths):
    mask = cfg.mask_token_id if self.mask_token_id is None else self.mask_token_id
    out = dataclasses.replace(self._resolve_blocks(cfg, mask), mask_token_id=mask)
    return DecodeSettings.resolve(out, cfg, prompt_lengths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quadratic(_Blocks):
  """Quadratic self-speculation (docs/model.md §5.6): one forward per round verifies the current
  draft and drafts the next block for every acceptance length at once (B(B+1) tokens); no LoRA.

  ar_mix_weight: None keeps each next draft's first token the exact AR prediction (the output is
    then greedy AR's); a weight w in [0, 1] replaces both the AR row and the first draft row by
    w * AR + (1 - w) * draft logits (w = 1 is the same as None).
  mask_token_id: as for Spec: None = the checkpoint's.
  Greedy only: the reference takes the argmax at any temperature, so temperature must be 0.
  max_new_tokens must be a multiple of block_length; the output is cut at max_new_tokens.
  """
  mode: ClassVar[str] = "quadratic"
  ar_mix_weight: float | None = None
  mask_token_id: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.ar_mix_weight is not None:
      _check_unit("ar_mix_weight", self.ar_mix_weight)
    if self.mask_token_id is not None:
      _check_int("mask_token_id", self.mask_token_id, 0)
    if self.temperature != 0:
      raise ValueError(f"temperature={self.temperature!r}: quadratic self-speculation is greedy "
                       "(expected 0)")
    if self.block_length is not None:
      self._check_multiple()

  # The MASKs of the last sub-block sit up to 2B - 1 positions past the round's cache length.
  overshoot_term: ClassVar[str] = " + 2 * block_length - 1"

  @property
  def overshoot(self) -> int:
    return 2 * self.block_length - 1

  def resolve(self, cfg, prompt_lengths):
    mask = cfg.mask_token_id if self.mask_token_id is None else self.mask_token_id
    out = dataclasses.replace(self._resolve_blocks(cfg, mask), mask_token_id=mask)
    out._check_multiple()
    return DecodeSettings.resolve(out, cfg, prompt_lengths)


MODES: dict[str, type[DecodeSettings]] = {cls.mode: cls
                                          for cls in (AR, Diffusion, Spec, Quadratic)}


def settings_for(mode: str, *, skip_other_modes: bool = False, **kw) -> DecodeSettings:
  """The settings of the mode named `mode` ("ar", "diffusion", "spec", "quadratic") built from
  `kw`; a knob that does not belong to that mode is refused with one line naming it.

  skip_other_modes: drop the knobs that belong to another mode only (one set of knobs for a sweep
    over modes, e.g. a block_length that AR has no use for); a knob of no mode is still refused.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
  cls = MODES[mode]
  fields = {f.name for f in dataclasses.fields(cls)}
  if skip_other_modes:
    kw = {k: v for k, v in kw.items()
          if k in fields or not any(k in {f.name for f in dataclasses.fields(other)}
                                    for other in MODES.values())}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"{unknown[0]} is not a setting of {mode} decoding (its settings: "
                     f"{', '.join(sorted(fields))})")
  return cls(**kw)
