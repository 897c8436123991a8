"""scripts/bench_attention.py --smoke runs end to end on CPU (kernels in interpret mode)."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench_module():
  spec = importlib.util.spec_from_file_location("bench_attention",
                                                ROOT / "scripts" / "bench_attention.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
  spec.loader.exec_module(module)
  return module


def test_smoke_checks_and_times_the_kernel(tmp_path, monkeypatch):
  bench = _bench_module()
  monkeypatch.setenv("DLLM_JAX_KERNEL_INTERPRET", "1")
  status = bench.main(["--smoke", "--patterns", "decode", "--impls", "xla", "pallas", "cudnn",
                       "--out", str(tmp_path)])
  assert status == 0
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  by_impl = {(r["name"], r["impl"]): r for r in rows}
  assert by_impl[("decode", "pallas")]["max_err"] < 1e-4
  assert by_impl[("decode", "pallas")]["us"] > 0
  assert by_impl[("decode", "cudnn")]["skipped"] == "needs cuDNN"
  assert "| decode | 2 | 1 | 128 | pallas |" in (tmp_path / "results.md").read_text()
