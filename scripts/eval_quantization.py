"""Quality of the weight-only quantized models against the unquantized one (docs/quantization.md).

  python scripts/eval_quantization.py --checkpoint=smollm2 \
      --prompts=configs/prompts/smollm2_eval.jsonl --text=README.md
  python scripts/eval_quantization.py --checkpoint=DIR --modes=ar,diffusion,spec ...

For each weight type (none, int8, fp8) the same checkpoint is loaded with `quantize=` and
  * decodes every prompt greedily in each of --modes: the share of outputs identical to the
    unquantized model's in the same mode and, over the outputs that differ, the mean position of
    the first different token; for "ar" also the unquantized model's top-2 logit margin at that
    position (teacher-forced on the common prefix) against the median margin over all positions,
    which tells whether outputs part where the logits leave no room;
  * scores --text (held-out prose) in windows of --window tokens: perplexity of each next token
    under teacher forcing;
  * reports the parameters' bytes.
Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

WEIGHTS = (None, "int8", "fp8")


def param_bytes(model) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def next_token_logits(model, ids: list[int], bucket: int = 128):
  """Causal logits [len(ids), V]; the input is padded to a multiple of `bucket` so that inputs of
  many lengths share a few compiled programs (padding after the last id changes nothing before)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  padded = ids + [0] * (-len(ids) % bucket)
  logits, _ = model(jnp.asarray([padded], jnp.int32))
  return logits[0, :len(ids)].astype(jnp.float32)


def top2_margins(logits) -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  top = jax.lax.top_k(logits, 2)[0]
  return [float(x) for x in top[:, 0] - top[:, 1]]


def perplexity(model, windows) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  total, count = 0.0, 0
  for w in windows:
    logp = jax.nn.log_softmax(next_token_logits(model, w)[:-1], axis=-1)
    total -= float(jnp.take_along_axis(logp, jnp.asarray(w[1:])[:, None], axis=-1).sum())
    count += len(w) - 1
  return math.exp(total / count)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", default="smollm2")
  p.add_argument("--prompts", default="configs/prompts/smollm2_eval.jsonl")
  p.add_argument("--text", default="README.md", help="held-out text for the perplexity")
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--max_windows", type=int, default=8)
  p.add_argument("--modes", default="ar", help="comma-separated decoding modes")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = p.parse_args(argv)

  from dllm_jax import loader  # pylint: disable=g-import-not-at-top
  from dllm_jax.decode import generate, settings_for  # pylint: disable=g-import-not-at-top
  from dllm_jax.training.data import read_jsonl  # pylint: disable=g-import-not-at-top
  try:
    desc = loader.inspect(args.checkpoint)
    prompts = read_jsonl(args.prompts)
    with open(args.text, encoding="utf-8") as f:
      text_ids = desc.tokenizer.encode(f.read())
    modes = {m: settings_for(m, max_new_tokens=args.max_new_tokens)
             for m in args.modes.split(",")}
  except (ValueError, OSError) as e:
    print(str(e).splitlines()[0], file=sys.stderr)
    return 2
  prompts = prompts[:args.limit] if args.limit else prompts
  ids = [desc.tokenizer.encode_prompt(x) for x in prompts]
  windows = [text_ids[i:i + args.window]
             for i in range(0, len(text_ids) - args.window + 1, args.window)][:args.max_windows]

  rows, reference, reference_model = [], {}, None
  for weights in WEIGHTS:
    start = time.perf_counter()
    pre = loader.load(desc, dtype=args.dtype, quantize=weights)
    reference_model = reference_model or pre.model
    row = dict(quantize=weights or "none", param_bytes=param_bytes(pre.model),
               perplexity=perplexity(pre.model, windows), modes={})
    for mode, settings in modes.items():
      outputs = []
      for i in range(0, len(ids), args.batch_size):
        outputs += generate(pre.model, ids[i:i + args.batch_size], settings).tokens
      ref = reference.setdefault(mode, outputs)
      differ = [(k, next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r))))
                for k, (o, r) in enumerate(zip(outputs, ref)) if o != r]
      stats = dict(identical=1 - len(differ) / len(ids),
                   mean_first_difference=statistics.fmean(j for _, j in differ) if differ else None)
      if mode == "ar":
        margins = [top2_margins(next_token_logits(reference_model, ids[k] + ref[k][:j])[-1:])[0]
                   for k, j in differ if j < len(ref[k])]
        if weights is None:
          everywhere = [m for k in range(min(len(ids), 8))
                        for m in top2_margins(next_token_logits(
                            reference_model, ids[k] + ref[k])[len(ids[k]) - 1:-1])]
          row["median_margin"] = statistics.median(everywhere)
        stats["mean_margin_at_first_difference"] = statistics.fmean(margins) if margins else None
      row["modes"][mode] = stats
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    print(f"{row['quantize']}: {row['seconds']:.0f} s", file=sys.stderr)
  print(f"{args.checkpoint}, {len(ids)} prompts, {args.max_new_tokens} new tokens, {args.dtype}; "
        f"perplexity over {len(windows)} windows of {args.window} tokens of {args.text}")
  print("| weights | param bytes | vs unquantized | perplexity | mode | identical outputs | mean "
        "first difference (token) | mean top-2 margin there |\n|---|---:|---:|---:|---|---:|---:|---:|")
  cell = lambda x: "-" if x is None else f"{x:.2f}"
  for r in rows:
    for mode, st in r["modes"].items():
      print(f"| {r['quantize']} | {r['param_bytes'] / 1e6:.1f} MB | "
            f"{r['param_bytes'] / rows[0]['param_bytes']:.2f} | {r['perplexity']:.3f} | {mode} | "
            f"{st['identical']:.0%} | {cell(st['mean_first_difference'])} | "
            f"{cell(st.get('mean_margin_at_first_difference'))} |")
  if "median_margin" in rows[0]:
    print(f"median top-2 margin of the unquantized model over its own AR outputs: "
          f"{rows[0]['median_margin']:.2f}")
  print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
