"""The benchmark harness: its PyTorch baselines decode as docs/model.md §5 says, and a smoke run
reports.

Timings are never asserted: only that the harness runs and that its report has every field.
"""

import importlib.util
import json
import pathlib
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dllm_jax.config import preset

from conftest import make_torch_ministral

ROOT = pathlib.Path(__file__).resolve().parents[1]
MASK = 100


def _load_script(name):
  path = ROOT / "scripts" / f"{name}.py"
  sys.path.insert(0, str(path.parent))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses resolve their module by name
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tref():
  return _load_script("torch_reference_decode")


@pytest.fixture(scope="module")
def bench():
  return _load_script("bench")


@pytest.fixture(scope="module")
def tiny_torch():
  model = make_torch_ministral(vocab=160, hidden=48, heads=4, kv_heads=2, head_dim=16, seed=3)
  # Sharper logits than the random init gives, so that confidence thresholds commit some
  # positions and not others (mixed step counts).
  with torch.no_grad():
    model.lm_head.weight.mul_(30.0)
  return model


def _greedy(model, prompt, n):
  with torch.no_grad():
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
  return out[:, prompt.shape[1]:].numpy()


def test_ar_loop_equals_transformers_generate(tref, tiny_torch):
  prompt = torch.tensor(np.random.default_rng(0).integers(0, 160, (2, 9)))
  res = tref.ar_decode(tiny_torch, prompt, 24)
  np.testing.assert_array_equal(res.tokens, _greedy(tiny_torch, prompt, 24))
  assert res.nfe == 24 and res.forwards == 24  # prefill + 23 steps; the last token needs none


@pytest.mark.parametrize("threshold", [0.0, 0.5])
@pytest.mark.parametrize("with_lora", [False, True])
def test_spec_loop_equals_greedy_ar(tref, tiny_torch, threshold, with_lora):
  """Spec §5.3: with T = 0 the output is greedy AR decoding, whatever the draft proposes."""
  prompt = torch.tensor(np.random.default_rng(1).integers(0, 160, (1, 7)))
  lora = None
  if with_lora:
    rng = np.random.default_rng(2)
    lora = tref.TorchLoRA.from_numpy(tiny_torch,
                                     0.3 * rng.standard_normal((2, 64, 4), dtype=np.float32),
                                     0.3 * rng.standard_normal((2, 4, 48), dtype=np.float32), 4.0)
  res = tref.linear_spec_decode(tiny_torch, prompt, 30, block_length=8, mask_token_id=MASK,
                                threshold=threshold, lora=lora)
  n = res.tokens.shape[1]
  assert 30 <= n < 30 + 8
  np.testing.assert_array_equal(res.tokens, _greedy(tiny_torch, prompt, n))


