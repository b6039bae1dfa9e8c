"""Fifty clients at once, each through a whole conversation, every event checked in order.

The wall time is reported (printed and recorded as a junit property), never asserted on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from harness.client import ProtocolClient
from harness.server import ServerProcess
from tests.conftest import speech

CLIENTS = 50


async def whole_conversation(url: str, index: int) -> str:
    """start -> record -> generate -> select -> end, strictly in order; returns the session id."""
    async with ProtocolClient(url) as client:
        session_id = await client.start_session(response_count=3)
        recorded = await client.record(session_id, speech(1.0), chunk_bytes=8000, sender=f"对方{index}")
        assert recorded["message_id"] == "msg_001"
        assert recorded["content"], "one second of tone is speech to the mock transcriber"
        await client.send("manual_generate", session_id=session_id, focused_message_ids=["msg_001"])
        await client.expect_status("generating_response", session_id)
        replies = await client.expect("llm_response", timeout=30, session_id=session_id)
        assert len(replies["suggestions"]) == 3
        chosen = replies["suggestions"][index % 3]
        await client.send("user_selected_response", session_id=session_id, selected_content=chosen, sender="我")
        await client.expect("message_recorded", session_id=session_id, message_id="usr_002", content=chosen)
        await client.end_session(session_id)
        await client.expect_silence(0.2)
        return session_id


async def test_fifty_concurrent_clients_each_complete_a_whole_conversation(
    server: ServerProcess, workers: int, record_property: Callable[[str, object], None]
) -> None:
    started = time.perf_counter()
    session_ids = await asyncio.gather(*(whole_conversation(server.ws_url, index) for index in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    assert len(set(session_ids)) == CLIENTS
    record_property("wall_time_seconds", round(elapsed, 3))
    print(f"\n{CLIENTS} concurrent whole conversations with WORKERS={workers}: {elapsed:.2f} s wall time")
