"""`--backend vllm` is registered, imports vLLM only when chosen, and refuses what it cannot serve, clearly."""

from pathlib import Path

import pytest

from service.backends.registry import BACKENDS, backend_class
from tests.helpers import run_with_imports_blocked, test_config

ROOT = Path(__file__).resolve().parents[2]


def test_vllm_is_registered_lazily():
    assert BACKENDS["vllm"] == "service.backends.vllm_backend:VLLMBackend"
    body = (
        "from service.backends.registry import backend_class\n"
        "assert backend_class('vllm').__name__ == 'VLLMBackend'\n"
        "assert not any(name.split('.')[0] in BLOCKED for name in sys.modules)\n"
    )
    out = run_with_imports_blocked({"vllm", "torch"}, body, cwd=ROOT)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_untrained_or_gguf_models_are_refused_before_vllm_starts(model):
    cls = backend_class("vllm")
    with pytest.raises(ValueError, match="--backend hf"):
        cls(test_config(model, backend="vllm"))
