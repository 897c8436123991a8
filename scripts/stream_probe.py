"""Does streaming slow decoding down? `generate` on one prompt with and without `on_tokens`, in
turn, on the same weights and compiled programs.

  python scripts/stream_probe.py                     # SmolLM2, AR, 128 new tokens, 8 rounds
  python scripts/stream_probe.py --checkpoint=DIR --mode=diffusion --block_length=32 --repeats=12

Not streamed, `generate` runs the whole decode loop as one program. Streamed, it runs the loop's
step program once per step and hands each step's new ids to the callback, here what
scripts/generate.py does with them: `StreamDecoder` text, written to an in-memory stream (a
terminal's own speed is left out). Per round each variant runs once, alternating, so that a shared
machine's load changes hit both alike. Prints the median decode tokens/s of each, the streamed
one's ratio, the rounds it was faster in, and whether both produced the same ids (they must).
docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

import bench_utils as bu
import dllm_jax
from dllm_jax.decode import MODES, generate, settings_for
from dllm_jax.tokenizer import StreamDecoder


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default="smollm2", help="anything dllm_jax.load takes")
  p.add_argument("--mode", default="ar", choices=sorted(MODES))
  p.add_argument("--prompt_length", type=int, default=64, help="random prompt ids")
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--block_length", type=int, default=None,
                 help="diffusion / speculative block (default: the settings' own)")
  p.add_argument("--repeats", type=int, default=8, help="rounds, both variants once per round")
  args = p.parse_args(argv)
  for flag in ("prompt_length", "new_tokens", "repeats"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1")
  try:
    loaded = dllm_jax.load(args.checkpoint, lora=False)
    block = {} if args.block_length is None else {"block_length": args.block_length}
    settings = settings_for(args.mode, skip_other_modes=True, max_new_tokens=args.new_tokens,
                            eos_token_ids=(), **block)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  prompt = np.random.default_rng(0).integers(0, loaded.model.cfg.vocab_size,
                                             args.prompt_length).tolist()

  def streamed():
    decoder, sink = StreamDecoder(loaded.tokenizer), io.StringIO()
    out = generate(loaded.model, [prompt], settings,
                   on_tokens=lambda row, new: sink.write(decoder.push(new)))
    sink.write(decoder.flush())
    return out

  variants = {"not streamed": lambda: generate(loaded.model, [prompt], settings),
              "streamed": streamed}
  try:
    ids = {name: run().tokens[0] for name, run in variants.items()}  # compiles both paths
  except ValueError as e:  # e.g. a mode the checkpoint cannot decode (no mask token)
    print(f"error: {e}", file=sys.stderr)
    return 2
  rates = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, run in variants.items():
      out = run()
      rates[name].append(len(out.tokens[0]) / out.decode_seconds)

  print(bu.run_header(checkpoint=args.checkpoint, mode=args.mode,
                      prompt_length=args.prompt_length, new_tokens=args.new_tokens,
                      repeats=args.repeats))
  rows = bu.alternating_rows(rates, ids, "not streamed")
  print(bu.format_table(rows, [("variant", "variant"), ("tps", "median decode tok/s"),
                               ("ratio", "vs not streamed"), ("won", "rounds faster"),
                               ("same", "same ids")]))
  return 0 if ids["streamed"] == ids["not streamed"] else 1


if __name__ == "__main__":
  sys.exit(main())
