"""Benchmark: replies sooner with speculative and streamed suggestions, side by side in one run.

The real service runs against the local fake provider answering like a real model: FIRST_TOKEN
seconds to the first token, then TOKENS_PER_SECOND (streamed when asked, else the whole answer
after the same time), replies of about REPLY_CHARS characters. The current app's flow is played
by SESSIONS concurrent sessions, MESSAGES times each: record a message, read the offered keywords
for THINK_SECONDS, tap one (`manual_generate` with it as the opinion). Measured with speculation
off and on (and on with an immediate tap), and for a client that opted in to streamed suggestions
against one that did not (a typed opinion, which nothing can prepare). Run with
`python -m bench.bench_speculation`.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from bench.stats import percentile
from harness.client import ProtocolClient
from harness.fake_openrouter import CHARS_PER_TOKEN, FakeOpenRouter, Reply
from harness.server import ServerProcess

KEY = "sk-bench-not-a-real-key-0000"
FIRST_TOKEN = 0.6
TOKENS_PER_SECOND = 40.0
REPLY_CHARS = 18
SESSIONS = 6
MESSAGES = 2
THINK_SECONDS = 3.0
STREAM_SAMPLES = 12
RESPONSE_COUNT = 3
PICK_TARGET_MS = 50.0
SEED = 12
PACE = Reply(
    first_token=FIRST_TOKEN, tokens_per_second=TOKENS_PER_SECOND, count_usage=True, suggestion_chars=REPLY_CHARS
)


def speech(seconds: float, sample_rate: int = 16000) -> bytes:
    """A loud 440 Hz tone as PCM s16le: the mock transcriber records it as speech."""
    count = round(seconds * sample_rate)
    return array("h", (round(3000 * math.sin(2 * math.pi * 440 * n / sample_rate)) for n in range(count))).tobytes()


@dataclass
class Run:
    label: str
    to_keywords: list[float] = field(default_factory=list)
    to_replies: list[float] = field(default_factory=list)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    messages: int = 0


def main() -> None:
    asyncio.run(_run())


async def _run() -> None:
    env: dict[str, Any] = {
        "OPENROUTER_API_KEY": KEY,
        "LLM_MAX_RETRIES": 0,
        "LLM_SESSION_BURST": 1000,
        "LLM_SESSION_RATE_PER_MINUTE": 6000,
    }
    with FakeOpenRouter() as fake:
        with ServerProcess(OPENROUTER_BASE_URL=fake.url, SPECULATIVE_REPLIES="false", **env) as off_server:
            off = await _flow(off_server, fake, "speculation off", THINK_SECONDS)
            streaming = await _streaming(off_server, fake)
        with ServerProcess(OPENROUTER_BASE_URL=fake.url, SPECULATIVE_REPLIES="true", **env) as on_server:
            on = await _flow(on_server, fake, "speculation on", THINK_SECONDS)
            on_at_once = await _flow(on_server, fake, "speculation on, tap at once", 0.0)
    _report(off, on, on_at_once, streaming)


async def _flow(service: ServerProcess, fake: FakeOpenRouter, label: str, think: float) -> Run:
    run = Run(label)
    fake.reset()
    fake.set_default(PACE)
    picker = random.Random(SEED)

    async def one_session() -> None:
        async with ProtocolClient(service.ws_url) as client:
            await client.send(
                "conversation_start", response_count=RESPONSE_COUNT, scenario_description="在社区医院复诊"
            )
            session_id = (await client.expect("session_created"))["session_id"]
            await client.expect("opinion_suggestions", timeout=60)  # the scenario's own keywords
            for _ in range(MESSAGES):
                keywords = await _record(client, session_id, run)
                await asyncio.sleep(think)
                started = time.perf_counter()
                choice = picker.choice(keywords)
                await client.send("manual_generate", session_id=session_id, focused_message_ids=[], user_opinion=choice)
                await client.expect_status("generating_response", session_id)
                await client.expect("llm_response", timeout=60, session_id=session_id)
                run.to_replies.append(time.perf_counter() - started)
                run.messages += 1
            # Let the last speculation finish: its tokens are part of what a message costs.
            await _settled(fake)

    await asyncio.gather(*(one_session() for _ in range(SESSIONS)))
    # The scenario's keywords at conversation_start are not a recorded message's cost.
    per_message = [request for request in fake.requests if "[msg_" in request.prompt]
    run.calls = len(per_message)
    run.prompt_tokens = sum((request.usage or {}).get("prompt_tokens", 0) for request in per_message)
    run.completion_tokens = sum((request.usage or {}).get("completion_tokens", 0) for request in per_message)
    return run


async def _record(client: ProtocolClient, session_id: str, run: Run) -> list[str]:
    await client.send("message_start", session_id=session_id, sender="医生")
    await client.expect_status("recording_message", session_id)
    await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(speech(0.5)).decode())
    started = time.perf_counter()
    await client.send("message_end", session_id=session_id)
    await client.expect_status("processing_stt", session_id)
    await client.expect("message_recorded", session_id=session_id, timeout=60)
    await client.expect_status("generating_opinions", session_id)
    keywords: list[str] = (await client.expect("opinion_suggestions", timeout=60))["suggestions"]
    run.to_keywords.append(time.perf_counter() - started)
    return keywords


async def _settled(fake: FakeOpenRouter) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(request.handled_seconds > 0 or request.disconnected for request in fake.requests):
            return
        await asyncio.sleep(0.05)


async def _streaming(service: ServerProcess, fake: FakeOpenRouter) -> tuple[list[float], list[float], list[float]]:
    """A typed opinion (never prepared): the whole answer against the first streamed reply."""
    fake.reset()
    fake.set_default(PACE)
    unstreamed: list[float] = []
    first: list[float] = []
    full: list[float] = []
    for streams in (False, True):
        async with ProtocolClient(service.ws_url) as client:
            await client.send(
                "conversation_start",
                response_count=RESPONSE_COUNT,
                scenario_description="在社区医院复诊",
                options={"stream_suggestions": streams},
            )
            session_id = (await client.expect("session_created"))["session_id"]
            await _drain_until(client, "opinion_suggestions")
            for sample in range(STREAM_SAMPLES):
                started = time.perf_counter()
                await client.send("manual_generate", session_id=session_id, user_opinion=f"我自己的想法{sample}")
                event = await _drain_until(client, "suggestion_partial" if streams else "llm_response")
                if streams:
                    first.append(time.perf_counter() - started)
                    await _drain_until(client, "llm_response")
                    full.append(time.perf_counter() - started)
                else:
                    unstreamed.append(time.perf_counter() - started)
                if event["type"] == "error":
                    raise RuntimeError(f"generation failed: {event}")
    return unstreamed, first, full


async def _drain_until(client: ProtocolClient, event_type: str) -> dict[str, Any]:
    while True:
        event = await client.recv(60)
        if event["type"] in (event_type, "error"):
            return event


def _report(off: Run, on: Run, at_once: Run, streaming: tuple[list[float], list[float], list[float]]) -> None:
    unstreamed, streamed_first, streamed_full = streaming
    print(
        f"Speculative and streamed suggestions: fake provider {FIRST_TOKEN * 1000:.0f} ms to first token, "
        f"{TOKENS_PER_SECOND:g} tokens/s ({CHARS_PER_TOKEN} characters a token), replies of ~{REPLY_CHARS} characters"
    )
    print(
        f"  current app's flow: {SESSIONS} sessions x {MESSAGES} messages, keyword tapped after "
        f"{THINK_SECONDS:g} s (or at once)"
    )
    header = f"  {'figure':<52}{'off':>16}{'on':>16}{'on, tap at once':>20}{'on/off p50':>12}"
    print(header)
    _compare("message_end -> opinion_suggestions", off.to_keywords, on.to_keywords, at_once.to_keywords)
    _compare("manual_generate(keyword) -> llm_response", off.to_replies, on.to_replies, at_once.to_replies)
    for name, values in (
        ("provider calls per recorded message", [run.calls / run.messages for run in (off, on, at_once)]),
        ("prompt tokens per recorded message", [run.prompt_tokens / run.messages for run in (off, on, at_once)]),
        (
            "completion tokens per recorded message",
            [run.completion_tokens / run.messages for run in (off, on, at_once)],
        ),
    ):
        print(f"  {name:<52}{values[0]:>16.1f}{values[1]:>16.1f}{values[2]:>20.1f}{values[1] / values[0]:>11.2f}x")
    pick = statistics_ms(on.to_replies)
    verdict = "met" if pick < PICK_TARGET_MS else "NOT met"
    print(f"    target: keyword pick p50 < {PICK_TARGET_MS:g} ms -> {pick:.1f} ms ({verdict})")
    later = statistics_ms(on.to_keywords) - statistics_ms(off.to_keywords)
    print(f"    target: opinion_suggestions no later with speculation on -> on - off p50 = {later:+.1f} ms")
    extra = on.calls / on.messages - off.calls / off.messages
    print(f"    target: at most 1 extra provider call per recorded message -> {extra:+.2f}")

    one_reply_tokens = (len('{"suggestions": ["') + REPLY_CHARS + 3) / CHARS_PER_TOKEN
    bound = (FIRST_TOKEN + one_reply_tokens / TOKENS_PER_SECOND) * 1000 + 50
    print(f"  opt-in streaming client, typed opinion (asked of the provider), {STREAM_SAMPLES} requests each")
    print(f"  {'figure':<44}{'p50':>12}{'p95':>12}")
    for name, values in (
        ("not streamed: manual_generate -> llm_response", unstreamed),
        ("streamed: -> first suggestion_partial", streamed_first),
        ("streamed: -> complete llm_response", streamed_full),
    ):
        print(f"  {name:<44}{statistics_ms(values):>9.1f} ms{percentile(values, 0.95) * 1000:>9.1f} ms")
    first = statistics_ms(streamed_first)
    verdict = "met" if first <= bound else "NOT met"
    print(f"    target: first reply <= first token + one reply + 50 ms = {bound:.0f} ms -> {first:.1f} ms ({verdict})")
    print(f"    first streamed reply / whole answer, p50: {first / statistics_ms(unstreamed):.2f}")


def _compare(name: str, off: list[float], on: list[float], at_once: list[float]) -> None:
    cells = [f"{statistics_ms(values):.0f}/{percentile(values, 0.95) * 1000:.0f} ms" for values in (off, on, at_once)]
    ratio = statistics_ms(on) / statistics_ms(off)
    print(f"  {name + ' (p50/p95)':<52}{cells[0]:>16}{cells[1]:>16}{cells[2]:>20}{ratio:>11.2f}x")


def statistics_ms(values: list[float]) -> float:
    return percentile(values, 0.5) * 1000


if __name__ == "__main__":
    main()
