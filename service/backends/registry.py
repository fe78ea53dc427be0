"""Lazy backend registry: a name maps to "module:Class"; heavy imports happen only when chosen."""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: dict[str, str] = {
    "hf": "service.backends.hf_backend:HFBackend",
    "vllm": "service.backends.vllm_backend:VLLMBackend",  # vLLM pooling runner (imports vllm only when chosen)
}


def backend_class(name: str) -> Any:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_backend(config: Any, sources: list[Any] | None = None, name: str | None = None) -> Any:
    """The configured backend over `sources` (models sharing one backbone; default: `config.model`)."""
    cls = backend_class(config.backend)
    if sources is None:
        return cls(config)
    return cls(config, sources=sources, name=name)
