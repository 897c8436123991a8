"""Measures self-speculation on a prompt set: tokens per forward with the checkpoint's draft LoRA
against drafting with the base weights alone, and whether speculative output equals greedy AR.

python scripts/eval_spec.py --checkpoint=/tmp/smollm2-drafter --prompts=prompts.jsonl \
    --max_new_tokens=64 --limit=32

prompts.jsonl holds {"messages": [...]} (rendered with the checkpoint's chat template) or
{"text": ...} lines. Greedy decoding; each configuration runs the same prompts in batches.
Tokens per forward counts the prefill as the reference does (spec §5.3); the decode-only figure
and the mean acceptance length per verify round are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="HF-layout directory with linear_spec_lora/")
  p.add_argument("--prompts", required=True, help="jsonl of {'messages': ...} or {'text': ...}")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
  p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  args = p.parse_args(argv)
  for name in ("checkpoint", "prompts"):
    if not os.path.exists(getattr(args, name)):
      print(f"--{name}: {getattr(args, name)} not found", file=sys.stderr)
      return 2
  if args.max_new_tokens < 1 or args.block_length < 2 or args.batch_size < 1:
    print("--max_new_tokens >= 1, --block_length >= 2 and --batch_size >= 1 are required",
          file=sys.stderr)
    return 2

  import jax  # pylint: disable=g-import-not-at-top  (argument errors answer without loading JAX)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dllm_jax.checkpoint import CheckpointError, load_pretrained  # pylint: disable=g-import-not-at-top
  from dllm_jax.decode import generate  # pylint: disable=g-import-not-at-top
  from dllm_jax.tokenizer import TextTokenizer  # pylint: disable=g-import-not-at-top
  from dllm_jax.training.data import read_jsonl  # pylint: disable=g-import-not-at-top

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(
      args.dtype, jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
  try:
    pre = load_pretrained(args.checkpoint, dtype=dtype, lora="required")
    prompts = read_jsonl(args.prompts)
  except (CheckpointError, ValueError, OSError) as e:
    print(str(e).splitlines()[0], file=sys.stderr)
    return 2
  cfg = pre.config
  tok = TextTokenizer.from_dir(str(pre.tokenizer_dir or args.checkpoint),
                               bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
  prompts = prompts[:args.limit] if args.limit else prompts
  ids = [tok.encode(tok.render_chat(x["messages"])) if "messages" in x else tok.encode_raw(x["text"])
         for x in prompts]

  def run(mode: str, **kw):
    out = {"tokens": [], "nfe": [], "decode_nfe": [], "accepted": []}
    for start in range(0, len(ids), args.batch_size):
      r = generate(pre.model, ids[start:start + args.batch_size], mode=mode,
                   max_new_tokens=args.max_new_tokens, block_length=args.block_length,
                   threshold=0.0, **kw)
      out["tokens"] += r.tokens
      out["nfe"] += r.nfe
      out["decode_nfe"] += r.decode_nfe
      out["accepted"] += [a for row in (r.accepted_lengths or []) for a in row]
    return out

  ar = run("ar")
  lines = ["| drafter | tok/fwd | decode tok/fwd | mean accepted per round | same tokens as AR |",
           "|---|---:|---:|---:|---:|"]
  report = {"checkpoint": args.checkpoint, "prompts": len(ids), "max_new_tokens":
            args.max_new_tokens, "block_length": args.block_length, "rows": []}
  for name, draft_lora in (("base weights (no adapter)", False), ("draft LoRA", True)):
    spec = run("spec", draft_lora=draft_lora)
    n = sum(len(t) for t in spec["tokens"])
    # Speculation may run past max_new_tokens inside its last block; compare the AR length.
    same = sum(s[:len(a)] == a for s, a in zip(spec["tokens"], ar["tokens"]))
    row = dict(drafter=name, tokens_per_forward=n / sum(spec["nfe"]),
               decode_tokens_per_forward=n / sum(spec["decode_nfe"]),
               mean_accepted=statistics.fmean(spec["accepted"]), same_as_ar=f"{same}/{len(ids)}")
    report["rows"].append(row)
    lines.append(f"| {name} | {row['tokens_per_forward']:.3f} | "
                 f"{row['decode_tokens_per_forward']:.3f} | {row['mean_accepted']:.2f} | "
                 f"{row['same_as_ar']} |")
  print("\n".join(lines))
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
