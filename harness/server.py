"""Run the real service (`python -m server`) as a subprocess on a free port, as a user would.

A `ServerProcess` keeps its port, runtime and state directories (`STATE_DIR`, the SQLite session
store) and log file across `restart()`, so a test can stop it (SIGTERM, as systemd does, or
SIGKILL, as a crash does) and start it again as the same service. `serving_pid` tells which
process (which Sanic worker) holds a given client's TCP connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ServerProcess:
    """`with ServerProcess(VOSK_MODEL_PATH=...) as server:` starts, waits until ready, stops."""

    def __init__(self, wait_for_stt: bool = True, root: Path = ROOT, **env: Any) -> None:
        # `root`: the checkout whose `python -m server` runs (a benchmark may compare another one).
        self.root = root
        self.port = int(env.pop("PORT", 0)) or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="adb-test-"))
        self.log_path = self.workdir / "server.log"
        self.env = {
            **os.environ,
            "ENV_FILE": os.devnull,
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "RUNTIME_DIR": str(self.workdir / "run"),
            # Each server its own session store: tests never share state (pass STATE_DIR to restart on the same one).
            "STATE_DIR": str(self.workdir / "state"),
            "VOSK_MODEL_PATH": str(self.workdir / "no-model"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "STT_WORKERS": "1",
            # The mock provider answers at once unless a test asks for latency (None: the service's default).
            "MOCK_LLM_DELAY_MS": "0",
        }
        self.env.pop("OPENROUTER_API_KEY", None)
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env.pop("SESSION_STORE_URL", None)
        self.env.pop("STATE_DIRECTORY", None)
        self.env.update({key: str(value) for key, value in env.items() if value is not None})
        for unset in [key for key, value in env.items() if value is None]:
            self.env.pop(unset, None)
        self.wait_for_stt = wait_for_stt
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def state_dir(self) -> Path:
        return Path(self.env["STATE_DIR"])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/conversation"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        # A restart appends to the same log: what the service said before the stop stays readable.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server"],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: nothing of the service outlives `stop`
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            try:
                status, body = http_get(self.base_url + "/conversation/health", timeout=1.0)
            except OSError:
                time.sleep(0.1)
                continue
            stt_ready = not self.wait_for_stt or orjson.loads(body)["services"]["stt_service"] == "healthy"
            if status == 200 and stt_ready and self._workers_ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.logs()[-4000:]}")

    def _workers_ready(self) -> bool:
        """Every Sanic worker has logged that it is ready (the manager then stops cleanly on SIGTERM)."""
        return self.logs().count("Worker ready [") >= int(self.env.get("WORKERS", 1))

    def health(self) -> dict[str, Any]:
        status, body = http_get(self.base_url + "/conversation/health")
        assert status == 200, body
        result: dict[str, Any] = orjson.loads(body)
        return result

    def logs(self) -> str:
        """What the service logged since its last start."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[self._log_offset :].decode("utf-8", errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, as systemd stops the service; whatever is left of its process group is then killed."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def send_signal(self, signum: int) -> None:
        """Signal the service's main process only (SIGTERM: the stop systemd sends), without waiting."""
        assert self.process is not None and self.process.poll() is None, "the service is not running"
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the main process to exit; whatever is left of its process group is then killed."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> int:
        """SIGKILL to every process of the service at once, as a crash or `kill -9` of the unit would."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def restart(self, kill: bool = False, timeout: float = 60.0) -> ServerProcess:
        """Stop (SIGTERM, or SIGKILL with `kill=True`) and start again on the same port, state and log."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def processes(self) -> list[psutil.Process]:
        """The service's main process and all its descendants (Sanic workers, the Vosk pool); none once stopped."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            main = psutil.Process(self.process.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def serving_pid(self, client_port: int) -> int | None:
        """The pid of the process holding the server side of the TCP connection from `client_port`."""
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                for conn in process.net_connections(kind="tcp"):
                    if conn.laddr and conn.laddr.port == self.port and conn.raddr and conn.raddr.port == client_port:
                        return int(process.pid)
        return None

    def established_connections(self) -> int:
        """How many TCP connections to the service's port its processes hold (e.g. proxied by nginx)."""
        count = 0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                count += sum(
                    1
                    for conn in process.net_connections(kind="tcp")
                    if conn.laddr and conn.laddr.port == self.port and conn.status == psutil.CONN_ESTABLISHED
                )
        return count

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
