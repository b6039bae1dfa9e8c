"""The Sanic workers under the service manager: a dead worker is replaced (or the service exits
for systemd to restart it), and SIGHUP (`systemctl reload`) restarts the workers, new ones first."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import psutil
import pytest
import websockets

from harness.client import ProtocolClient
from harness.server import ServerProcess, http_get
from server.worker_manager import MAX_REPLACEMENTS
from tests.conftest import running_server


def worker_pids(server: ServerProcess, event: str = "Worker ready") -> list[int]:
    """Sanic worker pids in the order they logged `event` (each new worker logs it once)."""
    return [record["pid"] for record in server.log_records() if record["msg"].startswith(event)]


def wait_for(condition: object, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def health_answers(server: ServerProcess) -> bool:
    try:
        return http_get(server.base_url + "/conversation/health", timeout=2)[0] == 200
    except OSError:
        return False


async def test_a_killed_worker_is_replaced_and_its_clients_can_reconnect() -> None:
    with running_server() as server:
        async with ProtocolClient(server.ws_url) as client:
            await client.start_session()
            (victim,) = worker_pids(server)
            os.kill(victim, signal.SIGKILL)  # what the OOM killer or a SIGBUS does
            with pytest.raises(websockets.ConnectionClosed):
                await client.recv()
        wait_for(lambda: len(worker_pids(server)) == 2, "a new worker started")
        replacement = worker_pids(server)[-1]
        assert replacement != victim
        wait_for(lambda: health_answers(server), "health answers again")
        assert server.process is not None and server.process.poll() is None, "the main process stayed up"
        assert "died (exit code -9); starting a new one" in server.logs()
        async with ProtocolClient(server.ws_url) as client:
            await client.start_session()


def test_a_worker_that_keeps_dying_stops_the_service_with_exit_code_1() -> None:
    with running_server() as server:
        killed: set[int] = set()
        for _ in range(MAX_REPLACEMENTS + 1):
            wait_for(lambda: set(worker_pids(server, "Starting worker")) - killed, "a worker is starting")
            (pid,) = set(worker_pids(server, "Starting worker")) - killed
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
        assert server.process is not None
        assert server.process.wait(60) == 1
        assert "kept dying" in server.logs()


async def test_sighup_restarts_every_worker_new_first_while_health_keeps_answering() -> None:
    with running_server(WORKERS=2) as server:
        old = set(worker_pids(server))
        assert len(old) == 2
        answers: list[bool] = []
        polling = threading.Event()

        def poll() -> None:
            while not polling.is_set():
                answers.append(health_answers(server))
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            async with ProtocolClient(server.ws_url) as client:
                await client.start_session()
                assert server.process is not None
                server.process.send_signal(signal.SIGHUP)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await client.recv(timeout=60)  # the old worker closes its connections when it stops
                # A clean close that tells the app to reconnect and resume: 1012 (service restart).
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
            await asyncio.to_thread(wait_for, lambda: len(set(worker_pids(server)) - old) == 2, "two new workers")
            await asyncio.to_thread(wait_for, lambda: not any(psutil.pid_exists(pid) for pid in old), "old reaped")
        finally:
            polling.set()
            poller.join()
        assert answers and all(answers), f"{answers.count(False)} of {len(answers)} health checks failed"
        assert server.process.poll() is None
        async with ProtocolClient(server.ws_url) as client:
            await client.start_session()
