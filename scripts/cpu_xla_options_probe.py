"""Does an XLA:CPU compiler option make batch-1 AR decoding faster? The engine's own programs
(`generate`, greedy AR, one prompt) compiled once per option set, then run in turn in one process.

  python scripts/cpu_xla_options_probe.py                      # SmolLM2, the default variants
  python scripts/cpu_xla_options_probe.py --checkpoint=DIR --new_tokens=64 --repeats=20 \
      --variant="no ynn:xla_cpu_experimental_ynn_fusion_type=" \
      --variant="one eigen thread:xla_cpu_multi_thread_eigen=false"

A variant is "NAME:OPTION=VALUE,OPTION=VALUE" (XLA DebugOptions fields; true/false and integers
are parsed, anything else is a string, empty included); "default" (no option) always runs first
and is what the others are compared with. Without --variant: "ynn off" (every dot an Eigen dot,
none handed to YNNPACK), "eigen 1 thread" (dots single-threaded, so a second core only helps
through independent operations running side by side) and "concurrency scheduler off".

Alternating the variants within each round, on the same loaded weights, lets a shared machine's
load changes hit every variant alike; per-process comparisons on this 2-core machine move by
±10%. Prints the median decode tokens/s of each variant, its ratio to "default", in how many
rounds it beat "default", and whether its ids equal default's (an option that changes a kernel
can change rounding). docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import jax
import numpy as np

import bench_utils as bu
import dllm_jax
from dllm_jax.decode import AR, generate
from dllm_jax.decode import engine

DEFAULT_VARIANTS = ("ynn off:xla_cpu_experimental_ynn_fusion_type=",
                    "eigen 1 thread:xla_cpu_multi_thread_eigen=false",
                    "concurrency scheduler off:xla_cpu_enable_concurrency_optimized_scheduler=false")


def parse_variant(text: str) -> tuple[str, dict]:
  """"NAME:OPTION=VALUE,..." -> (NAME, {OPTION: value}); a one-line ValueError otherwise."""
  name, sep, spec = text.partition(":")
  if not sep or not name.strip() or not spec.strip():
    raise ValueError(f"--variant={text!r}: expected NAME:OPTION=VALUE[,OPTION=VALUE...]")
  options = {}
  for item in spec.split(","):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"--variant={text!r}: {item!r} is not OPTION=VALUE")
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
      options[key.strip()] = lowered == "true"
    elif lowered.lstrip("-").isdigit():
      options[key.strip()] = int(lowered)
    else:
      options[key.strip()] = value.strip()
  return name.strip(), options


@contextlib.contextmanager
def compiled_with(options: dict):
  """`generate` compiles each program through `Lowered.compile()` into engine._COMPILED: here the
  programs it compiles get `options`, and the table starts empty so that it compiles them."""
  original = jax.stages.Lowered.compile

  def compile_with_options(self, compiler_options=None):
    return original(self, {**(compiler_options or {}), **options} or None)

  engine._COMPILED.clear()  # pylint: disable=protected-access
  with mock.patch.object(jax.stages.Lowered, "compile", compile_with_options):
    yield


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default="smollm2", help="anything dllm_jax.load takes")
  p.add_argument("--prompt_length", type=int, default=64, help="random prompt ids")
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=12, help="rounds, every variant once per round")
  p.add_argument("--variant", action="append", help="NAME:OPTION=VALUE,... (repeatable)")
  args = p.parse_args(argv)
  for flag in ("prompt_length", "new_tokens", "repeats"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} must be >= 1")
  try:
    variants = [("default", {})] + [parse_variant(v) for v in args.variant or DEFAULT_VARIANTS]
  except ValueError as e:
    p.error(str(e))
  names = [name for name, _ in variants]
  if len(set(names)) != len(names):
    p.error(f"variant names must differ: {names}")

  try:
    loaded = dllm_jax.load(args.checkpoint, lora=False)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  cfg = loaded.model.cfg
  prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_length).tolist()
  settings = AR(max_new_tokens=args.new_tokens, eos_token_ids=())
  programs, ids = {}, {}
  for name, options in variants:
    with compiled_with(options):
      try:
        ids[name] = generate(loaded.model, [prompt], settings).tokens[0]
      except Exception as e:  # pylint: disable=broad-except  (XLA rejects an unknown option)
        print(f"error: variant {name!r} {options}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
      programs[name] = dict(engine._COMPILED)  # pylint: disable=protected-access

  rates = {name: [] for name in names}
  for _ in range(args.repeats):
    for name in names:
      engine._COMPILED.clear()  # pylint: disable=protected-access
      engine._COMPILED.update(programs[name])  # pylint: disable=protected-access
      out = generate(loaded.model, [prompt], settings)
      rates[name].append(len(out.tokens[0]) / out.decode_seconds)

  print(bu.run_header(checkpoint=args.checkpoint, prompt_length=args.prompt_length,
                      new_tokens=args.new_tokens, repeats=args.repeats))
  rows = bu.alternating_rows(rates, ids, "default")
  for row, (_, options) in zip(rows, variants):
    row["options"] = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "-"
  print(bu.format_table(rows, [("variant", "variant"), ("options", "options"),
                               ("tps", "median decode tok/s"), ("ratio", "vs default"),
                               ("won", "rounds faster than default"),
                               ("same", "same ids as default")]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