def _naive_block_diffusion(model, prompt, n_new, block, threshold):
  """Spec §5.1 without a cache: every forward reruns the whole sequence with a 4-D mask that is
  causal over the prefix and fully visible inside the current block."""
  seq = prompt.clone()
  with torch.no_grad():
    seed = model(seq).logits[:, -1].argmax(-1)
  nfe, out = 0, []
  for _ in range(n_new // block):
    x = torch.full((seq.shape[0], block), MASK)
    x[:, 0] = seed
    base, rem = divmod(block - 1, block)  # B-1 MASKs over B steps
    for step in range(block):
      masked = x == MASK
      if not masked.any():
        break
      nfe += 1
      full = torch.cat([seq, x], 1)
      total, p = full.shape[1], seq.shape[1]
      allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
      allowed[p:, :] = True
      with torch.no_grad():
        logits = model(full, attention_mask=allowed.expand(full.shape[0], 1, total, total)).logits
      logits = logits[:, p:]
      cand = logits.argmax(-1)
      conf = torch.softmax(logits, -1).gather(-1, cand[..., None])[..., 0]
      for r in range(x.shape[0]):
        ranked = sorted((i for i in range(block) if masked[r, i]), key=lambda i: -float(conf[r, i]))
        if threshold is None:
          picks = ranked[:base + (1 if step < rem else 0)]
        else:
          picks = ranked[:1] + [i for i in ranked[1:] if conf[r, i] >= threshold]
        for i in picks:
          x[r, i] = cand[r, i]
    nfe += 1
    seq = torch.cat([seq, x], 1)
    with torch.no_grad():
      seed = model(seq).logits[:, -1].argmax(-1)
    out.append(x)
  return torch.cat(out, 1).numpy(), nfe


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_block_diffusion_loop_against_cacheless_transcription(tref, tiny_torch, threshold):
  prompt = torch.tensor(np.random.default_rng(4).integers(0, 160, (2, 6)))
  want, want_nfe = _naive_block_diffusion(tiny_torch, prompt, 16, 8, threshold)
  got = tref.block_diffusion_decode(tiny_torch, prompt, 16, block_length=8, mask_token_id=MASK,
                                    threshold=threshold)
  np.testing.assert_array_equal(got.tokens, want)
  assert got.nfe == want_nfe


def test_transfer_schedule_matches_spec_example(tref):
  assert tref.transfer_schedule(31, 32) == [1] * 31 + [0]
  assert tref.transfer_schedule(10, 4) == [3, 3, 2, 2]


def test_torch_model_holds_the_given_weights(tref):
  bench_utils = _load_script("bench_utils")
  cfg = preset("tiny")
  tensors = bench_utils.random_llama_tensors(cfg, seed=0)
  model = tref.torch_model(cfg, tensors)
  for name, value in model.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), tensors[name], err_msg=name)


ROW_FIELDS = {"model", "mode", "batch", "nfe", "tokens_per_forward", "forwards_per_s",
              "tokens_per_s", "compile_seconds", "peak_mem_mib", "overhead_frac",
              "torch_tokens_per_s", "speedup_vs_torch", "token_agreement"}
MODE_FIELDS = {"ar": {"ms_ar"}, "diffusion": {"ms_denoise", "ms_commit"},
               "spec": {"ms_draft", "ms_verify", "mean_accepted"},
               "quadratic": {"ms_quadratic", "mean_accepted"}}
TORCH_FIELDS = {"torch_tokens_per_s", "speedup_vs_torch", "token_agreement"}  # no quadratic loop
ROOFLINE_FIELDS = {"ms", "roofline_ms", "vs_roofline", "weight_bytes", "kv_bytes", "torch_ms",
                   "speedup_vs_torch"}


@pytest.mark.slow
def test_smoke_run_reports_every_mode(bench, tmp_path):
  config = runpy.run_path(str(ROOT / "configs" / "bench_smoke.py"))["get_config"]()
  report = bench.run(config, gpu_shapes=True, command="pytest")
  assert {r["mode"] for r in report["cases"]} == {"ar", "diffusion", "spec", "quadratic"}
  for row in report["cases"]:
    fields = ROW_FIELDS - TORCH_FIELDS if row["mode"] == "quadratic" else ROW_FIELDS
    assert fields | MODE_FIELDS[row["mode"]] <= set(row), row["mode"]
  roof = report["roofline"]
  assert roof["rows"] and all(ROOFLINE_FIELDS <= set(r) for r in roof["rows"])
  assert {"date_utc", "device", "jax", "torch", "cpu_threads"} <= set(report["environment"])

  text = bench.render(report)
  for heading in ("## ar", "## diffusion", "## spec", "## quadratic",
                  "## forwards vs bandwidth roofline"):
    assert heading in text
  assert "out tok/s" in text and "speedup" in text

  path = tmp_path / "bench.json"
  bench.write_json(report, str(path))
  loaded = json.loads(path.read_text())
  assert len(loaded["cases"]) == len(report["cases"])
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bench.json")]  # no temp left


def test_gpu_section_skips_without_gpu(bench):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: the section would run")
  config = runpy.run_path(str(ROOT / "configs" / "bench_cpu.py"))["get_config"]()
  section = bench.roofline_section(config)
  assert section["rows"] == [] and "needs a CUDA GPU" in section["skipped"]


