"""Benchmark: what a durable session write costs before its confirming event may be sent.

Side by side for the in-memory baseline (a list append, what a worker does without a store),
SQLite (WAL; synchronous=NORMAL, and FULL = SESSION_STORE_FSYNC=true) and Redis (a real
`redis-server` with appendonly yes): p50/p99 of `append_message` (the write before
`message_recorded`), of `deliver` (the holder check before each send), and of the two together,
which is what the store adds to a control-plane round trip (target: p99 + <= 2 ms). Also: the
same write while another process writes to the same SQLite file (two Sanic workers), and the
event loop's lag while writes run (a 1 ms ticker's lateness), which says whether the store's
blocking calls stall the loop. Run with `python -m bench.bench_store`.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from bench.stats import percentile
from server.store import Attachment, SessionState, SessionStore
from server.store.redis_store import RedisSessionStore
from server.store.sqlite_store import SqliteSessionStore
from tests.support.redis_server import RedisServer
from tests.support.server import ROOT

WRITES = 2000
WARM_UP = 100
TARGET_ADDED_P99_MS = 2.0
TICK_SECONDS = 0.001
EVENT = {"type": "message_recorded", "data": {"message_id": "usr_001", "content": "好的，谢谢", "sender": "我"}}


class MemoryBaseline:
    """The in-memory figure to compare against: the session is a list in this process."""

    def __init__(self) -> None:
        self.messages: dict[str, list[tuple[str, str]]] = {}

    async def append(self, session_id: str, content: str) -> None:
        self.messages.setdefault(session_id, []).append(("我", content))


async def timed_loop(operation: Callable[[int], Awaitable[object]]) -> tuple[list[float], list[float]]:
    """Run `operation` WRITES times (after a warm-up): its latencies, and a ticker's lateness meanwhile (ms)."""
    for index in range(WARM_UP):
        await operation(index)
    lateness: list[float] = []
    running = True

    async def tick() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(TICK_SECONDS)
            lateness.append((time.perf_counter() - started - TICK_SECONDS) * 1000)

    ticker = asyncio.create_task(tick())
    times = []
    for index in range(WRITES):
        started = time.perf_counter()
        await operation(index)
        times.append((time.perf_counter() - started) * 1000)
        # The loop gets a turn between events, as it does between client frames.
        await asyncio.sleep(0)
    running = False
    await ticker
    return times, lateness


async def measure_store(store: SessionStore) -> dict[str, tuple[list[float], list[float]]]:
    await store.start()
    try:
        state = SessionState(str(uuid.uuid4()), 3)
        attachment: Attachment = await store.create(state, "bench")

        async def write(index: int) -> None:
            await store.append_message(state.session_id, sender="我", content=f"好的 {index}", origin="selected")

        async def check(index: int) -> None:
            await store.deliver(attachment, EVENT)

        async def both(index: int) -> None:
            await write(index)
            await check(index)

        results = {"write": await timed_loop(write), "deliver": await timed_loop(check), "both": await timed_loop(both)}
        await store.delete(state.session_id)
        return results
    finally:
        await store.close()


async def measure_memory() -> dict[str, tuple[list[float], list[float]]]:
    memory = MemoryBaseline()

    async def write(index: int) -> None:
        await memory.append("session", f"好的 {index}")

    measured = await timed_loop(write)
    return {"write": measured, "deliver": measured, "both": measured}


def start_competing_writer(state_dir: Path, session_id: str) -> subprocess.Popen[bytes]:
    spec = {
        "backend": "sqlite",
        "state_dir": str(state_dir),
        "session_id": session_id,
        "count": 10_000_000,
        "writer": 1,
        "start_at": 0,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.store_writer", orjson.dumps(spec).decode()],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


async def measure_contended_sqlite(state_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Our writes while another process appends to its own session in the same file as fast as it can."""
    other = SqliteSessionStore(state_dir, resume_window=3600.0)
    await other.start()
    competitor_session = SessionState(str(uuid.uuid4()), 3)
    await other.create(competitor_session, "competitor")
    await other.close()
    competitor = start_competing_writer(state_dir, competitor_session.session_id)
    try:
        await asyncio.sleep(1.0)
        return await measure_store(SqliteSessionStore(state_dir, resume_window=3600.0))
    finally:
        competitor.kill()
        competitor.wait()


def row(label: str, times: list[float], lag: list[float], baseline_p99: float) -> str:
    p99 = percentile(times, 0.99)
    return (
        f"  {label:<40} p50 {statistics.median(times):6.3f} ms   p99 {p99:6.3f} ms   max {max(times):7.3f} ms"
        f"   p99 added {p99 - baseline_p99:6.3f} ms   loop lag p99 {percentile(lag, 0.99):6.3f} ms"
    )


async def run() -> None:
    with tempfile.TemporaryDirectory(prefix="adb-bench-store-") as temp, RedisServer() as redis:
        base = Path(temp)
        measured = {
            "in-memory (list append)": await measure_memory(),
            "SQLite WAL, synchronous=NORMAL": await measure_store(
                SqliteSessionStore(base / "normal", resume_window=3600.0)
            ),
            "SQLite WAL, FULL (SESSION_STORE_FSYNC)": await measure_store(
                SqliteSessionStore(base / "full", resume_window=3600.0, fsync=True)
            ),
            "Redis (appendonly yes, everysec)": await measure_store(RedisSessionStore(redis.url, resume_window=3600.0)),
            "SQLite NORMAL, 2nd process writing": await measure_contended_sqlite(base / "contended"),
        }
    titles = {
        "write": "append_message: the write before message_recorded",
        "deliver": "deliver: the holder check before each send",
        "both": "write + check: what the store adds to one control-plane round trip",
    }
    for op, title in titles.items():
        print(f"{title} ({WRITES} operations, one session)")
        baseline = percentile(measured["in-memory (list append)"][op][0], 0.99)
        for label, results in measured.items():
            if op != "write" and label.startswith("in-memory"):
                continue
            print(row(label, *results[op], baseline))
        print()
    print(f"target: a durable write adds at most {TARGET_ADDED_P99_MS:g} ms to the round trip's p99")


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
