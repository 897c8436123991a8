"""Shared fixtures: tiny random transformers reference models and their dllm_jax twins."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

# Tests run on the CPU with deterministic fp32 unless a test opts into something else.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile hundreds of small programs and run each a few times: LLVM's optimisation of the
# generated CPU code is most of their compile time and buys nothing at these sizes. XLA's own
# (HLO) passes, which decide fusion and copies, still run. Subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# The PyTorch references run tiny models, where torch's worker threads only cost: one thread
# halves their CPU time on a 2-core machine (set before torch is first imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the whole session: the xdist workers and every script run
# as a child share the programs they compile (the same tiny checkpoints decode in many tests), and
# nothing is written to the user's own cache. The controller creates it before starting the
# workers, which inherit the variable, and removes it at the end (a pytest that a test starts
# inherits it too and leaves it alone). Scripts find it through their
# "auto" cache directory; tests that check the cache itself use their own directories. A program
# loaded from it still fires JAX's backend-compile event, so the no-recompilation tests still
# see every program a call obtains.
_SESSION_CACHE = "DLLM_JAX_TEST_CACHE_HOME"
_OWN_CACHE = not os.environ.get(_SESSION_CACHE)  # False in workers and in a pytest run by a test
if _OWN_CACHE:
  os.environ[_SESSION_CACHE] = tempfile.mkdtemp(prefix="dllm_jax_test_cache_")
os.environ["XDG_CACHE_HOME"] = os.environ[_SESSION_CACHE]

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from dllm_jax.compile_cache import enable_compilation_cache  # pylint: disable=g-import-not-at-top,wrong-import-position

enable_compilation_cache()


def pytest_addoption(parser):
  parser.addoption(
      "--cpu-profile", metavar="DIR",
      help="append each test's CPU seconds (its process and the children it waited for) and the "
           "seconds JAX spent tracing, lowering and compiling and Python's GC spent collecting to "
           "DIR/<pid>.jsonl; "
           "`python scripts/suite_profile.py DIR` sums them per module")


class _CompileSeconds:
  """The seconds JAX reports for tracing, lowering and backend compilation since `reset`."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.listening = False

  def __call__(self, event: str, duration: float, **_) -> None:
    if event.startswith("/jax/core/compile/"):
      name = event.rsplit("/", 1)[-1]
      self.seconds[name] = self.seconds.get(name, 0.0) + duration

  def reset(self) -> None:
    if not self.listening:  # listeners cannot be removed: one per process
      import jax  # pylint: disable=g-import-not-at-top
      jax.monitoring.register_event_duration_secs_listener(self)
      self.listening = True
    self.seconds = {}


_compile_seconds = _CompileSeconds()


class _GCSeconds:
  """CPU seconds of this process (all its threads) while Python's cyclic garbage collector ran,
  since `reset` (gc.callbacks)."""

  def __init__(self):
    self.seconds = 0.0
    self._start = 0.0
    self.listening = False

  def __call__(self, phase: str, info: dict) -> None:
    del info
    if phase == "start":
      self._start = time.process_time()
    else:
      self.seconds += time.process_time() - self._start

  def reset(self) -> None:
    if not self.listening:
      gc.callbacks.append(self)
      self.listening = True
    self.seconds = 0.0


_gc_seconds = _GCSeconds()


def _cpu_seconds() -> tuple[float, float]:
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With --cpu-profile: one JSON line per test, its setup and teardown included. Wall time
  misleads on a shared machine (two workers and their children contend for the cores); CPU
  seconds add up to what the suite costs."""
  directory = item.config.getoption("cpu_profile")
  if not directory:
    yield
    return
  _compile_seconds.reset()
  _gc_seconds.reset()
  before, start = _cpu_seconds(), time.perf_counter()
  yield
  after = _cpu_seconds()
  record = {"test": item.nodeid, "wall_s": time.perf_counter() - start,
            "cpu_s": after[0] - before[0], "children_cpu_s": after[1] - before[1],
            "gc_s": _gc_seconds.seconds,
            **{f"{k}_s": v for k, v in _compile_seconds.seconds.items()}}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def pytest_configure(config):
  # With --dist loadscope, xdist hands out whole modules, by default the ones with the most tests
  # first: the few long modules (real SmolLM2 weights, child processes) then start last and run
  # alone on one worker while the other idles. The order below is kept instead.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Modules holding a test marked slow run first, in file order; the many short modules then
  fill both workers to the end."""
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # stable: each module keeps its order


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ[_SESSION_CACHE], ignore_errors=True)


def ministral_rope(theta=1e6, factor=16.0, original_max=16, beta=0.1):
  return {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
          "original_max_position_embeddings": original_max, "beta_fast": 32.0, "beta_slow": 1.0,
          "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": beta}


def make_torch_ministral(rope=None, *, vocab=128, hidden=48, layers=2, heads=4, kv_heads=2,
                         head_dim=16, intermediate=96, seed=0):
  """A tiny random transformers Ministral3ForCausalLM in fp32 (head_dim != hidden/heads)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.Ministral3Config(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=head_dim, rope_parameters=rope or ministral_rope(), max_position_embeddings=4096,
      tie_word_embeddings=False, attn_implementation="sdpa")
  torch.manual_seed(seed)
  model = transformers.Ministral3ForCausalLM(hf_cfg).float().eval()
  # Default init leaves norms at 1; random norms make the parity test sensitive to their handling.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model


def torch_state_dict(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
  """This process's environment for a child on the CPU, with `devices` simulated host devices
  (fixed when jax starts, hence a child) added to the inherited XLA_FLAGS."""
  flags = os.environ.get("XLA_FLAGS", "")
  if devices is not None:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="module")
def cli_module():
  """scripts/generate.py as a module: its main() runs in this process, where a usage error is the
  UsageError the script turns into exit 2 (test_cli.py runs that path as a child)."""
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
  spec = importlib.util.spec_from_file_location("generate_cli", script)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(mod)
  return mod
