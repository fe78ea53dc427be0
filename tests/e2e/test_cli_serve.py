"""`rewardserve serve` as a real process: flags/env/config file, scoring, SIGTERM -> drain -> exit 0."""

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.helpers import free_port, wait_ready


@pytest.fixture
def serve_proc(tiny_bert_dir, tmp_path):
    procs = []

    def start(*args, env_extra=None):
        env = {**os.environ, **(env_extra or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "rewardserve.cli", "serve", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_process_scores_and_drains_on_sigterm(serve_proc, tiny_bert_dir, tmp_path):
    port, grpc_port = free_port(), free_port()
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(f"model: {tiny_bert_dir}\nmodel_name: from-file\nport: {port}\n")
    proc = serve_proc(
        "--config", str(config_file), "--grpc-port", str(grpc_port), "--max-batch-size", "8",
        env_extra={"REWARDSERVE_MODEL_NAME": "from-env", "REWARDSERVE_LOG_LEVEL": "warning"},
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "from-env"  # env beats the file
    r = httpx.post(url + "/v1/score", json={"inputs": [{"prompt": "hi", "response": "hello"}]})
    assert r.status_code == 200 and isinstance(r.json()["scores"][0]["reward"], float)
    with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
        pass  # gRPC listens on its own port
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_bad_model_dir_fails_fast_with_a_clear_message(serve_proc, tmp_path):
    proc = serve_proc("--model", str(tmp_path / "missing"), "--port", str(free_port()), "--grpc-port", "-1")
    assert proc.wait(timeout=120) != 0
    assert "does not exist" in proc.stderr.read()


def test_serve_help_documents_every_field():
    from service.config import ServeConfig

    out = subprocess.run([sys.executable, "-m", "rewardserve.cli", "serve", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    from service.config import CONFIG_FILE_ONLY

    for name in ServeConfig.model_fields:
        if name in CONFIG_FILE_ONLY:  # lists of objects: documented under --config
            assert f"`{name}`:" in " ".join(out.stdout.split())
            continue
        assert "--" + name.replace("_", "-") in out.stdout
        assert "REWARDSERVE_" + name.upper() in out.stdout.replace("\n", "").replace(" ", "")


def test_unknown_backend_is_a_clear_error(serve_proc, tiny_bert_dir):
    proc = serve_proc("--model", str(tiny_bert_dir), "--backend", "nope", "--port", str(free_port()),
                      "--grpc-port", "-1")
    assert proc.wait(timeout=120) == 2
    assert "unknown backend 'nope'" in proc.stderr.read()


@pytest.mark.parametrize("ensemble,needle", [
    ("{name: bad, members: {nope: 1.0}}", "names a member that is not served: 'nope'"),
    ("{name: bad, members: {one: .nan}}", "not finite"),
    ("{name: bad, members: {one: 1.0}, gate: {model: nope, members: {one: 1.0}}}", "gate names a model that is not served"),
    ("{name: bad, members: {one: 1.0}, rules: [{kind: regex, pattern: '(a+)+$', weight: 1}]}", "pattern"),
])
def test_a_bad_ensemble_config_refuses_to_start_with_one_line(tmp_path, tiny_bert_dir, ensemble, needle):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(f"models: [{{name: one, path: {tiny_bert_dir}}}]\nensembles: [{ensemble}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rewardserve.cli", "serve", "--config", str(config_file), "--port", str(free_port()),
         "--grpc-port", "-1"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rewardserve serve: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_repeated_model_flags_serve_several_models(serve_proc, tiny_bert_dir, tiny_llama_dir):
    port = free_port()
    proc = serve_proc("--model", f"bert={tiny_bert_dir}", "--model", f"llama={tiny_llama_dir}", "--port", str(port),
                      "--grpc-port", "-1", "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["bert", "llama"]
    for name in ("bert", "llama"):
        r = httpx.post(url + "/v1/score", json={"model": name, "inputs": [{"prompt": "hi", "response": "hello"}]})
        assert r.status_code == 200 and r.json()["model"] == name
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
