"""The committed generated modules match what scripts/gen_protos.sh makes from protos/reward.proto now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("reward_pb2.py", "reward_pb2_grpc.py", "reward_pb2.pyi")


def test_generated_protos_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the [dev] extra) regenerates the protos")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    stale = [
        name for name in GENERATED
        if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, f"protos/{stale} are stale: run scripts/gen_protos.sh and commit the result"


def test_generated_modules_import_through_the_package():
    from protos import reward_pb2, reward_pb2_grpc

    assert reward_pb2.DESCRIPTOR.package == "rewardserve.v1"
    assert reward_pb2_grpc.protos_dot_reward__pb2 is reward_pb2
