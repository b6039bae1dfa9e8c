"""Benchmark: what a durable session write costs before its confirming event may be sent.

Side by side for the in-memory baseline (a list append, what a worker does without a store),
SQLite (WAL; synchronous=NORMAL, and FULL = SESSION_STORE_FSYNC=true) and Redis (a real
`redis-server` with appendonly yes, appendfsync everysec and always): p50/p99 of `append_message` (the write before
`message_recorded`), of `deliver` (an explicit holder check before a send) and of the two in a
row; the p99 they add to the in-memory figure is what a control-plane round trip pays (target:
<= 2 ms). Also: the same write while another process writes 1000 times a second to the same
SQLite file (a second, very busy Sanic worker), and the event loop's lag while writes run (a 1 ms ticker's lateness),
which says whether the store's blocking calls stall the loop.

The backends take turns in rounds, so that load from elsewhere on a shared machine falls on all
of them alike. Run with `python -m bench.bench_store`.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from bench.stats import percentile
from harness.redis_server import RedisServer
from harness.server import ROOT
from server.store import SessionState, SessionStore
from server.store.redis_store import RedisSessionStore
from server.store.sqlite_store import SqliteSessionStore

ROUNDS = 5
PER_ROUND = 400
WARM_UP = 50
TARGET_ADDED_P99_MS = 2.0
TICK_SECONDS = 0.001
OPERATIONS = ("write", "deliver", "both")
MEMORY = "in-memory (list append)"
COMPETITOR_WRITES_PER_SECOND = 1000
CONTENDED = f"SQLite NORMAL, 2nd process {COMPETITOR_WRITES_PER_SECOND}/s"
EVENT = {"type": "message_recorded", "data": {"message_id": "usr_001", "content": "好的，谢谢", "sender": "我"}}

Operation = Callable[[int], Awaitable[object]]
Samples = dict[str, tuple[list[float], list[float]]]


async def timed_loop(operation: Operation, count: int) -> tuple[list[float], list[float]]:
    """Run `operation` `count` times: its latencies, and a 1 ms ticker's lateness meanwhile (ms)."""
    lateness: list[float] = []
    running = True

    async def tick() -> None:
        while running:
            started = time.perf_counter()
            await asyncio.sleep(TICK_SECONDS)
            lateness.append((time.perf_counter() - started - TICK_SECONDS) * 1000)

    ticker = asyncio.create_task(tick())
    times = []
    for index in range(count):
        started = time.perf_counter()
        await operation(index)
        times.append((time.perf_counter() - started) * 1000)
        # The loop gets a turn between events, as it does between client frames.
        await asyncio.sleep(0)
    running = False
    await ticker
    return times, lateness


def memory_operations() -> dict[str, Operation]:
    messages: list[tuple[str, str]] = []

    async def write(index: int) -> None:
        messages.append(("我", f"好的 {index}"))

    return dict.fromkeys(OPERATIONS, write)


@asynccontextmanager
async def store_operations(store: SessionStore) -> AsyncIterator[dict[str, Operation]]:
    await store.start()
    state = SessionState(str(uuid.uuid4()), 3)
    attachment = await store.create(state, "bench")

    async def write(index: int) -> None:
        await store.append_message(state.session_id, sender="我", content=f"好的 {index}", origin="selected")

    async def deliver(index: int) -> None:
        await store.deliver(attachment, EVENT)

    async def both(index: int) -> None:
        await write(index)
        await deliver(index)

    try:
        yield {"write": write, "deliver": deliver, "both": both}
        await store.delete(state.session_id)
    finally:
        await store.close()


