"""Benchmark: control-plane round trip on each session store, with many idle connections open.

`user_selected_response` -> `message_recorded` on one connection (the reply is durable in the
session store before `message_recorded` is sent), on an otherwise idle server and while 500 other
connections sit idle with a session each (target: p99 <= 10 ms). Side by side: the SQLite store
(STATE_DIR, the default) and Redis (a real `redis-server`, appendonly yes, appendfsync everysec).
The services take turns in rounds, so load from elsewhere on a shared machine falls on all alike.

Sessions no longer live in a worker's memory, so there is no in-memory mode to run here. The
durable write's cost (target: it adds at most 2 ms to the p99) is the p99 above an in-memory
service's: pass `--baseline DIR`, a checkout of the service from before the store (e.g. a git
worktree of that commit, sharing this venv), to measure one in the same rounds; without it the
figure recorded on the development machine before the store was wired is the reference.

Run with `python -m bench.bench_control [--baseline DIR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

from bench.stats import percentile
from harness.client import ProtocolClient
from harness.redis_server import RedisServer
from harness.server import ServerProcess

IDLE_CONNECTIONS = 500
ROUNDS = 10
PER_ROUND = 100
WARM_UP = 20
TARGET_P99_MS = 10.0
TARGET_ADDED_P99_MS = 2.0
# bench_control on main before the session store was wired (sessions in the worker's memory),
# idle server, on the 2-core development machine; used when no --baseline checkout is given.
RECORDED_IN_MEMORY_P99_MS = 0.45
SERVER_ENV: dict[str, Any] = {"MAX_SESSIONS_PER_CONNECTION": 4, "MAX_CONNECTIONS_PER_IP": IDLE_CONNECTIONS + 1}


class Subject:
    """One service under test, its connection for the round trips, and its figures."""

    def __init__(self, label: str, service: ServerProcess) -> None:
        self.label = label
        self.service = service
        self.client = ProtocolClient(service.ws_url)
        self.session_id = ""
        self.trips = 0
        self.times: dict[str, list[float]] = {"idle": [], "crowded": []}

    async def open(self, stack: AsyncExitStack) -> None:
        await stack.enter_async_context(self.client)
        await self.round_trips(WARM_UP)

    async def round_trips(self, count: int) -> list[float]:
        """`count` trips in a new session (ended after): every round's history is as short as a real one."""
        self.session_id = await self.client.start_session()
        times = []
        for _ in range(count):
            self.trips += 1
            started = time.perf_counter()
            await self.client.send(
                "user_selected_response", session_id=self.session_id, selected_content=f"好的 {self.trips}", sender="我"
            )
            await self.client.expect("message_recorded")
            times.append((time.perf_counter() - started) * 1000)
        await self.client.end_session(self.session_id)
        return times


async def take_turns(subjects: list[Subject], phase: str) -> None:
    for _ in range(ROUNDS):
        for subject in subjects:
            subject.times[phase] += await subject.round_trips(PER_ROUND)


async def crowd(subject: Subject, stack: AsyncExitStack) -> None:
    for _ in range(IDLE_CONNECTIONS):
        idle = await stack.enter_async_context(ProtocolClient(subject.service.ws_url))
        await idle.start_session()


def row(label: str, times: list[float]) -> str:
    return (
        f"  {label:<40} p50 {statistics.median(times):6.2f} ms   p99 {percentile(times, 0.99):6.2f} ms"
        f"   max {max(times):7.2f} ms"
    )


def report(subjects: list[Subject], baseline: Subject | None) -> None:
    for phase, title in (("idle", "idle server"), ("crowded", f"{IDLE_CONNECTIONS} idle connections open")):
        print(f" {title}:")
        for subject in subjects:
            print(row(subject.label, subject.times[phase]))
    reference = percentile(baseline.times["idle"], 0.99) if baseline else RECORDED_IN_MEMORY_P99_MS
    source = "measured above" if baseline else "recorded before the store was wired"
    print(f" added by the durable write (idle server), over the in-memory p99 {reference:.2f} ms ({source}):")
    for subject in subjects:
        if subject is baseline:
            continue
        added = percentile(subject.times["idle"], 0.99) - reference
        line = f"  {subject.label:<40} p99 {added:+6.2f} ms"
        if baseline is not None:
            median_added = statistics.median(subject.times["idle"]) - statistics.median(baseline.times["idle"])
            line += f"   p50 {median_added:+6.2f} ms"
        print(f"{line}   (target: p99 <= +{TARGET_ADDED_P99_MS:g} ms)")
    print(f" p99 crowded / idle (target: p99 <= {TARGET_P99_MS:g} ms with {IDLE_CONNECTIONS} idle connections):")
    for subject in subjects:
        ratio = percentile(subject.times["crowded"], 0.99) / percentile(subject.times["idle"], 0.99)
        print(f"  {subject.label:<40} {ratio:.2f}")


async def run(baseline_root: Path | None) -> None:
    print(
        "control-plane round trip (user_selected_response -> message_recorded), "
        f"{ROUNDS} rounds x {PER_ROUND} trips per service, taking turns"
    )
    with ExitStack() as processes:
        redis = processes.enter_context(RedisServer())
        subjects = []
        baseline = None
        if baseline_root is not None:
            service = processes.enter_context(ServerProcess(root=baseline_root, **SERVER_ENV))
            baseline = Subject(f"in-memory ({baseline_root})", service)
            subjects.append(baseline)
        sqlite = processes.enter_context(ServerProcess(**SERVER_ENV))
        subjects.append(Subject("SQLite store (STATE_DIR, WAL)", sqlite))
        shared = processes.enter_context(ServerProcess(SESSION_STORE_URL=redis.url, **SERVER_ENV))
        subjects.append(Subject("Redis store (appendfsync everysec)", shared))
        async with AsyncExitStack() as connections:
            for subject in subjects:
                await subject.open(connections)
            await take_turns(subjects, "idle")
            for subject in subjects:
                await crowd(subject, connections)
            await take_turns(subjects, "crowded")
    report(subjects, baseline)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_control", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of the in-memory service to measure alongside")
    baseline = parser.parse_args(argv).baseline
    asyncio.run(run(baseline.resolve() if baseline else None))


if __name__ == "__main__":
    main()
