"""Server subprocesses for the benchmarks: free ports, start, wait until ready, stop.

Every process started here is stopped by its own PID (SIGTERM, then SIGKILL after a grace period): by the
caller's try/finally, and again by an atexit hook and SIGTERM/SIGHUP handlers as a backstop if the bench
crashes or is killed politely; on Linux each child also gets SIGTERM from the kernel if the bench dies
without any of that (PR_SET_PDEATHSIG, e.g. `kill -9` of the bench). Each server's stdout+stderr go to a log file whose tail is shown on failure.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

_STARTED: list["ServerProcess"] = []


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a preexec_fn making the child get SIGTERM when the bench dies, even by SIGKILL (libc is loaded
    here, before any fork, so the child only makes one C call between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


_PREEXEC = _parent_death_signal()


class ServerError(RuntimeError):
    """A server failed to start or to become ready; the message holds the tail of its log."""


def bench_env() -> dict[str, str]:
    """The environment every benchmarked process gets (same as `make serve`): idle OpenMP threads sleep."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_status(url: str, timeout: float) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class ServerProcess:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.env = env or {}  # on top of bench_env()
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env={**bench_env(), **self.env}, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,  # a terminal's Ctrl-C reaches only the bench
            preexec_fn=_PREEXEC,
        )
        _STARTED.append(self)
        return self

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"

    def wait_ready(self, url: str, timeout_s: float) -> float:
        """Poll `url` until it answers 200; seconds waited. Raises ServerError with the log tail."""
        assert self.proc is not None
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"{self.name} exited with code {code} before it was ready.\n"
                    f"command: {' '.join(self.argv)}\nlast lines of {self.log_path}:\n{self.tail()}"
                )
            if _http_status(url, timeout=2.0) == 200:
                return time.monotonic() - start
            time.sleep(0.25)
        raise ServerError(
            f"{self.name} was not ready after {timeout_s:.0f} s ({url}).\n"
            f"command: {' '.join(self.argv)}\nlast lines of {self.log_path}:\n{self.tail()}"
        )

    def stop(self, grace_s: float = 45.0) -> int | None:
        """SIGTERM, wait up to grace_s, then SIGKILL. Returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"[bench] {self.name} (pid {proc.pid}) ignored SIGTERM for {grace_s:.0f} s: SIGKILL",
                      file=sys.stderr)
                proc.kill()
                proc.wait(10)
            except ProcessLookupError:
                pass
        if self._log is not None and not self._log.closed:
            self._log.close()
        if self in _STARTED:
            _STARTED.remove(self)
        return proc.returncode


def stop_all(grace_s: float = 10.0) -> None:
    """Stop every process this module started that is still running (the backstop)."""
    for server in list(_STARTED):
        try:
            server.stop(grace_s)
        except Exception as exc:  # noqa: BLE001 - a cleanup hook must go on with the others
            print(f"[bench] could not stop {server.name} (pid {server.pid}): {exc}", file=sys.stderr)


def _on_signal(signum: int, _frame: object) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
