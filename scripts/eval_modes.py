"""Measures tokens per forward of the decoding modes on a prompt set against greedy AR decoding:
linear self-speculation drafting with the model's own weights and, when the checkpoint ships one,
with its draft LoRA; with --quadratic, quadratic self-speculation at the same block length; block
diffusion at the given confidence thresholds.

python scripts/eval_modes.py --checkpoint=/tmp/smollm2-drafter --prompts=prompts.jsonl \
    --max_new_tokens=64 --limit=32 --diffusion_thresholds=0.9,0.7

--checkpoint takes what scripts/generate.py does: an HF or converted directory, a .gguf file or
"smollm2" (an AR model without a mask token needs --mask_token_id to draft).

prompts.jsonl holds {"messages": [...]} (rendered with the checkpoint's chat template) or
{"text": ...} lines. Greedy decoding; each configuration runs the same prompts in batches.
Tokens per forward counts the prefill as the reference does for speculation (docs/model.md §5.3);
the decode-only figure, the mean acceptance length per verify round and, per configuration, how many
outputs equal the AR output and the share of AR tokens reproduced position by position are printed
beside it (speculation is exact by construction; diffusion is not), and the wall-clock seconds of
each configuration over the whole prompt set (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True,
                 help="HF or converted NLD directory, a .gguf file, or 'smollm2'")
  p.add_argument("--prompts", required=True, help="jsonl of {'messages': ...} or {'text': ...}")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--block_length", type=int, default=0,
                 help="diffusion block / draft length; 0: the checkpoint's block_size")
  p.add_argument("--batch_size", type=int, default=8,
                 help="prompts per generate call; a short last batch is padded to the size of "
                      "the others")
  p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
  p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                 help="auto: float32 on CPU, bfloat16 on GPU")
  p.add_argument("--mask_token_id", type=int, default=None,
                 help="drafting mask id for a checkpoint without one (its greedy output stays "
                      "exact in spec mode; no diffusion rows)")
  p.add_argument("--compilation_cache_dir", default="auto",
                 help="persistent compilation cache: auto (~/.cache/dllm_jax/jax), a directory, "
                      "or none")
  p.add_argument("--quadratic", action="store_true",
                 help="also measure quadratic self-speculation (max_new_tokens must be a multiple "
                      "of the block length)")
  p.add_argument("--diffusion_thresholds", default="",
                 help="comma-separated confidence thresholds for block-diffusion rows (empty: none)")
  args = p.parse_args(argv)
  try:
    thresholds = [float(t) for t in args.diffusion_thresholds.split(",") if t.strip()]
  except ValueError:
    print(f"--diffusion_thresholds={args.diffusion_thresholds!r}: expected numbers like 0.9,0.7",
          file=sys.stderr)
    return 2
  if not os.path.exists(args.prompts):
    print(f"--prompts: {args.prompts} not found", file=sys.stderr)
    return 2
  if args.batch_size < 1:
    print(f"--batch_size={args.batch_size}: must be >= 1", file=sys.stderr)
    return 2

  # Argument errors answer without loading JAX.
  from dllm_jax import loader  # pylint: disable=g-import-not-at-top
  from dllm_jax.compile_cache import enable_compilation_cache  # pylint: disable=g-import-not-at-top
  from dllm_jax.decode import (AR, Diffusion, Quadratic, Spec,  # pylint: disable=g-import-not-at-top
                               generate)
  from dllm_jax.training.data import read_jsonl  # pylint: disable=g-import-not-at-top

  try:
    desc = loader.inspect(args.checkpoint)
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError
    print(f"--checkpoint: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if desc.tokenizer is None:
    print(f"--checkpoint: {desc.path} has no tokenizer (tokenizer.json not found)",
          file=sys.stderr)
    return 2
  try:
    prompts = read_jsonl(args.prompts)
    prompts = prompts[:args.limit] if args.limit else prompts
    ids = [desc.tokenizer.encode_prompt(x) for x in prompts]
  except (ValueError, OSError) as e:
    print(str(e).splitlines()[0], file=sys.stderr)
    return 2
  # Every configuration's settings, checked against the checkpoint before the weights load.
  n, block = args.max_new_tokens, args.block_length or None
  spec = dict(max_new_tokens=n, block_length=block, mask_token_id=args.mask_token_id)
  try:
    diffusion = [(f"diffusion, threshold {t:g}",
                  Diffusion(max_new_tokens=n, block_length=block, threshold=t))
                 for t in thresholds]
  except ValueError as e:
    print(f"--diffusion_thresholds={args.diffusion_thresholds!r}: {e}", file=sys.stderr)
    return 2
  try:
    configs = [("ar", AR(max_new_tokens=n)),
               ("spec, drafting with the model's weights", Spec(draft_lora=False, **spec)),
               ("spec, draft LoRA", Spec(draft_lora=True, **spec))]
    configs += diffusion
    configs = [(name, s.resolve(desc.config, [len(i) for i in ids])) for name, s in configs]
  except ValueError as e:
    print(f"--checkpoint={args.checkpoint}: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if args.quadratic:
    try:
      quadratic = Quadratic(**spec).resolve(desc.config, [len(i) for i in ids])
    except ValueError as e:
      print(f"--quadratic: {str(e).splitlines()[0]}", file=sys.stderr)
      return 2
    configs.insert(3, ("quadratic self-speculation", quadratic))
  try:
    enable_compilation_cache(args.compilation_cache_dir)
    pre = loader.load(desc, dtype=args.dtype)
  except (ValueError, OSError) as e:
    print(str(e).splitlines()[0], file=sys.stderr)
    return 2
  if pre.draft_lora is None:
    configs = [(name, s) for name, s in configs if name != "spec, draft LoRA"]

  def run(name: str, settings):
    start_time = time.perf_counter()
    out = {"tokens": [], "nfe": [], "decode_nfe": [], "accepted": [], "seconds": 0.0}
    width = min(args.batch_size, len(ids))
    for start in range(0, len(ids), width):
      batch = ids[start:start + width]
      # A short last batch is filled up with copies of its last prompt, whose rows are dropped
      # (rows decode independently): every call has the same batch size, so the last one
      # compiles nothing new unless its prompts fall in another length bucket.
      r = generate(pre.model, batch + [batch[-1]] * (width - len(batch)), settings)
      out["tokens"] += r.tokens[:len(batch)]
      out["nfe"] += r.nfe[:len(batch)]
      out["decode_nfe"] += r.decode_nfe[:len(batch)]
      out["accepted"] += [a for row in (r.accepted_lengths or [])[:len(batch)] for a in row]
    out["seconds"] = time.perf_counter() - start_time
    print(f"{name}: {len(ids)} prompts in {out['seconds']:.0f}s", file=sys.stderr)
    return out

  ar = run(*configs[0])
  rows = [(name, run(name, s)) for name, s in configs[1:]]
  lines = ["| mode | tok/fwd | decode tok/fwd | mean accepted per round | same tokens as AR | "
           "AR tokens reproduced | wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
  report = {"checkpoint": args.checkpoint, "prompts": len(ids), "max_new_tokens":
            args.max_new_tokens, "block_length": configs[1][1].block_length,
            "ar_seconds": round(ar["seconds"], 1), "rows": []}
  for name, out in rows:
    n = sum(len(t) for t in out["tokens"])
    # Speculation and diffusion may run past max_new_tokens inside their last block; compare
    # over the AR output's length.
    same = sum(o[:len(a)] == a for o, a in zip(out["tokens"], ar["tokens"]))
    agree = sum(x == y for o, a in zip(out["tokens"], ar["tokens"]) for x, y in zip(o, a))
    row = dict(mode=name, tokens_per_forward=n / sum(out["nfe"]),
               decode_tokens_per_forward=n / sum(out["decode_nfe"]),
               mean_accepted=statistics.fmean(out["accepted"]) if out["accepted"] else None,
               same_as_ar=f"{same}/{len(ids)}",
               ar_tokens_reproduced=agree / sum(len(a) for a in ar["tokens"]),
               seconds=round(out["seconds"], 1))
    report["rows"].append(row)
    accepted = "-" if row["mean_accepted"] is None else f"{row['mean_accepted']:.2f}"
    lines.append(f"| {name} | {row['tokens_per_forward']:.3f} | "
                 f"{row['decode_tokens_per_forward']:.3f} | {accepted} | {row['same_as_ar']} | "
                 f"{row['ar_tokens_reproduced']:.0%} | {row['seconds']:.0f} |")
  print("\n".join(lines))
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
