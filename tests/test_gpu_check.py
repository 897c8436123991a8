"""scripts/gpu_check.py: its CPU smoke run end to end, section isolation, and bad input."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
  spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
  spec.loader.exec_module(module)
  return module


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
  """Body rows (stripped cells) of the first table after the line starting with `heading`."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(heading))
  rows = []
  for line in lines[start + 1:]:
    if line.startswith("## "):
      break
    if line.startswith("|"):
      rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows[2:]  # past the header and the |---:| line


def _positive_finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check")
  env = cpu_env(
      PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), f"--out={out}",
                         "--cpu_smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  report = json.loads((out / "gpu_check.json").read_text())
  markdown = (out / "gpu_check.md").read_text()
  assert markdown.strip() in proc.stdout  # the table is also printed
  return report, markdown


@pytest.mark.slow
def test_smoke_run_records_environment_and_passes_every_section(smoke_run):
  report, _ = smoke_run
  env = report["environment"]
  assert env["jax_backend"] == "cpu" and env["device"] and env["jax"] and env["jaxlib"]
  assert env["date_utc"] and "--cpu_smoke" in report["command"]
  assert list(report["sections"]) == ["kernel_tests", "parity", "roofline", "quadratic",
                                      "generate", "quantized"]
  for name, rec in report["sections"].items():
    assert (rec["status"], rec["error"]) == ("passed", None), name


@pytest.mark.slow
def test_smoke_kernel_tests_collect_the_compiled_cases(smoke_run):
  rec = smoke_run[0]["sections"]["kernel_tests"]
  # On the CPU every compiled case (at least one per file) skips itself; none may fail.
  assert rec["failed"] == rec["errors"] == rec["passed"] == 0
  assert rec["skipped"] >= 3 and rec["returncode"] == 0


@pytest.mark.slow
def test_smoke_parity_rows(smoke_run):
  report, markdown = smoke_run
  rows = {r["impl"]: r for r in report["sections"]["parity"]["rows"]}
  assert rows["xla (bf16)"]["status"] == "reference" and rows["xla (bf16)"]["max_err"] > 0
  auto = rows["auto"]
  assert auto["status"] == "ok" and 0 < auto["bound_frac"] <= 1
  assert 0 < auto["greedy_agreement"] <= 1
  for impl in ("pallas", "triton", "cudnn"):
    assert rows[impl]["status"].startswith("skipped: "), impl
  assert {r[0] for r in _table_rows(markdown, "## parity")} == set(rows)


@pytest.mark.slow
def test_smoke_roofline_row_per_forward_shape(smoke_run, gpu_check):
  report, markdown = smoke_run
  plan = gpu_check.CPU_PLAN
  rec = report["sections"]["roofline"]
  assert _positive_finite(rec["copy_bandwidth_gb_s"])
  by_key = {(r["model"], r["batch"], r["forward"]): r for r in rec["rows"]}
  md_keys = {tuple(r[:3]) for r in _table_rows(markdown, "## roofline")}
  c = gpu_check.preset("tiny")
  # Weight bytes by hand: every weight but the embedding table, plus the looked-up rows.
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = c.hidden_size * (2 * q + 2 * kv + 3 * c.intermediate_size) + 2 * c.hidden_size
  weights = c.num_layers * layer + c.hidden_size + c.hidden_size * c.vocab_size
  for batch in plan.batches:
    for kind in ("ar", "denoise", "commit"):
      row = by_key[("tiny", batch, kind)]
      assert ("tiny", str(batch), kind) in md_keys
      tokens = 1 if kind == "ar" else 32
      assert row["tokens"] == tokens and row["context"] == 64
      assert row["weight_bytes"] == 2 * (weights + batch * tokens * c.hidden_size)
      assert row["kv_bytes"] == 2 * 2 * c.num_layers * batch * 64 * kv
      for key in ("ms", "roofline_ms", "vs_roofline", "achieved_gb_s"):
        assert _positive_finite(row[key]), (kind, key)
      assert row["vs_roofline"] == pytest.approx(row["ms"] / row["roofline_ms"])
      roof_s = (row["weight_bytes"] + row["kv_bytes"]) / (rec["copy_bandwidth_gb_s"] * 1e9)
      assert row["roofline_ms"] == pytest.approx(1e3 * roof_s)
  assert len(rec["rows"]) == 3 * len(plan.batches)


