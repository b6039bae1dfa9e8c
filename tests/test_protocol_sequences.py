"""The default event sequences of PROTOCOL.md, event by event, against the real service.

Every test reads the server's events strictly in order, as the existing clients do: an extra,
missing or reordered event fails the test.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import orjson

from tests.conftest import speech
from tests.support.client import ProtocolClient
from tests.support.server import ServerProcess

CHINESE = re.compile(r"[\u4e00-\u9fff]")
STATUS_FIELDS = {"session_id", "status", "message"}
SUGGESTION_FIELDS = {"session_id", "suggestions", "request_id"}
RECORDED_FIELDS = {"session_id", "message_id", "content", "sender"}


async def next_event(client: ProtocolClient, event_type: str, expected_fields: set[str]) -> dict[str, Any]:
    """The next event must be `event_type` with exactly the protocol's fields."""
    event = await client.recv()
    assert event["type"] == event_type, f"expected {event_type}, got {event}"
    assert set(event["data"]) == expected_fields, event
    data: dict[str, Any] = event["data"]
    return data


async def next_status(client: ProtocolClient, session_id: str, status: str) -> dict[str, Any]:
    data = await next_event(client, "status_update", STATUS_FIELDS)
    assert data["session_id"] == session_id
    assert data["status"] == status
    assert CHINESE.search(data["message"]), f"status messages are Chinese: {data}"
    return data


async def next_suggestions(client: ProtocolClient, event_type: str, session_id: str) -> dict[str, Any]:
    data = await next_event(client, event_type, SUGGESTION_FIELDS)
    assert data["session_id"] == session_id
    assert isinstance(data["request_id"], str)
    assert data["request_id"]
    assert all(isinstance(text, str) and text for text in data["suggestions"]), data
    return data


async def next_recorded(client: ProtocolClient, session_id: str, message_id: str, sender: str) -> dict[str, Any]:
    data = await next_event(client, "message_recorded", RECORDED_FIELDS)
    assert data["session_id"] == session_id
    assert data["message_id"] == message_id
    assert data["sender"] == sender
    assert isinstance(data["content"], str)
    return data


async def new_session(client: ProtocolClient, response_count: int = 3, **data: Any) -> str:
    await client.send("conversation_start", response_count=response_count, **data)
    created = await next_event(client, "session_created", {"session_id"})
    session_id: str = created["session_id"]
    assert uuid.UUID(session_id).version == 4, "session ids are unguessable random UUID4s"
    return session_id


async def send_audio(
    client: ProtocolClient, session_id: str, pcm: bytes, chunk_bytes: int = 16000, **audio: Any
) -> None:
    for offset in range(0, len(pcm), chunk_bytes):
        chunk = base64.b64encode(pcm[offset : offset + chunk_bytes]).decode()
        await client.send("audio_stream", session_id=session_id, audio_chunk=chunk, **audio)


async def record_message(
    client: ProtocolClient, session_id: str, pcm: bytes, message_id: str, sender: str = "对方", **audio: Any
) -> dict[str, Any]:
    """message_start ... message_end with every event of the default sequence checked."""
    await client.send("message_start", session_id=session_id, sender=sender)
    await next_status(client, session_id, "recording_message")
    await send_audio(client, session_id, pcm, **audio)
    await client.send("message_end", session_id=session_id)
    await next_status(client, session_id, "processing_stt")
    recorded = await next_recorded(client, session_id, message_id, sender)
    await next_status(client, session_id, "generating_opinions")
    opinions = await next_suggestions(client, "opinion_suggestions", session_id)
    assert 3 <= len(opinions["suggestions"]) <= 5
    return recorded


async def generate_replies(
    client: ProtocolClient, session_id: str, count: int, event: str = "manual_generate", **data: Any
) -> dict[str, Any]:
    await client.send(event, session_id=session_id, **data)
    await next_status(client, session_id, "generating_response")
    replies = await next_suggestions(client, "llm_response", session_id)
    assert len(replies["suggestions"]) == count, replies
    return replies


async def test_conversation_start_without_history_or_scenario_answers_only_session_created(
    server: ServerProcess,
) -> None:
    async with ProtocolClient(server.ws_url) as client:
        await new_session(client)
        await client.expect_silence(0.5)
        await new_session(client, scenario_description="", history_messages=[])
        await client.expect_silence(0.5)


async def test_conversation_start_with_a_scenario_is_followed_by_opinion_suggestions(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client, scenario_description="在医院挂号，和护士交流")
        opinions = await next_suggestions(client, "opinion_suggestions", session_id)
        assert 3 <= len(opinions["suggestions"]) <= 5
        await client.expect_silence(0.5)