def test_cpu_matvec_probe_variants_agree_and_report():
  # The probe asserts that its split variants compute what the single product does, and that its
  # int8 variants come within a few percent of it, before timing them; a split that drops or
  # duplicates a slice, or an int8 product with a wrong scale, fails here.
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cpu_matvec_probe.py"),
                        "--layers=2", "--repeats=1"], capture_output=True, text=True, timeout=300,
                       check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
  assert [r.split("|")[1].strip() for r in rows] == [
      "one dot", "column halves", "row halves", "2 devices (TP)", "int8 weights", "int8 x int8"]


def test_cpu_profile_records_each_test_and_the_script_sums_them(tmp_path):
  """`pytest --cpu-profile` (tests/conftest.py) in a child on one module, then
  scripts/suite_profile.py on what it wrote."""
  profile = tmp_path / "profile"
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
                         "-p", "no:cacheprovider", f"--cpu-profile={profile}",
                         str(ROOT / "tests" / "test_imports.py")],
                        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  records = [json.loads(line) for path in profile.glob("*.jsonl")
             for line in path.read_text().splitlines()]
  assert len(records) == 4 and all(r["test"].startswith("tests/test_imports.py::")
                                   for r in records)
  assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 and r["children_cpu_s"] >= 0 and r["gc_s"] >= 0
             for r in records)
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "suite_profile.py"), str(profile)],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines()
          if line.startswith("| ")}
  assert set(rows) == {"module", "tests/test_imports.py", "all"}
  assert rows["all"][2].strip() == "4"
  assert float(rows["all"][3]) == pytest.approx(sum(r["cpu_s"] + r["children_cpu_s"]
                                                    for r in records), rel=0.01)
  empty = subprocess.run([sys.executable, str(ROOT / "scripts" / "suite_profile.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
  assert empty.returncode == 2 and str(tmp_path) in empty.stderr


@pytest.fixture(scope="module")
def probe_args(tmp_path_factory):
  """A tiny NLD checkpoint and the smallest run of the decoding probes."""
  from tiny_nld import write_checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = write_checkpoint(tmp_path_factory.mktemp("tiny_nld"))
  return [f"--checkpoint={ckpt}", "--new_tokens=4", "--repeats=1", "--prompt_length=5"]


def _table(out: str) -> dict[str, list[str]]:
  return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
          for line in out.splitlines() if line.startswith("| ")}


def test_xla_options_probe_compares_variants_and_refuses_bad_ones(probe_args, capsys):
  """scripts/cpu_xla_options_probe.py on a tiny checkpoint: a variant whose option leaves the
  program as it is (XNNPACK is already on) must decode the same ids as "default" from its own
  executables; an option XLA does not know, or a malformed variant, is exit 2 naming it."""
  probe = _load_script("cpu_xla_options_probe")
  args = probe_args
  assert probe.main([*args, "--variant=same:xla_cpu_use_xnnpack=true"]) == 0
  rows = _table(capsys.readouterr().out)
  assert set(rows) == {"variant", "default", "same"}
  assert rows["same"][1] == "xla_cpu_use_xnnpack=True" and rows["same"][-1] == "yes"
  assert float(rows["default"][3]) == 1.0
  assert probe.main([*args, "--variant=bad:xla_cpu_no_such_option=1"]) == 2
  assert "variant 'bad'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    probe.main([*args, "--variant=no options"])
  assert e.value.code == 2


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_stream_probe_runs_both_ways_with_the_same_ids(probe_args, capsys, mode):
  """scripts/stream_probe.py: the streamed and the whole-loop call, alternating, give the same ids
  (the script exits 1 otherwise)."""
  probe = _load_script("stream_probe")
  assert probe.main([*probe_args, f"--mode={mode}", "--block_length=4"]) == 0
  rows = _table(capsys.readouterr().out)
  assert set(rows) == {"variant", "not streamed", "streamed"}
  assert rows["streamed"][-1] == rows["not streamed"][-1] == "yes"
  assert rows["streamed"][3] in ("0/1", "1/1")
