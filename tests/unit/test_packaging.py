"""pyproject.toml, the Makefile and CI agree with the tree: a package missing from the list installs as nothing."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("rewardserve", "rewardmodel", "service", "training", "clients", "protos")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def packages_on_disk() -> set[str]:
    found = set()
    for top in TOP_LEVEL:
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_listed_packages_are_exactly_those_on_disk():
    listed = pyproject()["tool"]["setuptools"]["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert {p.split(".")[0] for p in listed} == set(TOP_LEVEL)
    on_disk = packages_on_disk()
    missing = on_disk - set(listed)
    assert not missing, f"packages with an __init__.py but not in pyproject [tool.setuptools] packages: {sorted(missing)}"
    stale = set(listed) - on_disk
    assert not stale, f"pyproject lists packages that have no __init__.py on disk: {sorted(stale)}"


def test_console_script_resolves_to_a_callable():
    scripts = pyproject()["project"]["scripts"]
    assert "rewardserve" in scripts
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        assert attr, f"script {name} = {target!r} names no function"
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), f"script {name} -> {target} is not callable"


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-/$() ]+?)\s*::?(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def test_makefile_has_the_developer_targets():
    targets = makefile_targets()
    for target in ("setup", "serve", "test", "protos", "bench-serve", "clean", "distclean"):
        assert target in targets, f"Makefile has no {target!r} target"


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert ci.is_file()
    lines = [line.split("#", 1)[0] for line in ci.read_text().splitlines()]
    assert any(re.search(r"(^|[;&|]\s*|\s)make\s+(\S+\s+)*test(\s|$)", line) for line in lines), ".ci/run never calls `make test`"
    assert "set -euo pipefail" in ci.read_text()