@pytest.mark.slow
def test_smoke_generate_row_per_mode(smoke_run, gpu_check):
  report, markdown = smoke_run
  plan = gpu_check.CPU_PLAN
  rows = {(r["mode"], r["batch"]): r for r in report["sections"]["generate"]["rows"]}
  md_keys = {tuple(r[:2]) for r in _table_rows(markdown, "## generate")}
  # NVIDIA's reported tokens per forward (AR 1 by definition, diffusion 2.6, self-speculation 6.4).
  published = {"ar": 1.0, "diffusion": 2.6, "spec": 6.4}
  new, block = plan.max_new_tokens, plan.generate_block
  for mode in ("ar", "diffusion", "spec"):
    for batch in plan.batches:
      row = rows[(mode, batch)]
      assert (mode, str(batch)) in md_keys
      assert row["recompiles"] == 0
      for key in ("ms_per_round", "forwards_per_s", "derived_tokens_per_s", "decode_s"):
        assert _positive_finite(row[key]), (mode, key)
      assert row["ms_per_round"] == pytest.approx(1e3 * row["decode_s"] / row["rounds"])
      assert row["forwards_per_s"] == pytest.approx(row["decode_nfe"] / row["decode_s"])
      assert row["derived_tokens_per_s"] == pytest.approx(row["forwards_per_s"] * published[mode])
      assert row["derived_tokens_per_s_batch"] == pytest.approx(
          row["derived_tokens_per_s"] * batch)
  # Rounds: one per AR token, one per diffusion block; a speculative round commits >= 1 token.
  assert all(rows[("ar", b)]["rounds"] == new for b in plan.batches)
  assert all(rows[("diffusion", b)]["rounds"] == new // block for b in plan.batches)
  assert all(1 <= rows[("spec", b)]["rounds"] <= new for b in plan.batches)
  # A diffusion block takes 1 to `block` denoising steps plus its commit.
  assert all(new // block <= rows[("diffusion", b)]["decode_nfe"] <= new // block * (block + 1)
             for b in plan.batches)
  assert "DERIVED" in markdown


@pytest.mark.slow
def test_smoke_quadratic_round_beside_the_linear_round(smoke_run, gpu_check):
  report, markdown = smoke_run
  rows = report["sections"]["quadratic"]["rows"]
  assert [(r["block_length"], r["impl"]) for r in rows] == [
      (b, "auto") for b in gpu_check.CPU_PLAN.quadratic_blocks]
  md_keys = {tuple(r[:3]) for r in _table_rows(markdown, "## quadratic")}
  for r in rows:
    assert (str(r["block_length"]), "auto", str(r["quadratic_tokens"])) in md_keys
    assert r["quadratic_tokens"] == r["block_length"] * (r["block_length"] + 1)
    for key in ("draft_ms", "verify_ms", "quadratic_round_ms"):
      assert _positive_finite(r[key]), key
    assert r["linear_round_ms"] == pytest.approx(r["draft_ms"] + r["verify_ms"])
    assert r["quadratic_vs_linear"] == pytest.approx(r["quadratic_round_ms"] / r["linear_round_ms"])


@pytest.mark.slow
def test_smoke_quantized_rows_per_weights_forward_and_batch(smoke_run, gpu_check):
  report, markdown = smoke_run
  plan = gpu_check.CPU_PLAN
  rec = report["sections"]["quantized"]
  rows = {(r["weights"], r["batch"], r["forward"]): r for r in rec["rows"]}
  assert set(rows) == {(w, b, k) for w in gpu_check.QUANTIZED_WEIGHTS for b in plan.batches
                       for k in gpu_check.QUANTIZED_FORWARDS}
  # int8 / fp8 linear kernels: one byte per weight where bf16 has two, plus fp32 scales.
  sizes = rec["param_bytes"]
  assert sizes["int8"] == sizes["fp8"] < 0.75 * sizes["bf16"]
  for (weights, batch, kind), row in rows.items():
    assert all(_positive_finite(row[k]) for k in ("ms", "int8_roofline_ms", "weight_bytes"))
    assert row["vs_bf16"] == pytest.approx(row["ms"] / rows[("bf16", batch, kind)]["ms"])
    assert row["vs_int8_roofline"] == pytest.approx(row["ms"] / row["int8_roofline_ms"])
    assert row["weight_bytes"] == rows[("int8", batch, kind)]["weight_bytes"] or weights == "bf16"
  assert rec["int8_target"] is None and "## quantized: passed" in markdown


def test_a_failing_section_does_not_stop_the_others(gpu_check, monkeypatch):
  def kernel_fault(plan, budget, record):
    record["rows"] = ["partial"]
    raise RuntimeError("kernel fault\nsecond line")

  def fine(plan, budget, record):
    record["rows"] = ["done"]

  monkeypatch.setattr(gpu_check, "SECTION_FNS",
                      {"kernel_tests": kernel_fault, "parity": fine, "roofline": fine})
  plan = dataclasses.replace(gpu_check.CPU_PLAN,
                             budgets_s=dict(kernel_tests=60, parity=60, roofline=0))
  report, writes = {"sections": {}}, []
  gpu_check.run_sections(plan, ("kernel_tests", "parity", "roofline"), report,
                         lambda: writes.append(dict(report["sections"])))
  secs = report["sections"]
  assert secs["kernel_tests"]["status"] == "failed"
  assert secs["kernel_tests"]["error"] == "RuntimeError: kernel fault"
  assert secs["kernel_tests"]["rows"] == ["partial"]  # what it had is kept
  assert (secs["parity"]["status"], secs["parity"]["rows"]) == ("passed", ["done"])
  assert secs["roofline"]["status"] == "failed" and "time budget" in secs["roofline"]["error"]
  assert [list(w) for w in writes] == [["kernel_tests"], ["kernel_tests", "parity"],
                                       ["kernel_tests", "parity", "roofline"]]


@pytest.mark.parametrize("args,culprit", [
    (["--cpu_smoke", "--sections=parity,bogus"], "'bogus'"),
    (["--cpu_smoke", "--out={file}"], "--out="),
    ([], "--cpu_smoke"),  # no GPU here
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(gpu_check, tmp_path, capsys, args,
                                                         culprit):
  out = tmp_path / "out"
  file = tmp_path / "a_file"
  file.write_text("")
  args = [a.format(file=file) for a in args]
  if not any(a.startswith("--out") for a in args):
    args.append(f"--out={out}")
  assert gpu_check.main(args) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and culprit in err, err
  assert not out.exists()


def test_parity_fails_an_impl_beyond_twice_the_xla_error(gpu_check, monkeypatch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  want = [np.array([[[1.0, 0.5, 0.0]]]), np.array([[[0.0, 1.0, 0.99]], [[0.3, 0.0, 1.0]]])]
  # xla bf16 off by 0.01 everywhere: bound 2 * 0.01 + 2**-8 = 0.0239 in both patterns.
  # "auto" is off by 0.02 (within) and flips one of three greedy tokens; "cudnn" is off by 0.03.
  got = {"fp32": want,
         "xla": [w + 0.01 for w in want],
         "auto": [want[0] + 0.02, np.array([[[0.0, 0.99, 1.0]], [[0.3, 0.0, 1.0]]])],
         "cudnn": [want[0], want[1] + 0.03]}
  monkeypatch.setattr(gpu_check, "random_model", lambda cfg, lora: "bf16")
  monkeypatch.setattr(gpu_check, "as_float32", lambda model: "fp32")
  monkeypatch.setattr(gpu_check, "decoding_logits",
                      lambda model, impl, plan: got["fp32" if model == "fp32" else impl])
  monkeypatch.setattr(gpu_check, "PATTERNS", ("first", "second"))
  monkeypatch.setattr(gpu_check, "kernel_unavailable",
                      lambda impl: None if impl in got else "not here")
  record = {}
  budget = gpu_check.Budget(deadline=float("inf"), seconds=60)
  with pytest.raises(RuntimeError, match=r"^cudnn second: error 0\.03 vs xla bf16 0\.01$"):
    gpu_check.parity_section(gpu_check.CPU_PLAN, budget, record)
  rows = {r["impl"]: r for r in record["rows"]}
  assert rows["xla (bf16)"]["greedy_agreement"] == 1.0
  assert rows["auto"]["status"] == "ok"
  assert rows["auto"]["greedy_agreement"] == pytest.approx(2 / 3)
  assert rows["auto"]["bound_frac"] == pytest.approx(0.02 / (0.02 + 2**-8))
  assert rows["cudnn"]["status"] == "exceeds bound" and rows["cudnn"]["worst_pattern"] == "second"
  assert rows["pallas"]["status"] == "skipped: not here"
