"""Lazy generator registry: `kind:target` -> "module:Class"; heavy imports happen only when one is chosen.

    vllm:PATH    in-process vLLM engine (PATH: a Hugging Face causal-LM folder, or `smollm2`)
    openai:URL   a remote OpenAI-compatible server (vLLM's /v1/chat/completions and /v1/completions)
    hf:PATH      transformers `generate` in a worker thread
"""

from __future__ import annotations

import importlib
from typing import Any

GENERATORS: dict[str, str] = {
    "vllm": "service.generation.vllm_engine:VllmGenerator",
    "openai": "service.generation.openai_compat:OpenAIGenerator",
    "hf": "service.generation.hf_generate:HFGenerator",
}


def parse_spec(spec: str) -> tuple[str, str]:
    """`kind:target` -> (kind, target); a clear ValueError for anything else."""
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in GENERATORS:
        raise ValueError(
            f"generator {spec!r}: expected vllm:PATH, openai:URL or hf:PATH (PATH may be `smollm2`)"
        )
    return kind, target


def generator_class(kind: str) -> Any:
    module_name, _, attr = GENERATORS[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_generator(spec: str, config: Any) -> Any:
    """A generator (not started yet) for `spec`, with limits from the serve config."""
    kind, target = parse_spec(spec)
    return generator_class(kind)(target, config)
