"""Every README and docs example runs, against a live server (tiny model) on loopback.

Fenced ```bash and ```python blocks are executed; a block right after `<!-- norun -->` is not (the set-up
commands, which are the test suite itself). Addresses 127.0.0.1:8000 / :50051 are pointed at the live ports.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LiveServer, test_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>bash|python)\n(?P<code>.*?)\n```", re.S)


def _blocks():
    for path in DOCS:
        text = path.read_text()
        for i, m in enumerate(FENCE.finditer(text)):
            if m.group("before").strip() == "<!-- norun -->":
                continue
            line = text[: m.start("code")].count("\n") + 1
            yield pytest.param(m.group("lang"), m.group("code"), id=f"{path.name}:{line}")


@pytest.fixture(scope="module")
def docs_server(tiny_bert_dir, tiny_llama_dir, tiny_policy_dir):
    # several models and an ensemble, named as docs/api.md's config shows them (tiny models in their place), and
    # a (tiny) policy, so that the Best-of-N examples run too
    config = test_config(
        tiny_bert_dir, generator=f"hf:{tiny_policy_dir}",
        models=[{"name": "harmless", "path": str(tiny_bert_dir)}, {"name": "mini", "path": str(tiny_llama_dir)}],
        ensembles=[{"name": "safe", "combine": "mean_minus_std", "penalty": 0.5,
                    "members": {"harmless": 1.0, "mini": 1.0}, "rules": [{"kind": "length", "weight": -0.001}]},
                   {"name": "routed", "members": {"mini": 1.0},
                    "gate": {"model": "harmless", "threshold": 0.0, "members": {"harmless": 1.0}, "reads": "prompt"}}],
    )
    with LiveServer(config) as server:
        yield server


@pytest.mark.parametrize("lang,code", list(_blocks()))
def test_example_runs(docs_server, lang, code):
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{docs_server.runtime.http_port}")
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{docs_server.runtime.grpc_port}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"


def test_readme_has_exactly_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = re.search(r"## Set up\n(.*?)\n## ", text, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in re.search(r"```bash\n(.*?)\n```", setup, re.S).group(1).splitlines()]
    assert [c for c in commands if c] == ["make serve", "make test"]
