"""Serving NLD models: a continuous-batching engine (`dllm_jax.serving.engine`, no web framework
needed) and an OpenAI-compatible HTTP layer on it (`dllm_jax.serving.http`, FastAPI + uvicorn,
the `serve` extra). docs/serving.md."""

from dllm_jax.serving.engine import (Engine, EngineConfig, EngineStopped, PromptTooLong,  # noqa: F401
                                     QueueFull, Request)
