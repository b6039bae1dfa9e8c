"""Benchmark: control-plane round trip with many idle connections open.

`user_selected_response` -> `message_recorded` on one connection while 500 other connections sit
idle with a session each (target: p99 <= 10 ms), measured side by side with the same round trip
on an otherwise idle server. Run with `python -m bench.bench_control`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import AsyncExitStack

from bench.stats import percentile
from harness.client import ProtocolClient
from harness.server import ServerProcess

IDLE_CONNECTIONS = 500
ROUND_TRIPS = 400
TARGET_P99_MS = 10.0


async def round_trips(service: ServerProcess) -> list[float]:
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session()
        times = []
        for index in range(ROUND_TRIPS):
            started = time.perf_counter()
            await client.send(
                "user_selected_response", session_id=session_id, selected_content=f"好的 {index}", sender="我"
            )
            await client.expect("message_recorded")
            times.append((time.perf_counter() - started) * 1000)
        return times


def report(label: str, times: list[float]) -> None:
    print(
        f"  {label:<28} p50 {statistics.median(times):6.2f} ms   p99 {percentile(times, 0.99):6.2f} ms"
        f"   max {max(times):6.2f} ms"
    )


async def run() -> None:
    print(f"control-plane round trip (user_selected_response -> message_recorded), {ROUND_TRIPS} trips")
    with ServerProcess(MAX_SESSIONS_PER_CONNECTION=4, MAX_CONNECTIONS_PER_IP=IDLE_CONNECTIONS + 1) as service:
        quiet = await round_trips(service)
        async with AsyncExitStack() as stack:
            for _ in range(IDLE_CONNECTIONS):
                idle = await stack.enter_async_context(ProtocolClient(service.ws_url))
                await idle.start_session()
            crowded = await round_trips(service)
    report("idle server", quiet)
    report(f"{IDLE_CONNECTIONS} idle connections open", crowded)
    print(
        f"  p99 ratio crowded / idle: {percentile(crowded, 0.99) / percentile(quiet, 0.99):.2f}"
        f"   (target p99 <= {TARGET_P99_MS:g} ms)"
    )


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
