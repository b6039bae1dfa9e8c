"""Every error path of the protocol, driven in-process: one `error` event with the right code, and
the connection goes on.

After each bad frame the test sends a valid request on the same connection and checks its
answer, so an error that closes the connection, leaks a second event or breaks the session fails.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from config import Settings
from harness.client import b64, details_of
from tests.conftest import LIMITED_RECORDING_SECONDS, speech
from tests.support.inprocess import Connect, build_services, connector, settings_with


@pytest.fixture
def limited() -> Connect:
    """Recordings of at most 1 s."""
    settings = settings_with(max_recording_seconds=LIMITED_RECORDING_SECONDS)
    return connector(build_services(settings))


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("{not json", id="invalid-json"),
        pytest.param("", id="empty-frame"),
        pytest.param('{"type": "message_start", "data": {"session_id": "x", "sender": "a"}', id="truncated-json"),
    ],
)
async def test_invalid_json_is_invalid_event_data(connect: Connect, frame: str) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send_raw(frame)
        await client.expect_error("INVALID_EVENT_DATA", None)
        await client.still_works(session_id)


@pytest.mark.parametrize("frame", ["[1, 2]", '"conversation_start"', "42", "null", "true"])
async def test_json_that_is_not_an_object_is_invalid_event_data(connect: Connect, frame: str) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send_raw(frame)
        await client.expect_error("INVALID_EVENT_DATA", None)
        await client.still_works(session_id)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "start_conversation", "data": {"response_count": 2}},
        {"type": "", "data": {}},
        {"type": 5, "data": {}},
        {"type": None, "data": {}},
        {"data": {"response_count": 2}},
    ],
    ids=["unknown-name", "empty", "number", "null", "missing"],
)
async def test_unknown_event_type_is_invalid_event_type(connect: Connect, frame: dict[str, Any]) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send_raw(orjson.dumps(frame).decode())
        error = await client.expect_error("INVALID_EVENT_TYPE", None)
        assert "conversation_start" in details_of(error)["accepted"]
        await client.still_works(session_id)


@pytest.mark.parametrize(
    "frame",
    [{"type": "conversation_start"}, {"type": "message_end", "data": None}],
    ids=["absent", "null"],
)
async def test_missing_data_object_is_missing_required_field(connect: Connect, frame: dict[str, Any]) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send_raw(orjson.dumps(frame).decode())
        error = await client.expect_error("MISSING_REQUIRED_FIELD", None)
        assert details_of(error) == {"field": "data"}
        await client.still_works(session_id)


async def test_data_that_is_not_an_object_is_invalid_event_data(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        not_objects: tuple[object, ...] = ([], "session", 3)
        for data in not_objects:
            await client.send_raw(orjson.dumps({"type": "message_end", "data": data}).decode())
            await client.expect_error("INVALID_EVENT_DATA", None)
        await client.still_works(session_id)


# (event, data with "$sid" for the valid session id, the field the error must name)
INVALID_DATA = [
    ("conversation_start", {}, "response_count"),
    ("conversation_start", {"response_count": 0}, "response_count"),
    ("conversation_start", {"response_count": 6}, "response_count"),
    ("conversation_start", {"response_count": "3"}, "response_count"),
    ("conversation_start", {"response_count": 3.5}, "response_count"),
    ("conversation_start", {"response_count": True}, "response_count"),
    ("conversation_start", {"response_count": None}, "response_count"),
    ("conversation_start", {"response_count": 2, "scenario_description": 7}, "scenario_description"),
    ("conversation_start", {"response_count": 2, "history_messages": "none"}, "history_messages"),
    (
        "conversation_start",
        {"response_count": 2, "history_messages": [{"message_id": "h1", "sender": "对方"}]},
        "history_messages.0.content",
    ),
    (
        "conversation_start",
        {"response_count": 2, "history_messages": [{"message_id": "", "sender": "对方", "content": "嗨"}]},
        "history_messages.0.message_id",
    ),
    ("conversation_start", {"response_count": 2, "options": "all"}, "options"),
    ("message_start", {"sender": "对方"}, "session_id"),
    ("message_start", {"session_id": "", "sender": "对方"}, "session_id"),
    ("message_start", {"session_id": 12, "sender": "对方"}, "session_id"),
    ("message_start", {"session_id": "$sid"}, "sender"),
    ("message_start", {"session_id": "$sid", "sender": ""}, "sender"),
    ("message_start", {"session_id": "$sid", "sender": 1}, "sender"),
    ("audio_stream", {"session_id": "$sid"}, "audio_chunk"),
    ("audio_stream", {"session_id": "$sid", "audio_chunk": ""}, "audio_chunk"),
    ("audio_stream", {"session_id": "$sid", "audio_chunk": ["AAAA"]}, "audio_chunk"),
    ("manual_generate", {"session_id": "$sid", "focused_message_ids": "msg_001"}, "focused_message_ids"),
    ("manual_generate", {"session_id": "$sid", "focused_message_ids": [""]}, "focused_message_ids.0"),
    ("manual_generate", {"session_id": "$sid", "user_opinion": 5}, "user_opinion"),
    ("user_modification", {"session_id": "$sid"}, "modification"),
    ("user_modification", {"session_id": "$sid", "modification": ""}, "modification"),
    ("user_selected_response", {"session_id": "$sid", "sender": "我"}, "selected_content"),
    ("user_selected_response", {"session_id": "$sid", "selected_content": "好", "sender": ""}, "sender"),
    ("scenario_supplement", {"session_id": "$sid", "supplement": ""}, "supplement"),
    ("scenario_supplement", {"session_id": "$sid", "supplement": {"text": "x"}}, "supplement"),
    ("response_count_update", {"session_id": "$sid"}, "response_count"),
    ("response_count_update", {"session_id": "$sid", "response_count": 0}, "response_count"),
    ("response_count_update", {"session_id": "$sid", "response_count": 6}, "response_count"),
    ("response_count_update", {"session_id": "$sid", "response_count": "3"}, "response_count"),
    ("response_count_update", {"session_id": "$sid", "response_count": 3.5}, "response_count"),
    ("response_count_update", {"session_id": "$sid", "response_count": True}, "response_count"),
    ("conversation_end", {}, "session_id"),
]


@pytest.mark.parametrize(
    ("event", "data", "field"), INVALID_DATA, ids=[f"{e}-{f}-{i}" for i, (e, _, f) in enumerate(INVALID_DATA)]
)
async def test_missing_empty_or_mistyped_fields_are_invalid_event_data_naming_the_field(
    connect: Connect, event: str, data: dict[str, Any], field: str
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        data = {key: session_id if value == "$sid" else value for key, value in data.items()}
        await client.send(event, **data)
        sid = data.get("session_id")
        error = await client.expect_error("INVALID_EVENT_DATA", sid if isinstance(sid, str) and sid else None)
        assert details_of(error)["field"] == field
        await client.still_works(session_id)


async def test_rejected_response_count_update_keeps_the_previous_count(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session(response_count=2)
        await client.send("response_count_update", session_id=session_id, response_count=9)
        await client.expect_error("INVALID_EVENT_DATA", session_id)
        await client.send("manual_generate", session_id=session_id)
        await client.expect_status("generating_response", session_id)
        replies = await client.expect("llm_response", session_id=session_id)
        assert len(replies["suggestions"]) == 2


@pytest.mark.parametrize(
    "event",
    [
        ("message_start", {"sender": "对方"}),
        ("audio_stream", {"audio_chunk": "AAAA"}),
        ("message_end", {}),
        ("manual_generate", {}),
        ("user_modification", {"modification": "更短"}),
        ("user_selected_response", {"selected_content": "好", "sender": "我"}),
        ("scenario_supplement", {"supplement": "在银行"}),
        ("response_count_update", {"response_count": 2}),
        ("conversation_end", {}),
    ],
    ids=lambda event: event[0],
)
async def test_unknown_session_is_session_not_found_for_every_session_event(
    connect: Connect, event: tuple[str, dict[str, Any]]
) -> None:
    name, data = event
    unknown = str(uuid.uuid4())
    async with connect() as client:
        session_id = await client.create_session()
        await client.send(name, session_id=unknown, **data)
        await client.expect_error("SESSION_NOT_FOUND", unknown)
        await client.still_works(session_id)


async def test_events_after_conversation_end_are_session_expired(connect: Connect) -> None:
    async with connect() as client:
        ended = await client.create_session()
        await client.end_session(ended)
        for name, data in [
            ("message_start", {"sender": "对方"}),
            ("manual_generate", {}),
            ("user_selected_response", {"selected_content": "好", "sender": "我"}),
            ("conversation_end", {}),
        ]:
            await client.send(name, session_id=ended, **data)
            await client.expect_error("SESSION_EXPIRED", ended)
        session_id = await client.create_session()
        await client.still_works(session_id)


async def test_audio_or_message_end_without_open_recording_is_no_active_message(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.1)))
        await client.expect_error("NO_ACTIVE_MESSAGE", session_id)
        await client.send("message_end", session_id=session_id)
        await client.expect_error("NO_ACTIVE_MESSAGE", session_id)
        await client.still_works(session_id)
        # A closed recording is closed: message_end twice is an error the second time.
        await client.open_recording(session_id)
        await client.finish_recording(session_id)
        await client.send("message_end", session_id=session_id)
        await client.expect_error("NO_ACTIVE_MESSAGE", session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.1)))
        await client.expect_error("NO_ACTIVE_MESSAGE", session_id)
        await client.still_works(session_id)


BAD_AUDIO = [
    pytest.param({"audio_chunk": "!!not base64!!"}, "audio_chunk", id="invalid-base64"),
    pytest.param({"audio_chunk": "AAA"}, "audio_chunk", id="base64-missing-padding"),
    pytest.param({"audio_chunk": b64(bytes(64)), "format": "mp3"}, "format", id="format-mp3"),
    pytest.param({"audio_chunk": b64(bytes(64)), "format": "opus"}, "format", id="format-opus"),
    pytest.param({"audio_chunk": b64(bytes(64)), "sample_rate": 7999}, "sample_rate", id="sample-rate-7999"),
    pytest.param({"audio_chunk": b64(bytes(64)), "sample_rate": 48001}, "sample_rate", id="sample-rate-48001"),
    pytest.param({"audio_chunk": b64(bytes(64)), "channels": 3}, "channels", id="channels-3"),
    pytest.param({"audio_chunk": b64(bytes(64)), "channels": 0}, "channels", id="channels-0"),
]


@pytest.mark.parametrize(("audio", "field"), BAD_AUDIO)
async def test_bad_audio_is_invalid_event_data_and_the_recording_goes_on(
    connect: Connect, audio: dict[str, Any], field: str
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.5)))
        await client.send("audio_stream", session_id=session_id, **audio)
        error = await client.expect_error("INVALID_EVENT_DATA", session_id)
        assert details_of(error)["field"] == field
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.5)))
        recorded = await client.finish_recording(session_id)
        assert "1.0" in recorded["content"], "the rejected chunk added nothing, the good ones were kept"
        await client.still_works(session_id)


async def test_sample_rate_cannot_change_within_one_recording(connect: Connect) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.5)), sample_rate=16000)
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.5, 8000)), sample_rate=8000)
        error = await client.expect_error("INVALID_EVENT_DATA", session_id)
        assert details_of(error)["field"] == "sample_rate"
        recorded = await client.finish_recording(session_id)
        assert "0.5" in recorded["content"]


async def test_audio_beyond_the_maximum_length_is_audio_too_long_and_what_fits_is_recorded(
    limited: Connect,
) -> None:
    async with limited() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        # Two seconds in two frames (each under the frame limit); the second crosses the 1 s limit.
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.75)))
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(1.25)))
        error = await client.expect_error("AUDIO_TOO_LONG", session_id)
        assert details_of(error)["max_seconds"] == str(LIMITED_RECORDING_SECONDS)
        # The app keeps streaming while the button is held: one error, not one per chunk.
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.25)))
        await client.send("audio_stream", session_id=session_id, audio_chunk="not base64 either")
        await client.expect_silence(0.1)
        recorded = await client.finish_recording(session_id)
        assert f"{LIMITED_RECORDING_SECONDS:.1f}" in recorded["content"], "the first second was kept"
        assert recorded["message_id"] == "msg_001"
        await client.still_works(session_id)


async def test_too_many_sessions_on_one_connection_is_rate_limited(connect: Connect) -> None:
    limit = Settings.model_fields["max_sessions_per_connection"].default
    async with connect() as client:
        sessions = [await client.create_session() for _ in range(limit)]
        await client.send("conversation_start", response_count=2)
        error = await client.expect_error("RATE_LIMITED", None)
        assert details_of(error)["limit"] == str(limit)
        await client.end_session(sessions[0])
        await client.create_session()
        await client.still_works(sessions[1])
