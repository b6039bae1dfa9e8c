"""What the chaos run checks once every client is gone: the Sanic workers, their memory, the
live gauges of /metrics, the pool's status table, the PCM buffers, the health and the log."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from harness.server import ServerProcess, http_get
from stt_pool.layout import buffer_dir
from stt_pool.status import PoolStatus

SETTLE_WAIT = 45.0


def sanic_workers(server: ServerProcess) -> dict[int, str]:
    """pid -> SANIC_WORKER_NAME of every Sanic server worker of the service."""
    assert server.process is not None
    found = {}
    for child in psutil.Process(server.process.pid).children():
        with contextlib.suppress(psutil.Error):
            name = child.environ().get("SANIC_WORKER_NAME", "")
            if name.startswith("Sanic-Server-"):
                found[child.pid] = name
    return found


def resident_memory(pids: list[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids if psutil.pid_exists(pid)}


def live_gauges(server: ServerProcess) -> dict[str, float]:
    """Connections, sessions and open recordings summed over every worker (GET /metrics)."""
    status, body = http_get(server.base_url + "/metrics")
    assert status == 200, body[:200]
    wanted = {"adb_websocket_connections", "adb_sessions", "adb_open_recordings"}
    return {
        family.name: sum(sample.value for sample in family.samples)
        for family in text_string_to_metric_families(body.decode())
        if family.name in wanted
    }


@dataclass
class Aftermath:
    """The service once every client is gone."""

    gauges: dict[str, float]
    streams: list[int]
    decoders_alive: int
    pcm_files: list[str]
    workers: dict[int, str]
    rss: dict[int, int]
    stt_health: str
    waited: float

    @property
    def quiet(self) -> bool:
        return not any(self.gauges.values()) and not any(self.streams) and not self.pcm_files


def pcm_files(runtime_dir: Path) -> list[str]:
    """The recordings' PCM buffers left in the runtime directory (which the pool has created)."""
    directory = buffer_dir(runtime_dir)
    assert directory.is_dir(), f"the pool's buffer directory {directory} exists"
    return sorted(path.name for path in directory.iterdir())


async def settle(server: ServerProcess, decoders: int) -> Aftermath:
    """Wait (at most SETTLE_WAIT) until nothing is left open, then take stock."""
    runtime_dir = Path(server.env["RUNTIME_DIR"])
    started = time.monotonic()
    while True:
        status = PoolStatus.attach(runtime_dir)
        assert status is not None
        workers = sanic_workers(server)
        after = Aftermath(
            gauges=live_gauges(server),
            streams=[int(slot.streams) for slot in status.slots],
            decoders_alive=len(status.live_slots()),
            pcm_files=pcm_files(runtime_dir),
            workers=workers,
            rss=resident_memory(list(workers)),
            stt_health=server.health()["services"]["stt_service"],
            waited=time.monotonic() - started,
        )
        healed = after.decoders_alive == decoders and after.stt_health == "healthy"
        if (after.quiet and healed) or after.waited > SETTLE_WAIT:
            return after
        await asyncio.sleep(0.25)


def log_problems(server: ServerProcess) -> list[str]:
    text = server.logs()
    return [
        f"server log: {count} x {marker!r}"
        for marker in ("Traceback", "internal error")
        if (count := text.count(marker))
    ]