async def test_conversation_start_with_history_keeps_its_ids_and_numbers_new_messages_after_it(
    server: ServerProcess,
) -> None:
    history = [
        {"message_id": "client-a", "sender": "对方", "content": "你好，请问需要什么帮助？"},
        {"message_id": "client-b", "sender": "我", "content": "我想预约明天的门诊。"},
    ]
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client, history_messages=history)
        await next_suggestions(client, "opinion_suggestions", session_id)
        await record_message(client, session_id, speech(0.5), "msg_003")
        await client.send("user_selected_response", session_id=session_id, selected_content="好的，谢谢", sender="我")
        await next_recorded(client, session_id, "usr_004", "我")


async def test_message_sequence_is_recording_stt_recorded_generating_opinions_suggestions(
    server: ServerProcess,
) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await client.send("message_start", session_id=session_id, sender="对方")
        await next_status(client, session_id, "recording_message")
        await send_audio(client, session_id, speech(1.0))
        await client.expect_silence(0.3)  # audio_stream -> (nothing)
        await client.send("message_end", session_id=session_id)
        await next_status(client, session_id, "processing_stt")
        recorded = await next_recorded(client, session_id, "msg_001", "对方")
        assert "1.0" in recorded["content"], "the mock transcript names the seconds it received"
        await next_status(client, session_id, "generating_opinions")
        await next_suggestions(client, "opinion_suggestions", session_id)
        await client.expect_silence(0.3)


