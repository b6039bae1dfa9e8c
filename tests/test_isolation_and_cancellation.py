"""Connections cannot see each other's sessions, and a cancelled generation sends nothing at all.

The cancellation tests run against `slow_server`, whose mock provider needs SLOW_LLM_DELAY_MS per
generation: "silence for longer than the delay" means the cancelled generation never answered.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from tests.conftest import SLOW_LLM_DELAY_MS, speech
from tests.support.client import ProtocolClient
from tests.support.server import ServerProcess

# Long enough for a generation that was not cancelled to have answered.
PAST_THE_DELAY = SLOW_LLM_DELAY_MS / 1000 + 1.0
GENERATION_TIMEOUT = SLOW_LLM_DELAY_MS / 1000 + 10


async def start(client: ProtocolClient, response_count: int = 3, **data: Any) -> str:
    await client.send("conversation_start", response_count=response_count, **data)
    session_id: str = (await client.expect("session_created"))["session_id"]
    return session_id


async def open_recording_with_audio(client: ProtocolClient, session_id: str, sender: str = "对方") -> None:
    await client.send("message_start", session_id=session_id, sender=sender)
    await client.expect_status("recording_message", session_id)
    await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(speech(0.5)).decode())


async def end_message_until_opinions_run(client: ProtocolClient, session_id: str, message_id: str) -> None:
    """message_end up to `generating_opinions`: the opinion generation is now in flight."""
    await client.send("message_end", session_id=session_id)
    await client.expect_status("processing_stt", session_id)
    await client.expect("message_recorded", session_id=session_id, message_id=message_id)
    await client.expect_status("generating_opinions", session_id)


async def select(client: ProtocolClient, session_id: str, content: str) -> dict[str, Any]:
    await client.send("user_selected_response", session_id=session_id, selected_content=content, sender="我")
    return await client.expect("message_recorded", session_id=session_id, content=content)


# -- isolation --------------------------------------------------------------------------------


async def test_another_connection_cannot_use_or_end_a_session_it_does_not_own(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as owner, ProtocolClient(server.ws_url) as intruder:
        owned = await start(owner)
        await start(intruder)
        foreign_events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"sender": "对方"}),
            ("audio_stream", {"audio_chunk": "AAAA"}),
            ("message_end", {}),
            ("manual_generate", {}),
            ("user_modification", {"modification": "更短"}),
            ("user_selected_response", {"selected_content": "偷偷加的", "sender": "我"}),
            ("scenario_supplement", {"supplement": "别人的"}),
            ("response_count_update", {"response_count": 1}),
            ("conversation_end", {}),
        ]
        for name, data in foreign_events:
            await intruder.send(name, session_id=owned, **data)
            error = await intruder.expect_error("SESSION_NOT_FOUND")
            assert error["session_id"] == owned
        await owner.expect_silence(0.5)
        # Untouched: no message was added, the count is the owner's, the session is still open.
        assert (await select(owner, owned, "我自己的"))["message_id"] == "usr_001"
        await owner.send("manual_generate", session_id=owned)
        await owner.expect_status("generating_response", owned)
        assert len((await owner.expect("llm_response", session_id=owned))["suggestions"]) == 3


async def test_events_of_a_session_go_only_to_the_connection_that_owns_it(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as first, ProtocolClient(server.ws_url) as second:
        first_session = await start(first, scenario_description="在超市结账")
        second_session = await start(second)
        await first.expect("opinion_suggestions", session_id=first_session)
        await open_recording_with_audio(first, first_session)
        await end_message_until_opinions_run(first, first_session, "msg_001")
        await first.expect("opinion_suggestions", session_id=first_session)
        await first.send("manual_generate", session_id=first_session)
        await first.expect_status("generating_response", first_session)
        await first.expect("llm_response", session_id=first_session)
        await second.expect_silence(0.5)
        await select(second, second_session, "只属于第二个连接")
        await first.expect_silence(0.3)


async def test_an_ended_or_abandoned_session_is_not_found_for_other_connections(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as owner, ProtocolClient(server.ws_url) as other:
        ended = await start(owner)
        await owner.send("conversation_end", session_id=ended)
        await other.send("manual_generate", session_id=ended)
        error = await other.expect_error("SESSION_NOT_FOUND")
        assert error["session_id"] == ended, "another connection never learns that the session existed"
        abandoned = await start(owner)
    async with ProtocolClient(server.ws_url) as reconnected:
        await reconnected.send("manual_generate", session_id=abandoned)
        await reconnected.expect_error("SESSION_NOT_FOUND")
        await reconnected.send("manual_generate", session_id=str(uuid.uuid4()))
        await reconnected.expect_error("SESSION_NOT_FOUND")


# -- cancellation -----------------------------------------------------------------------------


async def test_message_start_cancels_running_generations_and_they_send_nothing(slow_server: ServerProcess) -> None:
    async with ProtocolClient(slow_server.ws_url) as client:
        # Opinions started by conversation_start with a scenario.
        scenario = await start(client, scenario_description="和房东谈续租")
        await client.send("message_start", session_id=scenario, sender="房东")
        await client.expect_status("recording_message", scenario)
        # Opinions started by message_end.
        recorded = await start(client)
        await open_recording_with_audio(client, recorded)
        await end_message_until_opinions_run(client, recorded, "msg_001")
        await client.send("message_start", session_id=recorded, sender="对方")
        await client.expect_status("recording_message", recorded)
        # Replies started by manual_generate.
        replies = await start(client)
        await client.send("manual_generate", session_id=replies)
        await client.expect_status("generating_response", replies)
        await client.send("message_start", session_id=replies, sender="对方")
        await client.expect_status("recording_message", replies)
        await client.expect_silence(PAST_THE_DELAY)


async def test_manual_generate_cancels_a_running_opinion_generation(slow_server: ServerProcess) -> None:
    async with ProtocolClient(slow_server.ws_url) as client:
        session_id = await start(client)
        await open_recording_with_audio(client, session_id)
        await end_message_until_opinions_run(client, session_id, "msg_001")
        await client.send("manual_generate", session_id=session_id)
        await client.expect_status("generating_response", session_id)
        replies = await client.expect("llm_response", timeout=GENERATION_TIMEOUT, session_id=session_id)
        assert len(replies["suggestions"]) == 3
        await client.expect_silence(PAST_THE_DELAY)


async def test_a_newer_reply_request_replaces_the_older_one(slow_server: ServerProcess) -> None:
    async with ProtocolClient(slow_server.ws_url) as client:
        session_id = await start(client, response_count=3)
        await client.send("manual_generate", session_id=session_id)
        await client.expect_status("generating_response", session_id)
        # Each request asks for a different count, so the answer says which request it belongs to.
        await client.send("response_count_update", session_id=session_id, response_count=2)
        await client.send("manual_generate", session_id=session_id)
        await client.expect_status("generating_response", session_id)
        await client.send("response_count_update", session_id=session_id, response_count=4)
        await client.send("user_modification", session_id=session_id, modification="更礼貌")
        await client.expect_status("generating_response", session_id)
        replies = await client.expect("llm_response", timeout=GENERATION_TIMEOUT, session_id=session_id)
        assert len(replies["suggestions"]) == 4, "only the newest request answers"
        await client.expect_silence(PAST_THE_DELAY)


async def test_conversation_end_cancels_all_work_of_the_session(slow_server: ServerProcess) -> None:
    async with ProtocolClient(slow_server.ws_url) as client:
        # Replies and opinions both in flight.
        busy = await start(client)
        await open_recording_with_audio(client, busy)
        await client.send("manual_generate", session_id=busy)
        await client.expect_status("generating_response", busy)
        await end_message_until_opinions_run(client, busy, "msg_001")
        await client.send("conversation_end", session_id=busy)
        # A recording that is open, with audio, is dropped without a message.
        recording = await start(client)
        await open_recording_with_audio(client, recording)
        await client.send("conversation_end", session_id=recording)
        await client.expect_silence(PAST_THE_DELAY)
        await client.send("message_end", session_id=recording)
        await client.expect_error("SESSION_EXPIRED")
        # The connection's other sessions are unaffected.
        survivor = await start(client, response_count=1)
        await client.send("manual_generate", session_id=survivor)
        await client.expect_status("generating_response", survivor)
        replies = await client.expect("llm_response", timeout=GENERATION_TIMEOUT, session_id=survivor)
        assert len(replies["suggestions"]) == 1
