"""The Dockerfile agrees with the repository: no Docker engine runs in CI, so its promises are read, not built."""

from __future__ import annotations

import glob
import json
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; joins `\\` continuations and drops comment lines, as Docker does."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # inside a continuation too: Docker removes comment lines before joining
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def split_args(rest: str) -> list[str]:
    """Exec form (a JSON array) or shell form (shell words)."""
    if rest.startswith("["):
        return json.loads(rest)
    return shlex.split(rest)


def without_flags(words: list[str]) -> list[str]:
    return [w for w in words if not w.startswith("--")]


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), "Dockerfile missing at the repository root"
    return parse_dockerfile(DOCKERFILE.read_text())


def only(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in instructions if kw == keyword]


def test_parser_handles_continuations_and_comments():
    text = 'FROM x\nRUN a \\\n    # note\n    && b\nCMD ["--host", "0.0.0.0"]\n'
    assert parse_dockerfile(text) == [("FROM", "x"), ("RUN", "a && b"), ("CMD", '["--host", "0.0.0.0"]')]


def test_copy_and_add_sources_exist(instructions):
    checked = 0
    for rest in only(instructions, "COPY") + only(instructions, "ADD"):
        words = split_args(rest)
        if any(w.startswith("--from") for w in words):
            continue  # copies from another build stage, not from the repository
        sources = without_flags(words)[:-1]
        assert sources, f"COPY/ADD without a source: {rest!r}"
        for src in sources:
            assert "://" not in src, f"ADD from a URL is not reproducible: {src}"
            matches = glob.glob(str(ROOT / src))
            assert matches, f"Dockerfile copies {src!r}, which is not in the repository"
            checked += 1
    assert checked, "the Dockerfile copies nothing from the repository"


def test_copies_what_the_package_needs(instructions):
    copied = {
        src.rstrip("/")
        for rest in only(instructions, "COPY")
        for src in without_flags(split_args(rest))[:-1]
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {pkg.split(".")[0] for pkg in pyproject["tool"]["setuptools"]["packages"]}
    needed = top_level | {"pyproject.toml", pyproject["project"]["readme"], "models"}
    assert needed <= copied, f"the image misses {sorted(needed - copied)}"


def test_entrypoint_is_the_console_script_and_a_real_subcommand(instructions):
    (entrypoint,) = only(instructions, "ENTRYPOINT")
    words = split_args(entrypoint)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert words[0] in scripts, f"ENTRYPOINT runs {words[0]!r}; pyproject declares {sorted(scripts)}"

    from rewardserve.cli import build_parser

    parser = build_parser()
    subcommands: set[str] = set()
    for action in parser._actions:  # argparse keeps subparsers here; there is no public accessor
        if action.__class__.__name__ == "_SubParsersAction":
            subcommands |= set(action.choices)
    assert len(words) >= 2 and words[1] in subcommands, (
        f"ENTRYPOINT's subcommand {words[1:2]} is not one of {sorted(subcommands)}"
    )
    # and the default CMD parses as that subcommand's flags
    (cmd,) = only(instructions, "CMD")
    args = parser.parse_args(words[1:] + split_args(cmd))
    assert args.command == words[1]


def test_expose_includes_the_default_ports(instructions):
    from service.config import ServeConfig

    exposed: set[int] = set()
    for rest in only(instructions, "EXPOSE"):
        for word in rest.split():
            exposed.add(int(word.split("/")[0]))
    defaults = ServeConfig()
    assert {defaults.port, defaults.grpc_port} <= exposed, f"EXPOSE {sorted(exposed)}"


def test_healthcheck_hits_health(instructions):
    (healthcheck,) = only(instructions, "HEALTHCHECK")
    assert " CMD " in f" {healthcheck} ", "HEALTHCHECK has no CMD"
    assert "/health" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck, "slim images have neither curl nor wget"
    assert "urllib" in healthcheck


def test_runs_as_non_root(instructions):
    users = only(instructions, "USER")
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"


def test_default_is_cpu_and_cuda_is_a_build_arg(instructions):
    args = dict(rest.partition("=")[::2] for rest in only(instructions, "ARG"))
    assert args.get("VARIANT") == "cpu"
    assert "BASE" in args
    assert only(instructions, "FROM")[0].startswith("${BASE}")
