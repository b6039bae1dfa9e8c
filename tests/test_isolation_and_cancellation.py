"""Connections cannot see each other's sessions, and a cancelled generation sends nothing at all.

Driven in-process: several connections (`Conversation`s) share one worker's services. The
cancellation tests use a mock provider that needs LLM_DELAY per generation: "silence for longer
than the delay" means the cancelled generation never answered.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from harness.client import EventClient, b64
from tests.conftest import speech
from tests.support.inprocess import Connect, build_services, connector, settings_with

# The mock provider's latency here: long enough to cancel a generation in flight.
LLM_DELAY = 0.5
# Long enough for a generation that was not cancelled to have answered.
PAST_THE_DELAY = LLM_DELAY + 0.5
GENERATION_TIMEOUT = LLM_DELAY + 10


@pytest.fixture
def slow() -> Connect:
    # Several sessions of one connection record at once here.
    return connector(build_services(settings_with(max_recordings_per_connection=4), llm_delay=LLM_DELAY))


async def open_recording_with_audio(client: EventClient, session_id: str, sender: str = "对方") -> None:
    await client.open_recording(session_id, sender)
    await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.5)))


async def end_message_until_opinions_run(client: EventClient, session_id: str, message_id: str) -> None:
    """message_end up to `generating_opinions`: the opinion generation is now in flight."""
    await client.send("message_end", session_id=session_id)
    await client.expect_status("processing_stt", session_id)
    await client.expect_recorded(session_id, message_id, spoken=True)
    await client.expect_status("generating_opinions", session_id)


# -- isolation --------------------------------------------------------------------------------


async def test_another_connection_cannot_use_or_end_a_session_it_does_not_own(connect: Connect) -> None:
    async with connect() as owner, connect() as intruder:
        owned = await owner.create_session()
        await intruder.create_session()
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
        await owner.expect_silence(0.1)
        # Untouched: no message was added, the count is the owner's, the session is still open.
        assert (await owner.select(owned, "我自己的"))["message_id"] == "usr_001"
        await owner.send("manual_generate", session_id=owned)
        await owner.expect_status("generating_response", owned)
        assert len((await owner.expect("llm_response", session_id=owned))["suggestions"]) == 3


async def test_events_of_a_session_go_only_to_the_connection_that_owns_it(connect: Connect) -> None:
    async with connect() as first, connect() as second:
        first_session = await first.create_session(scenario_description="在超市结账")
        second_session = await second.create_session()
        await first.expect("opinion_suggestions", session_id=first_session)
        await open_recording_with_audio(first, first_session)
        await end_message_until_opinions_run(first, first_session, "msg_001")
        await first.expect("opinion_suggestions", session_id=first_session)
        await first.send("manual_generate", session_id=first_session)
        await first.expect_status("generating_response", first_session)
        await first.expect("llm_response", session_id=first_session)
        await second.expect_silence(0.1)
        await second.select(second_session, "只属于第二个连接")
        await first.expect_silence(0.1)


async def test_an_ended_or_abandoned_session_is_not_found_for_other_connections(connect: Connect) -> None:
    async with connect() as owner, connect() as other:
        ended = await owner.create_session()
        await owner.end_session(ended)
        await other.send("manual_generate", session_id=ended)
        error = await other.expect_error("SESSION_NOT_FOUND")
        assert error["session_id"] == ended, "another connection never learns that the session existed"
        abandoned = await owner.create_session()
    async with connect() as reconnected:
        await reconnected.send("manual_generate", session_id=abandoned)
        await reconnected.expect_error("SESSION_NOT_FOUND")
        await reconnected.send("manual_generate", session_id=str(uuid.uuid4()))
        await reconnected.expect_error("SESSION_NOT_FOUND")


# -- cancellation -----------------------------------------------------------------------------


async def test_message_start_cancels_running_generations_and_they_send_nothing(slow: Connect) -> None:
    async with slow() as client:
        # Opinions started by conversation_start with a scenario.
        scenario = await client.create_session(scenario_description="和房东谈续租")
        await client.send("message_start", session_id=scenario, sender="房东")
        await client.expect_status("recording_message", scenario)
        # Opinions started by message_end.
        recorded = await client.create_session()
        await open_recording_with_audio(client, recorded)
        await end_message_until_opinions_run(client, recorded, "msg_001")
        await client.send("message_start", session_id=recorded, sender="对方")
        await client.expect_status("recording_message", recorded)
        # Replies started by manual_generate.
        replies = await client.create_session()
        await client.send("manual_generate", session_id=replies)
        await client.expect_status("generating_response", replies)
        await client.send("message_start", session_id=replies, sender="对方")
        await client.expect_status("recording_message", replies)
        await client.expect_silence(PAST_THE_DELAY)


async def test_manual_generate_cancels_a_running_opinion_generation(slow: Connect) -> None:
    async with slow() as client:
        session_id = await client.create_session()
        await open_recording_with_audio(client, session_id)
        await end_message_until_opinions_run(client, session_id, "msg_001")
        await client.send("manual_generate", session_id=session_id)
        await client.expect_status("generating_response", session_id)
        replies = await client.expect("llm_response", timeout=GENERATION_TIMEOUT, session_id=session_id)
        assert len(replies["suggestions"]) == 3
        await client.expect_silence(PAST_THE_DELAY)


async def test_a_newer_reply_request_replaces_the_older_one(slow: Connect) -> None:
    async with slow() as client:
        session_id = await client.create_session(response_count=3)
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


async def test_conversation_end_cancels_all_work_of_the_session(slow: Connect) -> None:
    async with slow() as client:
        # Replies and opinions both in flight.
        busy = await client.create_session()
        await open_recording_with_audio(client, busy)
        await client.send("manual_generate", session_id=busy)
        await client.expect_status("generating_response", busy)
        await end_message_until_opinions_run(client, busy, "msg_001")
        await client.end_session(busy)
        # A recording that is open, with audio, is dropped without a message.
        recording = await client.create_session()
        await open_recording_with_audio(client, recording)
        await client.end_session(recording)
        await client.expect_silence(PAST_THE_DELAY)
        await client.send("message_end", session_id=recording)
        await client.expect_error("SESSION_EXPIRED")
        # The connection's other sessions are unaffected.
        survivor = await client.create_session(response_count=1)
        await client.send("manual_generate", session_id=survivor)
        await client.expect_status("generating_response", survivor)
        replies = await client.expect("llm_response", timeout=GENERATION_TIMEOUT, session_id=survivor)
        assert len(replies["suggestions"]) == 1
