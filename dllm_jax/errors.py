"""The error of every checkpoint reader and writer, so that callers catch one type."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint that does not match what its config describes; the message names the culprit."""
