"""The fields and rules both app generations rely on, driven in-process (replays: test_app_*.py)."""

from __future__ import annotations

from typing import Any

import pytest

from config import Settings
from harness.client import b64, details_of
from llm.interface import PersonProfile
from server.sessions import generation_context
from stt_pool.errors import SttOverloaded
from tests.conftest import speech
from tests.support.inprocess import Connect, FakeTranscriber, InProcessClient

PROFILE_TEXT_CHARS = Settings.model_fields["max_label_chars"].default
PROFILE_LIST_ITEMS = Settings.model_fields["max_list_items"].default


def context_of(client: InProcessClient, session_id: str) -> Any:
    conversation = client.conversation
    return generation_context(conversation.services.sessions.get(session_id, conversation.connection_id))


async def test_history_may_hold_a_silent_message_and_keeps_the_clients_ids(connect: Connect) -> None:
    history = [
        {"message_id": "msg_1732950000101", "sender": "医生", "content": ""},
        {"message_id": "msg_003", "sender": "我", "content": "好的"},
        {"message_id": "usr_004", "sender": "我", "content": "嗯"},
    ]
    async with connect() as client:
        session_id = await client.start_session(history_messages=history)
        # Position 4 would be msg_004; position 3's id is taken by the history, and so on.
        first = await client.record(session_id, speech(0.5), "msg_004")
        selected = await client.select(session_id, "谢谢")
        assert selected["message_id"] == "usr_005", "usr_004 is a history id"
        assert first["message_id"] != selected["message_id"]
        ids = [message.message_id for message in context_of(client, session_id).messages]
        assert ids[:3] == ["msg_1732950000101", "msg_003", "usr_004"]
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("fields", "opinion"),
    [
        ({"user_corpus": "想换药"}, "想换药"),
        ({"user_opinion": "同意"}, "同意"),
        ({"user_opinion": "同意", "user_corpus": "想换药"}, "同意"),
        ({"user_corpus": ""}, ""),
        ({}, ""),
    ],
    ids=["corpus", "opinion", "opinion-wins", "empty-corpus", "neither"],
)
async def test_user_corpus_is_the_current_apps_user_opinion(
    connect: Connect, fields: dict[str, str], opinion: str
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.generate_replies(session_id, 3, focused_message_ids=[], **fields)
        session = client.conversation.services.sessions.get(session_id, client.conversation.connection_id)
        assert session.last_opinion == opinion
        assert session.last_focus == []


async def test_profiles_reach_the_generation_context_and_come_back_as_given_in_profile_archive(
    connect: Connect,
) -> None:
    target = {"name": "王医生", "age": 52, "relations": ["主治医生"], "taboos": ["费用"], "nickname": "ignored"}
    user = {"name": "小张", "age": None, "common_topics": []}
    async with connect() as client:
        session_id = await client.create_session(target_profile=target, user_profile=user)
        context = context_of(client, session_id)
        assert context.target_profile == PersonProfile(name="王医生", age=52, relations=("主治医生",), taboos=("费用",))
        assert context.user_profile == PersonProfile(name="小张")
        archive = await client.end_session(session_id)
        assert archive["target_profile"] == {key: value for key, value in target.items() if key != "nickname"}
        assert archive["user_profile"] == user
        other = await client.create_session()
        assert await client.end_session(other) == {"session_id": other, "user_profile": None, "target_profile": None}


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        ({"name": "王" * (PROFILE_TEXT_CHARS + 1)}, "target_profile.name"),
        ({"age": "52"}, "target_profile.age"),
        ({"age": True}, "target_profile.age"),
        ({"age": -1}, "target_profile.age"),
        ({"relations": "医生"}, "target_profile.relations"),
        ({"taboos": ["x"] * (PROFILE_LIST_ITEMS + 1)}, "target_profile.taboos"),
        ({"common_topics": ["好" * (PROFILE_TEXT_CHARS + 1)]}, "target_profile.common_topics.0"),
        ({"preferences": [3]}, "target_profile.preferences.0"),
        ("王医生", "target_profile"),
    ],
    ids=[
        "long-name",
        "age-string",
        "age-bool",
        "age-negative",
        "list-as-string",
        "too-many",
        "long-item",
        "item-not-string",
        "not-an-object",
    ],
)
async def test_a_bad_profile_is_invalid_event_data_naming_the_field(
    connect: Connect, profile: object, field: str
) -> None:
    async with connect() as client:
        await client.send("conversation_start", response_count=2, target_profile=profile)
        error = await client.expect_error("INVALID_EVENT_DATA", None)
        assert details_of(error)["field"] == field
        assert len(client.conversation.services.sessions) == 0


@pytest.mark.parametrize(
    "frame",
    ['{"type": "heartbeat"}', '{"type": "heartbeat", "data": {"timestamp": 1}}', '{"type": "heartbeat", "data": 5}'],
)
async def test_a_heartbeat_is_accepted_silently(connect: Connect, frame: str) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.send_raw(frame)
        await client.still_works(session_id)


async def refused_recording_streamed_on(client: InProcessClient, transcriber: FakeTranscriber) -> str:
    """A session whose message_start was refused, while the app streams on: nothing answers the chunks."""
    session_id = await client.create_session()
    transcriber.refuse(SttOverloaded("full"))
    await client.send("message_start", session_id=session_id, sender="对方")
    await client.expect_error("STT_OVERLOADED", session_id)
    await client.send_audio(session_id, speech(3.0))
    return session_id


async def test_after_a_refused_message_start_stray_audio_and_message_end_are_dropped_silently(
    connect: Connect, transcriber: FakeTranscriber
) -> None:
    async with connect() as client:
        session_id = await refused_recording_streamed_on(client, transcriber)
        await client.send("message_end", session_id=session_id)
        await client.still_works(session_id)
        # After that message_end the usual rule is back: no open recording is NO_ACTIVE_MESSAGE.
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.1)))
        await client.expect_error("NO_ACTIVE_MESSAGE", session_id)


async def test_a_refused_message_start_then_an_accepted_one_records_only_the_new_audio(
    connect: Connect, transcriber: FakeTranscriber
) -> None:
    async with connect() as client:
        session_id = await refused_recording_streamed_on(client, transcriber)
        recorded = await client.record(session_id, speech(0.5), "msg_001")
        assert "0.5" in recorded["content"]