@asynccontextmanager
async def competing_writer(state_dir: Path) -> AsyncIterator[None]:
    """Another process appending to its own session in the same SQLite file, far more often than a real worker."""
    store = SqliteSessionStore(state_dir, resume_window=3600.0)
    await store.start()
    session = SessionState(str(uuid.uuid4()), 3)
    await store.create(session, "competitor")
    await store.close()
    spec: dict[str, Any] = {"backend": "sqlite", "state_dir": str(state_dir), "session_id": session.session_id}
    spec |= {"count": 10_000_000, "writer": 1, "start_at": 0, "interval": 1 / COMPETITOR_WRITES_PER_SECOND}
    process = subprocess.Popen(  # noqa: ASYNC220 - started once per round, outside the timed loop
        [sys.executable, "-m", "harness.store_writer", orjson.dumps(spec).decode()],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(1.0)
        yield
    finally:
        process.kill()
        process.wait()


async def measure(base: Path, redis: RedisServer, durable_redis: RedisServer) -> dict[str, Samples]:
    async with AsyncExitStack() as stack:
        subjects = {
            MEMORY: memory_operations(),
            "SQLite WAL, synchronous=NORMAL": await stack.enter_async_context(
                store_operations(SqliteSessionStore(base / "normal", resume_window=3600.0))
            ),
            "SQLite WAL, FULL (SESSION_STORE_FSYNC)": await stack.enter_async_context(
                store_operations(SqliteSessionStore(base / "full", resume_window=3600.0, fsync=True))
            ),
            "Redis (appendonly yes, everysec)": await stack.enter_async_context(
                store_operations(RedisSessionStore(redis.url, resume_window=3600.0))
            ),
            "Redis (appendfsync always)": await stack.enter_async_context(
                store_operations(RedisSessionStore(durable_redis.url, resume_window=3600.0))
            ),
            CONTENDED: await stack.enter_async_context(
                store_operations(SqliteSessionStore(base / "contended", resume_window=3600.0))
            ),
        }
        samples: dict[str, Samples] = {label: {op: ([], []) for op in OPERATIONS} for label in subjects}
        for operations in subjects.values():
            await timed_loop(operations["both"], WARM_UP)
        for _ in range(ROUNDS):
            for label, operations in subjects.items():
                async with AsyncExitStack() as competition:
                    if label == CONTENDED:
                        await competition.enter_async_context(competing_writer(base / "contended"))
                    for op in OPERATIONS:
                        times, lag = await timed_loop(operations[op], PER_ROUND)
                        samples[label][op][0].extend(times)
                        samples[label][op][1].extend(lag)
        return samples


def cells(times: list[float]) -> str:
    return f"{statistics.median(times):6.3f} {percentile(times, 0.99):6.3f} {max(times):7.3f}"


def report(measured: dict[str, Samples]) -> None:
    memory_p99 = percentile(measured[MEMORY]["write"][0], 0.99)
    print(f"durable write before a confirming event: {ROUNDS * PER_ROUND} operations each, ms (p50 p99 max)")
    print(f"  {'backend':<40} {'append_message':<22} {'deliver':<22} {'append + deliver':<22} p99 added vs memory")
    for label, results in measured.items():
        write, check, both = (results[op][0] for op in OPERATIONS)
        if label == MEMORY:
            print(f"  {label:<40} {cells(write)}")
            continue
        added = f"{percentile(write, 0.99) - memory_p99:5.3f} / {percentile(both, 0.99) - memory_p99:5.3f}"
        print(f"  {label:<40} {cells(write)}  {cells(check)}  {cells(both)}  {added}")
    print(f"  target: a durable write adds at most {TARGET_ADDED_P99_MS:g} ms to the control-plane round trip's p99")
    print()
    print("event-loop lag while the writes run (a 1 ms ticker's lateness, ms): does the store stall the loop?")
    for label, results in measured.items():
        lag = results["write"][1]
        print(
            f"  {label:<40} p50 {statistics.median(lag):6.3f}   p99 {percentile(lag, 0.99):6.3f}   max {max(lag):7.3f}"
        )


async def run() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="adb-bench-store-") as temp,
        RedisServer() as redis,
        RedisServer(appendfsync="always") as durable_redis,
    ):
        report(await measure(Path(temp), redis, durable_redis))


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
