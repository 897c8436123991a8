"""Where the test suite's time goes: sums the records of `pytest --cpu-profile=DIR` per module.

  .venv/bin/pytest -q -n auto --dist loadscope --cpu-profile=/tmp/prof
  .venv/bin/python scripts/suite_profile.py /tmp/prof [--top=15]

Per module: CPU seconds of the test processes and of the children they waited for (the sharding
workers, CLI runs), the part of the in-process CPU that JAX reports as tracing, lowering and XLA
compilation (children's compilation is inside their CPU seconds, not itemised), and the part that
Python's cyclic garbage collector took. On the 2-core machine the suite's wall time is about half
its CPU seconds, so these sums say what a change saves.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import bench_utils as bu

COMPILE = ("jaxpr_trace_duration_s", "jaxpr_to_mlir_module_duration_s",
           "backend_compile_duration_s")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("directory", help="the --cpu-profile directory of a pytest run")
  p.add_argument("--top", type=int, default=15, help="modules listed (the rest are summed)")
  args = p.parse_args(argv)
  files = sorted(pathlib.Path(args.directory).glob("*.jsonl"))
  if not files:
    print(f"error: {args.directory}: no *.jsonl records (run pytest with --cpu-profile)",
          file=sys.stderr)
    return 2
  modules = collections.defaultdict(collections.Counter)
  for path in files:
    for line in path.read_text(encoding="utf-8").splitlines():
      record = json.loads(line)
      row = modules[record["test"].split("::")[0]]
      row["tests"] += 1
      for key in ("cpu_s", "children_cpu_s", "gc_s", *COMPILE):
        row[key] += record.get(key, 0.0)
  rows = []
  for module, c in sorted(modules.items(), key=lambda kv: -(kv[1]["cpu_s"]
                                                            + kv[1]["children_cpu_s"])):
    rows.append({"module": module, "tests": c["tests"], "total": c["cpu_s"] + c["children_cpu_s"],
                 "own": c["cpu_s"], "children": c["children_cpu_s"],
                 "xla": c["backend_compile_duration_s"],
                 "trace": c["jaxpr_trace_duration_s"] + c["jaxpr_to_mlir_module_duration_s"],
                 "gc": c["gc_s"]})
  total = {k: sum(r[k] for r in rows) for k in ("tests", "total", "own", "children", "xla",
                                                "trace", "gc")}
  rest = {k: sum(r[k] for r in rows[args.top:]) for k in total}
  shown = rows[:args.top] + ([{"module": f"({len(rows) - args.top} more)", **rest}]
                             if len(rows) > args.top else [])
  print(bu.format_table(shown + [{"module": "all", **total}], [
      ("module", "module"), ("tests", "tests"), ("total", "CPU s"), ("own", "in pytest"),
      ("children", "in children"), ("xla", "XLA compile s"), ("trace", "trace + lower s"),
      ("gc", "GC s")]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
