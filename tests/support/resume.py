"""What the session-resume end-to-end tests share: reading `session_restored` as the current app
does, sync points, and connections placed on a chosen Sanic worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import websockets

from harness.client import ProtocolClient
from harness.server import ServerProcess
from tests.support.apps import cast

# Connections opened (and kept open) while looking for one served by a given worker: the kernel
# hands each new connection to whichever worker accepts first; on a busy machine one worker may
# win many times in a row, so the tries are spaced out.
WORKER_SEARCH_TRIES = 100
WORKER_SEARCH_PAUSE = 0.05
# The current app reconnects up to 5 times with back-off (CLIENTS.md); so does `reconnect`.
RECONNECT_TRIES = 5
FIRST_RECONNECT_PAUSE = 0.5


async def resume_checked(
    client: ProtocolClient,
    session_id: str,
    *,
    message_count: int | tuple[int, ...],
    response_count: int,
    has_modifications: bool = False,
    scenario_description: str | None = None,
) -> dict[str, Any]:
    """`session_resume`; the `session_restored` answering it carries every field the current app casts,
    with its Dart type and the value given here (`message_count`: one of them, if several)."""
    data = await resume(client, session_id)
    assert cast(data, "session_id", "String") == session_id, data
    assert cast(data, "status", "String"), data
    counts = (message_count,) if isinstance(message_count, int) else message_count
    assert cast(data, "message_count", "int") in counts, data
    assert cast(data, "response_count", "int") == response_count, data
    assert cast(data, "has_modifications", "bool") is has_modifications, data
    assert cast(data, "scenario_description", "String?") == scenario_description, data
    # Dart's DateTime.parse reads ISO 8601 with an offset or `Z`; the time is the restore's own.
    restored_at = datetime.fromisoformat(cast(data, "restored_at", "String"))
    assert restored_at.tzinfo is not None, f"restored_at carries its offset: {data}"
    assert abs(datetime.now(UTC) - restored_at) < timedelta(minutes=5), data
    return data


async def resume(client: ProtocolClient, session_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """`session_resume`; returns the `session_restored` (exactly its fields) that must answer it first."""
    return await client.resume(session_id, timeout)


async def barrier(client: ProtocolClient) -> None:
    """Everything sent before this has been read by the server: it answers an unknown event in order."""
    await client.send("barrier_probe")
    await client.expect_error("INVALID_EVENT_TYPE")


async def send_unfinished_recording(
    client: ProtocolClient, session_id: str, pcm: bytes, *, sender: str = "对方"
) -> None:
    """A recording under way (no message_end yet): opened, `pcm` sent, every chunk in the server's hands."""
    await client.open_recording(session_id, sender=sender)
    await client.send_audio(session_id, pcm)
    await barrier(client)


async def events_until(client: ProtocolClient, event_type: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Events up to and including the first `event_type`; only status updates may come before it."""
    events = []
    while True:
        event = await client.recv(timeout)
        events.append(event)
        if event["type"] == event_type:
            return events
        assert event["type"] == "status_update", f"expected {event_type} (status updates before it), got {event}"


async def events_until_closed(client: ProtocolClient, timeout: float = 60.0) -> tuple[list[dict[str, Any]], int | None]:
    """The events that arrive before the server closes the connection, and its close code."""
    events = []
    while True:
        try:
            events.append(await client.recv(timeout))
        except websockets.ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd is not None else None


async def cut_recording_delivered(client: ProtocolClient, before_close: list[dict[str, Any]]) -> dict[str, Any]:
    """A recording finished while the service drained is delivered exactly once: before the close
    (only status updates besides it), or else queued and delivered after `session_restored`."""
    assert all(event["type"] in {"status_update", "message_recorded"} for event in before_close), before_close
    delivered = [event["data"] for event in before_close if event["type"] == "message_recorded"]
    assert len(delivered) <= 1, before_close
    if delivered:
        return delivered[0]
    data: dict[str, Any] = (await events_until(client, "message_recorded"))[-1]["data"]
    return data


async def events_within(client: ProtocolClient, seconds: float) -> list[dict[str, Any]]:
    """Whatever arrives until `seconds` pass without an event."""
    events = []
    with contextlib.suppress(TimeoutError):
        while True:
            events.append(await client.recv(seconds))
    return events


async def none_of_session(client: ProtocolClient, session_id: str, seconds: float) -> None:
    """For `seconds`, no event of `session_id` reaches `client` (the connection may also be closed)."""
    with contextlib.suppress(TimeoutError, websockets.ConnectionClosed):
        while True:
            event = await client.recv(seconds)
            assert event["data"].get("session_id") != session_id, f"a taken-over connection got {event}"


@contextlib.asynccontextmanager
async def on_worker(
    service: ServerProcess, url: str, *, pid: int | None = None, not_pid: int | None = None
) -> AsyncIterator[ProtocolClient]:
    """A connection served by worker `pid` (or by any worker but `not_pid`); the tries are closed."""
    async with contextlib.AsyncExitStack() as tries:
        for _ in range(WORKER_SEARCH_TRIES):
            client = await tries.enter_async_context(ProtocolClient(url))
            serving = service.serving_pid(client.local_port)
            assert serving is not None, "the service holds every connection it accepted"
            if (pid is None or serving == pid) and serving != not_pid:
                yield client
                return
            await asyncio.sleep(WORKER_SEARCH_PAUSE)
        raise AssertionError(f"no connection landed on the wanted worker in {WORKER_SEARCH_TRIES} tries")


@contextlib.asynccontextmanager
async def reconnect(url: str) -> AsyncIterator[ProtocolClient]:
    """Connect as the app does after a drop: a refused or failed handshake (e.g. nginx's 502 while it
    counts an upstream as down) is tried again after a pause that doubles."""
    for attempt in range(RECONNECT_TRIES):
        client = ProtocolClient(url)
        try:
            await client.__aenter__()
        except (OSError, websockets.InvalidHandshake):
            if attempt == RECONNECT_TRIES - 1:
                raise
            await asyncio.sleep(FIRST_RECONNECT_PAUSE * 2**attempt)
            continue
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)
        return
