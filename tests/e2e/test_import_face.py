"""`rewardserve.clients` as a user gets it (issue #12.10): this project installed (not editable) into a fresh venv,
used by a script whose directory holds the user's own `clients.py`, `training/` and `protos/`.

The venv sees our dependencies through a .pth line naming this environment's site-packages (a plain path line:
the .pth files there, among them the editable install's finder, are not run), and the project is installed from
a copy of the working tree with `pip install --no-deps --no-build-isolation`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from clients import RewardClient

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "rewardserve", "rewardmodel", "service", "training", "clients", "protos")
USER_FILES = {
    "clients.py": "WHOSE = 'user'\n",
    "training/__init__.py": "WHOSE = 'user'\n",
    "protos/__init__.py": "WHOSE = 'user'\n",
}
SCRIPT = """
import importlib.util, json, sys
import clients, protos, training  # the user's own, imported first
from rewardserve.clients import GrpcRewardClient, InvalidInputError, RewardClient, make_trl_reward_func
import rewardserve.clients, rewardserve.clients.verl_reward

http_url, grpc_target = sys.argv[1], sys.argv[2]
with RewardClient(http_url) as http, GrpcRewardClient(grpc_target) as rpc:
    rewards = [http.score([("What is 2 + 2?", "4")])[0], rpc.score([("What is 2 + 2?", "4")])[0]]
trl = make_trl_reward_func(grpc_target, transport="grpc")(prompts=["What is 2 + 2?"], completions=["4"])

# verl's file form, from the installed package
path = rewardserve.clients.verl_reward.__file__
spec = importlib.util.spec_from_file_location("custom_module_1", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
verl = module.compute_score("x", "4", None, extra_info={"prompt": "What is 2 + 2?"}, url=http_url)

import clients, protos, training
print(json.dumps({
    "rewards": rewards + trl + [verl],
    "whose": [clients.WHOSE, protos.WHOSE, training.WHOSE],
    "face": rewardserve.clients.__file__, "verl_file": path,
    "protos_module": rewardserve.clients.grpc_client.reward_pb2.__name__,
}))
"""


def copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def fresh_venv(path: Path) -> Path:
    """A venv without pip that sees this environment's packages (after its own)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_rewardserve_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_import_face_in_a_fresh_venv_beside_a_users_modules(bert_server, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    source = copy_project(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
         "--no-index", "--disable-pip-version-check", "--quiet", str(source)],
        env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    user = tmp_path / "project"
    for name, text in USER_FILES.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    (user / "train.py").write_text(SCRIPT)
    run = subprocess.run([str(python), "train.py", bert_server.http_url, bert_server.grpc_target], cwd=user,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])

    installed = Path(out["face"]).resolve()
    assert tmp_path / "venv" in installed.parents and ROOT not in installed.parents  # the wheel, not this tree
    assert Path(out["verl_file"]).resolve().parent == installed.parent
    assert out["whose"] == ["user", "user", "user"]  # their names are still theirs
    assert out["protos_module"] == "rewardserve.protos.reward_pb2"
    with RewardClient(bert_server.http_url) as client:
        expected = client.score([("What is 2 + 2?", "4")])[0]
    assert all(abs(r - expected) < 1e-5 for r in out["rewards"]), out["rewards"]