async def test_a_message_without_speech_is_recorded_with_empty_content(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        recorded = await record_message(client, session_id, bytes(32000), "msg_001")
        assert recorded["content"] == ""


async def test_message_ids_follow_the_position_in_the_history(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await record_message(client, session_id, speech(0.3), "msg_001")
        await client.send("user_selected_response", session_id=session_id, selected_content="我明白了", sender="我")
        selected = await next_recorded(client, session_id, "usr_002", "我")
        assert selected["content"] == "我明白了"
        await record_message(client, session_id, speech(0.3), "msg_003")
        await client.send("user_selected_response", session_id=session_id, selected_content="再见", sender="我")
        await next_recorded(client, session_id, "usr_004", "我")


async def test_manual_generate_answers_generating_response_then_exactly_response_count_replies(
    server: ServerProcess,
) -> None:
    async with ProtocolClient(server.ws_url) as client:
        for count in (1, 3, 5):
            session_id = await new_session(client, response_count=count)
            await generate_replies(client, session_id, count)
            await record_message(client, session_id, speech(0.3), "msg_001")
            await generate_replies(
                client, session_id, count, focused_message_ids=["msg_001"], user_opinion="同意，但要快一点"
            )
        await client.expect_silence(0.3)


async def test_user_modification_regenerates_replies_at_once(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client, response_count=4)
        await record_message(client, session_id, speech(0.3), "msg_001")
        await generate_replies(client, session_id, 4)
        await generate_replies(client, session_id, 4, event="user_modification", modification="语气再客气一点")
        await generate_replies(client, session_id, 4, event="user_modification", modification="更简短")
        await client.expect_silence(0.3)


async def test_response_count_update_changes_the_count_of_later_replies(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client, response_count=3)
        await generate_replies(client, session_id, 3)
        await client.send("response_count_update", session_id=session_id, response_count=5)
        await generate_replies(client, session_id, 5)
        await client.send("response_count_update", session_id=session_id, response_count=1)
        await generate_replies(client, session_id, 1, event="user_modification", modification="更自然")


async def test_scenario_supplement_response_count_update_and_conversation_end_send_nothing(
    server: ServerProcess,
) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await client.send("scenario_supplement", session_id=session_id, supplement="对方是医生")
        await client.send("scenario_supplement", session_id=session_id, supplement="对方是药剂师")
        await client.send("response_count_update", session_id=session_id, response_count=2)
        await client.expect_silence(0.5)
        # The next answer on the connection is the one to the next request: nothing came in between.
        await client.send("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
        await next_recorded(client, session_id, "usr_001", "我")
        await client.send("conversation_end", session_id=session_id)
        await client.expect_silence(0.5)
        other = await new_session(client)
        assert other != session_id


async def test_second_message_start_records_the_open_recording_first(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await client.send("message_start", session_id=session_id, sender="对方")
        await next_status(client, session_id, "recording_message")
        await send_audio(client, session_id, speech(0.5))
        await client.send("message_start", session_id=session_id, sender="旁人")
        kept = await next_recorded(client, session_id, "msg_001", "对方")
        assert kept["content"], "the earlier recording had speech"
        await next_status(client, session_id, "recording_message")
        await send_audio(client, session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        await next_status(client, session_id, "processing_stt")
        await next_recorded(client, session_id, "msg_002", "旁人")
        await next_status(client, session_id, "generating_opinions")
        await next_suggestions(client, "opinion_suggestions", session_id)


async def test_second_message_start_drops_an_open_recording_without_audio(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await client.send("message_start", session_id=session_id, sender="对方")
        await next_status(client, session_id, "recording_message")
        await client.send("message_start", session_id=session_id, sender="旁人")
        await next_status(client, session_id, "recording_message")
        await send_audio(client, session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        await next_status(client, session_id, "processing_stt")
        await next_recorded(client, session_id, "msg_001", "旁人")


async def test_described_audio_is_converted_stereo_downmixed_and_rates_honoured(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        stereo = speech(1.0, channels=2)
        recorded = await record_message(client, session_id, stereo, "msg_001", channels=2, format="pcm_s16le")
        assert "1.0" in recorded["content"], recorded
        narrowband = speech(2.0, sample_rate=8000)
        recorded = await record_message(client, session_id, narrowband, "msg_002", sample_rate=8000, format="S16LE ")
        assert "2.0" in recorded["content"], recorded
        wideband = speech(0.5, sample_rate=48000)
        recorded = await record_message(
            client, session_id, wideband, "msg_003", chunk_bytes=32000, sample_rate=48000, channels=1, format="linear16"
        )
        assert "0.5" in recorded["content"], recorded


async def test_status_frames_are_utf8_json_with_chinese_text_unescaped(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client)
        await client.send("message_start", session_id=session_id, sender="对方")
        raw = await client.ws.recv()
        assert isinstance(raw, str), "server events are text frames"
        assert "正在录音" in raw
        assert "\\u" not in raw
        event = orjson.loads(raw.encode("utf-8"))
        assert event == {
            "type": "status_update",
            "data": {"session_id": session_id, "status": "recording_message", "message": "正在录音"},
        }


async def test_each_generation_has_its_own_request_id(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await new_session(client, scenario_description="在餐厅点菜")
        request_ids = [(await next_suggestions(client, "opinion_suggestions", session_id))["request_id"]]
        request_ids.append((await generate_replies(client, session_id, 3))["request_id"])
        request_ids.append((await generate_replies(client, session_id, 3))["request_id"])
        assert len(set(request_ids)) == 3


async def test_a_whole_conversation_never_sends_idle_status(server: ServerProcess) -> None:
    events: list[dict[str, Any]] = []
    async with ProtocolClient(server.ws_url) as client:
        await client.send("conversation_start", response_count=2, scenario_description="问路")
        for _ in range(2):
            events.append(await client.recv())
        session_id = events[0]["data"]["session_id"]
        await client.send("message_start", session_id=session_id, sender="对方")
        events.append(await client.recv())
        await send_audio(client, session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        for _ in range(4):
            events.append(await client.recv())
        await client.send("manual_generate", session_id=session_id)
        for _ in range(2):
            events.append(await client.recv())
        await client.send("user_selected_response", session_id=session_id, selected_content="往前走", sender="我")
        events.append(await client.recv())
        await client.send("conversation_end", session_id=session_id)
        await client.expect_silence(0.5)
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


async def test_sessions_of_one_connection_number_their_messages_independently(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        first = await new_session(client)
        second = await new_session(client)
        assert first != second
        await record_message(client, first, speech(0.3), "msg_001")
        await record_message(client, second, speech(0.3), "msg_001")
        await client.send("user_selected_response", session_id=first, selected_content="嗯", sender="我")
        await next_recorded(client, first, "usr_002", "我")


async def test_unknown_extra_fields_are_ignored_everywhere(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        frame = {"type": "conversation_start", "data": {"response_count": 2, "client": "flutter"}, "id": 7, "ts": 1.5}
        await client.send_raw(orjson.dumps(frame).decode())
        session_id = (await next_event(client, "session_created", {"session_id"}))["session_id"]
        await client.expect_silence(0.3)
        await client.send("message_start", session_id=session_id, sender="对方", timestamp=123, device="pixel")
        await next_status(client, session_id, "recording_message")
        chunk = base64.b64encode(speech(0.5)).decode()
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
        await next_status(client, session_id, "processing_stt")
        recorded = await next_recorded(client, session_id, "msg_001", "对方")
        assert "0.5" in recorded["content"]
        await next_status(client, session_id, "generating_opinions")
        await next_suggestions(client, "opinion_suggestions", session_id)
        await client.send(
            "conversation_start",
            response_count=1,
            options={"partial_transcripts": False, "future_option": True},
            history_messages=[{"message_id": "h1", "sender": "对方", "content": "你好", "timestamp": 3}],
        )
        other = (await next_event(client, "session_created", {"session_id"}))["session_id"]
        await next_suggestions(client, "opinion_suggestions", other)
        await generate_replies(client, other, 1, extra={"nested": True})
