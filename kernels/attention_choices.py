"""Measured per-device winners for `attention_impl="auto"`.

`MEASURED` maps `jax.devices()[0].device_kind` -> {shape class -> impl}. Entries are only added from
`scripts/bench_attention.py` runs (its last table prints the winners in this format; the source
run is recorded in docs/benchmarks.md). A device or shape class without an entry resolves to "xla",
so "auto" never picks an implementation nobody has measured on that device.
"""

from __future__ import annotations

SHAPE_CLASSES = ("decode", "verify", "prefill", "prefix", "bidirectional", "block_diff")

# Queries per row up to which a causal call with a cache offset counts as a verify/commit block
# (memory-bound, flash-decoding layout) rather than a prefill (compute-bound).
VERIFY_MAX_QUERIES = 64

MEASURED: dict[str, dict[str, str]] = {
    # scripts/bench_attention.py on an H100, 2026-11-23 (docs/benchmarks.md, "GPU").
    "NVIDIA H100 80GB HBM3": {"prefill": "cudnn", "verify": "pallas", "prefix": "pallas",
                              "decode": "triton"},
}


def shape_class(mask: str, num_queries: int) -> str:
  """The benchmark row an attention call belongs to."""
  if mask == "causal":
    if num_queries == 1:
      return "decode"
    return "verify" if num_queries <= VERIFY_MAX_QUERIES else "prefill"
  return mask


def measured_choice(device_kind: str, mask: str, num_queries: int) -> str:
  """The fastest measured impl for this device and shape class, or "xla" if none was measured."""
  return MEASURED.get(device_kind, {}).get(shape_class(mask, num_queries), "xla")
