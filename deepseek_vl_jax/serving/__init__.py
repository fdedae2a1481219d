"""Serving: an OpenAI-compatible HTTP server (`deepseek-vl-jax serve`) over an engine with continuous batching,
an image-feature cache and an image-aware prefix KV cache, whose greedy answers do not depend on who else is asking.

The engine (`Engine`) is usable without HTTP; `create_app` puts the Starlette app in front of it."""

from deepseek_vl_jax.serving.engine import Engine, EngineConfig, Event, Options, Prompt, QueueFull

__all__ = ["Engine", "EngineConfig", "Event", "Options", "Prompt", "QueueFull", "create_app", "ServerConfig"]


def __getattr__(name):
    if name in ("create_app", "ServerConfig"):
        from deepseek_vl_jax.serving import app

        return getattr(app, name)
    raise AttributeError(name)
