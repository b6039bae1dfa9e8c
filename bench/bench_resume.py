"""Benchmark: how long a reconnecting app waits for `session_restored`, for each session store.

Against the real service (mock engines, one worker): a session with MESSAGES selected replies is
dropped, a new connection sends `session_resume`, and the time to `session_restored` is measured
(attach, load and the first drain of the outbox are in it), with and without a recording cut by
the drop waiting in the outbox (then up to its `message_recorded`). SQLite and Redis take turns in
rounds, so load from elsewhere on a shared machine falls on both alike. Medians and p95 side by
side, not pass/fail. Run with `python -m bench.bench_resume`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import ExitStack

from bench.stats import percentile
from harness.client import ProtocolClient
from harness.redis_server import RedisServer
from harness.server import ServerProcess

ROUNDS = 5
PER_ROUND = 20
MESSAGES = 20
SPEECH = b"\x00\x10" * 16000  # one second of a constant, non-silent signal


async def one_resume(url: str, cut_recording: bool) -> float:
    async with ProtocolClient(url) as first:
        session_id = await first.create_session()
        for number in range(MESSAGES):
            await first.select(session_id, f"第 {number} 条回复")
        if cut_recording:
            await first.open_recording(session_id)
            await first.send_audio(session_id, SPEECH)
            # Frames are handled in order: once this is answered, the audio was received.
            await first.send("message_end", session_id="barrier")
            await first.expect("error")
    async with ProtocolClient(url) as second:
        started = time.perf_counter()
        await second.send("session_resume", session_id=session_id)
        await second.expect("session_restored")
        if cut_recording:
            await second.expect("message_recorded")
        elapsed = time.perf_counter() - started
        await second.end_session(session_id)
    return elapsed * 1000


async def measure(servers: dict[str, ServerProcess]) -> dict[tuple[str, bool], list[float]]:
    samples: dict[tuple[str, bool], list[float]] = {}
    for _ in range(ROUNDS):
        for name, server in servers.items():
            for cut in (False, True):
                for _ in range(PER_ROUND):
                    samples.setdefault((name, cut), []).append(await one_resume(server.ws_url, cut))
    return samples


def main() -> None:
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        servers = {
            "SQLite": stack.enter_context(ServerProcess()),
            "Redis (appendfsync everysec)": stack.enter_context(ServerProcess(SESSION_STORE_URL=redis.url)),
        }
        samples = asyncio.run(measure(servers))
    print(f"session_resume -> session_restored, {MESSAGES} messages in the session, ms ({ROUNDS * PER_ROUND} each)")
    print(f"{'store':<30} {'outbox':<28} {'median':>8} {'p95':>8}")
    for (name, cut), values in samples.items():
        outbox = "recording cut by the drop" if cut else "empty"
        print(f"{name:<30} {outbox:<28} {statistics.median(values):8.2f} {percentile(values, 0.95):8.2f}")


if __name__ == "__main__":
    main()
