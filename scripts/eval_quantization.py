"""Quality of the weight-only quantized models against the unquantized one (docs/quantization.md).

  python scripts/eval_quantization.py --checkpoint=smollm2 \
      --prompts=configs/prompts/smollm2_eval.jsonl --text=README.md

For each mode (none, int8, fp8) the same checkpoint is loaded with `quantize=` and
  * decodes every prompt greedily (AR, --max_new_tokens): the share of outputs identical to the
    unquantized model's and, over the outputs that differ, the mean position of the first
    different token;
  * scores --text (held-out prose the model was not tuned on here) in windows of --window tokens:
    perplexity of each next token under teacher forcing;
  * reports the parameters' device bytes.
Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

MODES = (None, "int8", "fp8")


def param_bytes(model) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def perplexity(model, windows) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  total, count = 0.0, 0
  for w in windows:
    tokens = jnp.asarray([w], jnp.int32)
    logits, _ = model(tokens)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    total -= float(jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1).sum())
    count += len(w) - 1
  return math.exp(total / count)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--prompts", default="configs/prompts/smollm2_eval.jsonl")
  p.add_argument("--text", default="README.md", help="held-out text for the perplexity")
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--max_windows", type=int, default=8)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)

  from dllm_jax import loader  # pylint: disable=g-import-not-at-top
  from dllm_jax.decode import AR, generate  # pylint: disable=g-import-not-at-top
  from dllm_jax.training.data import read_jsonl  # pylint: disable=g-import-not-at-top
  try:
    desc = loader.inspect(args.checkpoint)
    prompts = read_jsonl(args.prompts)
    with open(args.text, encoding="utf-8") as f:
      text_ids = desc.tokenizer.encode(f.read())
  except (ValueError, OSError) as e:
    print(str(e).splitlines()[0], file=sys.stderr)
    return 2
  prompts = prompts[:args.limit] if args.limit else prompts
  ids = [desc.tokenizer.encode_prompt(x) for x in prompts]
  windows = [text_ids[i:i + args.window]
             for i in range(0, len(text_ids) - args.window + 1, args.window)][:args.max_windows]
  settings = AR(max_new_tokens=args.max_new_tokens)

  rows, reference = [], None
  for mode in MODES:
    start = time.perf_counter()
    pre = loader.load(desc, dtype=args.dtype, quantize=mode)
    outputs = []
    for i in range(0, len(ids), args.batch_size):
      outputs += generate(pre.model, ids[i:i + args.batch_size], settings).tokens
    reference = outputs if reference is None else reference
    first_diff = [next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                  for o, r in zip(outputs, reference) if o != r]
    rows.append(dict(
        quantize=mode or "none", param_bytes=param_bytes(pre.model),
        identical=sum(o == r for o, r in zip(outputs, reference)) / len(ids),
        mean_first_difference=statistics.fmean(first_diff) if first_diff else None,
        perplexity=perplexity(pre.model, windows), seconds=time.perf_counter() - start))
    print(f"{rows[-1]['quantize']}: {rows[-1]['seconds']:.0f} s", file=sys.stderr)
  print(f"{args.checkpoint}, {len(ids)} prompts, {args.max_new_tokens} new tokens, {args.dtype}; "
        f"perplexity over {len(windows)} windows of {args.window} tokens of {args.text}")
  print("| weights | param bytes | vs unquantized | identical greedy outputs | mean first "
        "difference (token) | perplexity |\n|---|---:|---:|---:|---:|---:|")
  for r in rows:
    first = "-" if r["mean_first_difference"] is None else f"{r['mean_first_difference']:.1f}"
    print(f"| {r['quantize']} | {r['param_bytes'] / 1e6:.1f} MB | "
          f"{r['param_bytes'] / rows[0]['param_bytes']:.2f} | {r['identical']:.0%} | {first} | "
          f"{r['perplexity']:.3f} |")
  print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
