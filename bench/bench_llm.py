"""Benchmark: what the service adds to an LLM generation, and concurrent generations across sessions.

The real service (`python -m server`) runs with the OpenRouter client pointed at the local fake
provider, which answers instantly. Server overhead per generation is the end-to-end time of
`manual_generate` -> `llm_response` minus the fake provider's own handling time of that request
(target: p50 <= 5 ms); a direct client call to the same fake, measured in the same run, shows how
much of that is the HTTP round trip itself. Run with `python -m bench.bench_llm`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from contextlib import AsyncExitStack

from harness.client import ProtocolClient
from harness.fake_openrouter import FakeOpenRouter
from harness.server import ServerProcess
from llm.interface import ContextMessage, ConversationContext
from llm.openrouter import OpenRouterProvider

KEY = "sk-bench-not-a-real-key-0000"
RESPONSE_COUNT = 3
WARMUP = 20
SEQUENTIAL = 300
CONCURRENT_SESSIONS = 32
GENERATIONS_PER_SESSION = 15
OVERHEAD_TARGET_MS = 5.0
HISTORY = [
    {"message_id": "h1", "sender": "店员", "content": "您好，请问需要点什么？"},
    {"message_id": "h2", "sender": "我", "content": "我想要一杯热的拿铁。"},
    {"message_id": "h3", "sender": "店员", "content": "要大杯还是中杯？需要加糖吗？"},
]


def main() -> None:
    asyncio.run(_run())


async def _run() -> None:
    with (
        FakeOpenRouter() as fake,
        # Every generation asks the provider: no prepared replies, no rate limit in the way.
        ServerProcess(
            OPENROUTER_API_KEY=KEY,
            OPENROUTER_BASE_URL=fake.url,
            LLM_MAX_RETRIES=0,
            SPECULATIVE_REPLIES="false",
            LLM_SESSION_BURST=1000,
            LLM_SESSION_RATE_PER_MINUTE=6000,
        ) as service,
    ):
        provider = OpenRouterProvider(api_key=KEY, base_url=fake.url, model="bench/model", max_retries=0)
        await provider.start()
        try:
            await _overhead(service, fake, provider)
            await _throughput(service, fake, provider)
        finally:
            await provider.close()


async def _overhead(service: ServerProcess, fake: FakeOpenRouter, provider: OpenRouterProvider) -> None:
    context = ConversationContext(
        scenario_description="在咖啡店点单",
        messages=tuple(ContextMessage(**message) for message in HISTORY),
        response_count=RESPONSE_COUNT,
    )
    for _ in range(WARMUP):
        await provider.replies(context)
    fake.reset()
    direct = []
    for _ in range(SEQUENTIAL):
        started = time.perf_counter()
        await provider.replies(context)
        direct.append(time.perf_counter() - started)
    direct_provider = [request.handled_seconds for request in fake.requests]

    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(
            RESPONSE_COUNT, scenario_description="在咖啡店点单", history_messages=HISTORY
        )
        for _ in range(WARMUP):
            await _generate(client, session_id)
        fake.reset()
        end_to_end = [await _generate(client, session_id) for _ in range(SEQUENTIAL)]
    provider_time = [request.handled_seconds for request in fake.requests]
    overhead = [total - own for total, own in zip(end_to_end, provider_time, strict=True)]
    direct_overhead = [total - own for total, own in zip(direct, direct_provider, strict=True)]

    p50 = _ms(statistics.median(overhead))
    verdict = "OK" if p50 <= OVERHEAD_TARGET_MS else "ABOVE TARGET"
    print(f"LLM generation overhead: fake provider answering instantly, {SEQUENTIAL} sequential generations")
    _row("end-to-end manual_generate -> llm_response", end_to_end)
    _row("fake provider's own handling", provider_time)
    _row("server overhead (end-to-end - provider)", overhead)
    print(f"    target p50 <= {OVERHEAD_TARGET_MS:g} ms: {verdict}")
    _row("direct client call (no service)", direct)
    _row("direct client overhead (call - provider)", direct_overhead)
    service_only = statistics.median(end_to_end) - statistics.median(direct)
    ratio = statistics.median(end_to_end) / statistics.median(direct)
    print(f"  service on top of the client itself, medians: {_ms(service_only):.2f} ms (ratio {ratio:.2f}x)")


async def _throughput(service: ServerProcess, fake: FakeOpenRouter, provider: OpenRouterProvider) -> None:
    total = CONCURRENT_SESSIONS * GENERATIONS_PER_SESSION
    fake.reset()

    async def generations(client: ProtocolClient, session_id: str) -> list[float]:
        return [await _generate(client, session_id) for _ in range(GENERATIONS_PER_SESSION)]

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ProtocolClient(service.ws_url)) for _ in range(CONCURRENT_SESSIONS)]
        sessions = [await client.start_session(RESPONSE_COUNT, history_messages=HISTORY) for client in clients]
        started = time.perf_counter()
        per_session = await asyncio.gather(*map(generations, clients, sessions))
        service_seconds = time.perf_counter() - started
    latencies = [latency for session in per_session for latency in session]

    context = ConversationContext(messages=(ContextMessage(**HISTORY[0]),), response_count=RESPONSE_COUNT)

    async def direct_calls() -> None:
        for _ in range(GENERATIONS_PER_SESSION):
            await provider.replies(context)

    started = time.perf_counter()
    await asyncio.gather(*(direct_calls() for _ in range(CONCURRENT_SESSIONS)))
    direct_seconds = time.perf_counter() - started

    service_rate, direct_rate = total / service_seconds, total / direct_seconds
    print(
        f"Concurrent generations: {CONCURRENT_SESSIONS} sessions x {GENERATIONS_PER_SESSION}, "
        "one connection per session"
    )
    print(f"  through the service: {service_rate:8.0f} generations/s")
    _row("latency under load", latencies)
    print(f"  direct client:       {direct_rate:8.0f} generations/s")
    print(f"  ratio service/direct throughput: {service_rate / direct_rate:.2f}")


async def _generate(client: ProtocolClient, session_id: str) -> float:
    started = time.perf_counter()
    await client.send("manual_generate", session_id=session_id)
    await client.expect_status("generating_response", session_id)
    data = await client.expect("llm_response", session_id=session_id)
    elapsed = time.perf_counter() - started
    if len(data["suggestions"]) != RESPONSE_COUNT:
        raise RuntimeError(f"expected {RESPONSE_COUNT} suggestions, got {data['suggestions']}")
    return elapsed


def _row(label: str, seconds: list[float]) -> None:
    p95 = statistics.quantiles(seconds, n=20)[-1]
    print(f"  {label:<44} p50 {_ms(statistics.median(seconds)):7.2f} ms   p95 {_ms(p95):7.2f} ms")


def _ms(seconds: float) -> float:
    return seconds * 1000


if __name__ == "__main__":
    main()
