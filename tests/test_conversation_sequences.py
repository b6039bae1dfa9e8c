"""The default event sequences of PROTOCOL.md, event by event, driven in-process.

Every test reads the connection's events strictly in order, as the existing clients do: an
extra, missing or reordered event fails the test. What only a real server shows (framing,
several workers) is in test_protocol_websocket.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from harness.client import b64
from tests.conftest import speech
from tests.support.inprocess import Connect


async def test_conversation_start_without_history_or_scenario_answers_only_session_created(
    connect: Connect,
) -> None:
    async with connect() as client:
        await client.create_session()
        await client.expect_silence(0.1)
        await client.create_session(scenario_description="", history_messages=[])
        await client.expect_silence(0.1)


async def test_session_ids_are_unguessable_random_uuid4s(connect: Connect) -> None:
    async with connect() as client:
        ids = {await client.create_session() for _ in range(3)}
    assert len(ids) == 3
    assert all(uuid.UUID(session_id).version == 4 for session_id in ids)


async def test_conversation_start_with_a_scenario_is_followed_by_opinion_suggestions(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session(scenario_description="在医院挂号，和护士交流")
        opinions = await client.expect_suggestions("opinion_suggestions", session_id)
        assert 3 <= len(opinions["suggestions"]) <= 5
        await client.expect_silence(0.1)


async def test_conversation_start_with_history_keeps_its_ids_and_numbers_new_messages_after_it(
    connect: Connect,
) -> None:
    history = [
        {"message_id": "client-a", "sender": "对方", "content": "你好，请问需要什么帮助？"},
        {"message_id": "client-b", "sender": "我", "content": "我想预约明天的门诊。"},
    ]
    async with connect() as client:
        session_id = await client.create_session(history_messages=history)
        await client.expect_suggestions("opinion_suggestions", session_id)
        await client.record(session_id, speech(0.5), "msg_003")
        await client.send("user_selected_response", session_id=session_id, selected_content="好的，谢谢", sender="我")
        await client.expect_recorded(session_id, "usr_004", "我", spoken=False)


async def test_message_sequence_is_recording_stt_recorded_generating_opinions_suggestions(
    connect: Connect,
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        await client.send_audio(session_id, speech(1.0))
        await client.expect_silence(0.1)  # audio_stream -> (nothing)
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert "1.0" in recorded["content"], "the mock transcript names the seconds it received"
        await client.expect_status("generating_opinions", session_id)
        await client.expect_suggestions("opinion_suggestions", session_id)
        await client.expect_silence(0.1)


async def test_a_message_without_speech_is_recorded_with_empty_content(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        recorded = await client.record(session_id, bytes(32000), "msg_001")
        assert recorded["content"] == ""


async def test_message_ids_follow_the_position_in_the_history(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.record(session_id, speech(0.3), "msg_001")
        await client.send("user_selected_response", session_id=session_id, selected_content="我明白了", sender="我")
        selected = await client.expect_recorded(session_id, "usr_002", "我", spoken=False)
        assert selected["content"] == "我明白了"
        await client.record(session_id, speech(0.3), "msg_003")
        await client.send("user_selected_response", session_id=session_id, selected_content="再见", sender="我")
        await client.expect_recorded(session_id, "usr_004", "我", spoken=False)


@pytest.mark.parametrize("count", [1, 3, 5])
async def test_manual_generate_answers_generating_response_then_exactly_response_count_replies(
    connect: Connect, count: int
) -> None:
    async with connect() as client:
        session_id = await client.create_session(response_count=count)
        await client.generate_replies(session_id, count)
        await client.record(session_id, speech(0.3), "msg_001")
        await client.generate_replies(
            session_id, count, focused_message_ids=["msg_001"], user_opinion="同意，但要快一点"
        )
        await client.expect_silence(0.1)


async def test_user_modification_regenerates_replies_at_once(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session(response_count=4)
        await client.record(session_id, speech(0.3), "msg_001")
        await client.generate_replies(session_id, 4)
        await client.generate_replies(session_id, 4, event="user_modification", modification="语气再客气一点")
        await client.generate_replies(session_id, 4, event="user_modification", modification="更简短")
        await client.expect_silence(0.1)


async def test_response_count_update_changes_the_count_of_later_replies(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session(response_count=3)
        await client.generate_replies(session_id, 3)
        await client.send("response_count_update", session_id=session_id, response_count=5)
        await client.generate_replies(session_id, 5)
        await client.send("response_count_update", session_id=session_id, response_count=1)
        await client.generate_replies(session_id, 1, event="user_modification", modification="更自然")


async def test_supplement_count_update_and_heartbeat_send_nothing_and_conversation_end_answers_profile_archive(
    connect: Connect,
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send("scenario_supplement", session_id=session_id, supplement="对方是医生")
        await client.send("scenario_supplement", session_id=session_id, supplement="对方是药剂师")
        await client.send("response_count_update", session_id=session_id, response_count=2)
        await client.send("heartbeat")
        await client.expect_silence(0.1)
        # The next answer on the connection is the one to the next request: nothing came in between.
        await client.send("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
        await client.expect_recorded(session_id, "usr_001", "我", spoken=False)
        await client.end_session(session_id)
        await client.expect_silence(0.1)
        other = await client.create_session()
        assert other != session_id


async def test_second_message_start_records_the_open_recording_first(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        await client.send_audio(session_id, speech(0.5))
        await client.send("message_start", session_id=session_id, sender="旁人")
        kept = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert kept["content"], "the earlier recording had speech"
        await client.expect_status("recording_message", session_id)
        await client.send_audio(session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        await client.expect_recorded(session_id, "msg_002", "旁人", spoken=True)
        await client.expect_status("generating_opinions", session_id)
        await client.expect_suggestions("opinion_suggestions", session_id)


async def test_second_message_start_drops_an_open_recording_without_audio(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        await client.send("message_start", session_id=session_id, sender="旁人")
        await client.expect_status("recording_message", session_id)
        await client.send_audio(session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        await client.expect_recorded(session_id, "msg_001", "旁人", spoken=True)


async def test_described_audio_is_converted_stereo_downmixed_and_rates_honoured(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        stereo = speech(1.0, channels=2)
        recorded = await client.record(session_id, stereo, "msg_001", channels=2, format="pcm_s16le")
        assert "1.0" in recorded["content"], recorded
        narrowband = speech(2.0, sample_rate=8000)
        recorded = await client.record(session_id, narrowband, "msg_002", sample_rate=8000, format="S16LE ")
        assert "2.0" in recorded["content"], recorded
        wideband = speech(0.5, sample_rate=48000)
        recorded = await client.record(
            session_id, wideband, "msg_003", chunk_bytes=32000, sample_rate=48000, channels=1, format="linear16"
        )
        assert "0.5" in recorded["content"], recorded


async def test_each_generation_has_its_own_request_id(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session(scenario_description="在餐厅点菜")
        request_ids = [(await client.expect_suggestions("opinion_suggestions", session_id))["request_id"]]
        request_ids.append((await client.generate_replies(session_id, 3))["request_id"])
        request_ids.append((await client.generate_replies(session_id, 3))["request_id"])
        assert len(set(request_ids)) == 3


async def test_a_whole_conversation_never_sends_idle_status(connect: Connect) -> None:
    events: list[dict[str, Any]] = []
    async with connect() as client:
        await client.send("conversation_start", response_count=2, scenario_description="问路")
        for _ in range(2):
            events.append(await client.recv())
        session_id = events[0]["data"]["session_id"]
        await client.send("message_start", session_id=session_id, sender="对方")
        events.append(await client.recv())
        await client.send_audio(session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        for _ in range(4):
            events.append(await client.recv())
        await client.send("manual_generate", session_id=session_id)
        for _ in range(2):
            events.append(await client.recv())
        await client.send("user_selected_response", session_id=session_id, selected_content="往前走", sender="我")
        events.append(await client.recv())
        await client.end_session(session_id)
        await client.expect_silence(0.1)
    assert [event["type"] for event in events] == [
        "session_created",
        "opinion_suggestions",
        "status_update",
        "status_update",
        "message_recorded",
        "status_update",
        "opinion_suggestions",
        "status_update",
        "llm_response",
        "message_recorded",
    ]
    statuses = [event["data"]["status"] for event in events if event["type"] == "status_update"]
    assert statuses == ["recording_message", "processing_stt", "generating_opinions", "generating_response"]


async def test_sessions_of_one_connection_number_their_messages_independently(connect: Connect) -> None:
    async with connect() as client:
        first = await client.create_session()
        second = await client.create_session()
        assert first != second
        await client.record(first, speech(0.3), "msg_001")
        await client.record(second, speech(0.3), "msg_001")
        await client.send("user_selected_response", session_id=first, selected_content="嗯", sender="我")
        await client.expect_recorded(first, "usr_002", "我", spoken=False)


async def test_unknown_extra_fields_are_ignored_everywhere(connect: Connect) -> None:
    async with connect() as client:
        frame = {"type": "conversation_start", "data": {"response_count": 2, "client": "flutter"}, "id": 7, "ts": 1.5}
        await client.send_raw(orjson.dumps(frame).decode())
        session_id = (await client.expect("session_created", keys={"session_id"}))["session_id"]
        await client.expect_silence(0.1)
        await client.send("message_start", session_id=session_id, sender="对方", timestamp=123, device="pixel")
        await client.expect_status("recording_message", session_id)
        chunk = b64(speech(0.5))
        await client.send(
            "audio_stream",
            session_id=session_id,
            audio_chunk=chunk,
            duration=0.5,
            format="pcm16",
            sample_rate=16000,
            channels=1,
            sequence=1,
        )
        await client.send("message_end", session_id=session_id, reason="button")
        await client.expect_status("processing_stt", session_id)
        recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert "0.5" in recorded["content"]
        await client.expect_status("generating_opinions", session_id)
        await client.expect_suggestions("opinion_suggestions", session_id)
        await client.send(
            "conversation_start",
            response_count=1,
            options={"partial_transcripts": False, "future_option": True},
            history_messages=[{"message_id": "h1", "sender": "对方", "content": "你好", "timestamp": 3}],
        )
        other = (await client.expect("session_created", keys={"session_id"}))["session_id"]
        await client.expect_suggestions("opinion_suggestions", other)
        await client.generate_replies(other, 1, extra={"nested": True})
