"""No client can exhaust the service through the protocol: every string field, every per-session list
and every connection's recordings and ended sessions are bounded (settings), driven in-process.

Each test runs the attack with small limits and checks that it is refused with a clear error while
the connection, the session and everything already recorded stay as they were.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness.client import b64, details_of
from server.conversation import Services
from server.sessions import generation_context
from tests.conftest import speech
from tests.support.inprocess import Connect, FakeTranscriber, build_services, connector, settings_with

TEXT, LABEL, ITEMS, HISTORY = 100, 16, 3, 3
WALL_LIMIT = 0.3


@pytest.fixture
def limited_services() -> Services:
    settings = settings_with(
        max_text_chars=TEXT,
        max_label_chars=LABEL,
        max_list_items=ITEMS,
        max_history_messages=HISTORY,
        max_messages_per_session=4,
        max_modifications_per_session=2,
        max_ended_sessions_per_connection=3,
        recording_wall_limit_seconds=WALL_LIMIT,
    )
    return build_services(settings, FakeTranscriber(settings.client_sample_rate, settings.max_recording_seconds, 4))


@pytest.fixture
def limited(limited_services: Services) -> Connect:
    return connector(limited_services)


def history(count: int, **overrides: Any) -> list[dict[str, str]]:
    return [{"message_id": f"h{n}", "sender": "对方", "content": "你好", **overrides} for n in range(count)]


def too_long(event: str, field: str, limit: int, **data: Any) -> Any:
    """A case: `event` with `data` ("$sid" stands for the session id) is refused naming `field` and `limit`."""
    if event == "conversation_start":
        data["response_count"] = 2
    else:
        data["session_id"] = "$sid"
    return pytest.param(event, data, field, limit, id=f"{event}-{field}")


OVER_TEXT, OVER_LABEL = "长" * (TEXT + 1), "名" * (LABEL + 1)
TOO_LONG = [
    too_long("conversation_start", "scenario_description", TEXT, scenario_description=OVER_TEXT),
    too_long("conversation_start", "history_messages", HISTORY, history_messages=history(HISTORY + 1)),
    too_long("conversation_start", "history_messages.0.content", TEXT, history_messages=history(1, content=OVER_TEXT)),
    too_long("conversation_start", "history_messages.0.sender", LABEL, history_messages=history(1, sender=OVER_LABEL)),
    too_long(
        "conversation_start", "history_messages.0.message_id", LABEL, history_messages=history(1, message_id=OVER_LABEL)
    ),
    too_long("conversation_start", "target_profile.name", LABEL, target_profile={"name": OVER_LABEL}),
    too_long("conversation_start", "user_profile.taboos", ITEMS, user_profile={"taboos": ["x"] * (ITEMS + 1)}),
    too_long("conversation_start", "user_profile.relations.0", LABEL, user_profile={"relations": [OVER_LABEL]}),
    too_long("message_start", "sender", LABEL, sender=OVER_LABEL),
    too_long("manual_generate", "user_opinion", TEXT, user_opinion=OVER_TEXT),
    too_long("manual_generate", "user_corpus", TEXT, user_corpus=OVER_TEXT),
    too_long("manual_generate", "focused_message_ids", ITEMS, focused_message_ids=["h0"] * (ITEMS + 1)),
    too_long("manual_generate", "focused_message_ids.0", LABEL, focused_message_ids=[OVER_LABEL]),
    too_long("user_modification", "modification", TEXT, modification=OVER_TEXT),
    too_long("user_selected_response", "selected_content", TEXT, selected_content=OVER_TEXT, sender="我"),
    too_long("user_selected_response", "sender", LABEL, selected_content="好", sender=OVER_LABEL),
    too_long("scenario_supplement", "supplement", TEXT, supplement=OVER_TEXT),
]


@pytest.mark.parametrize(("event", "data", "field", "limit"), TOO_LONG)
async def test_a_field_beyond_its_limit_is_invalid_event_data_and_changes_nothing(
    limited: Connect, event: str, data: dict[str, Any], field: str, limit: int
) -> None:
    async with limited() as client:
        session_id = await client.create_session()
        data = {key: session_id if value == "$sid" else value for key, value in data.items()}
        await client.send(event, **data)
        error = await client.expect_error("INVALID_EVENT_DATA", data.get("session_id"))
        assert details_of(error)["field"] == field
        assert details_of(error)["limit"] == str(limit)
        await client.still_works(session_id)
        assert len(client.conversation.services.sessions) == 1


async def test_fields_at_their_limit_are_accepted(limited: Connect) -> None:
    async with limited() as client:
        session_id = await client.start_session(
            scenario_description="场" * TEXT,
            history_messages=history(HISTORY - 1, content="话" * TEXT, sender="人" * LABEL)
            + history(1, message_id="m" * LABEL),
            target_profile={"name": "名" * LABEL, "taboos": ["x" * LABEL] * ITEMS},
        )
        await client.generate_replies(
            session_id, 3, user_opinion="观" * TEXT, focused_message_ids=["m" * LABEL] * ITEMS
        )
        await client.generate_replies(session_id, 3, event="user_modification", modification="改" * TEXT)


async def test_a_session_holds_at_most_max_messages_and_refuses_more_without_losing_any(limited: Connect) -> None:
    async with limited() as client:
        session_id = await client.start_session(history_messages=history(2))
        await client.record(session_id, speech(0.5), "msg_003")
        await client.select(session_id, "好的")
        await client.send("user_selected_response", session_id=session_id, selected_content="再见", sender="我")
        error = await client.expect_error("INVALID_EVENT_DATA", session_id)
        assert details_of(error) == {"field": "messages", "limit": "4"}
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_error("INVALID_EVENT_DATA", session_id)
        await client.send_audio(session_id, speech(1.0))  # the app streams on: dropped silently
        await client.send("message_end", session_id=session_id)
        await client.expect_silence(0.1)
        context = generation_context(
            client.conversation.services.sessions.get(session_id, client.conversation.connection_id)
        )
        assert [message.message_id for message in context.messages] == ["h0", "h1", "msg_003", "usr_004"]


async def test_modifications_are_bounded_per_session(limited: Connect) -> None:
    async with limited() as client:
        session_id = await client.create_session()
        for text in ("更礼貌", "更简短"):
            await client.generate_replies(session_id, 3, event="user_modification", modification=text)
        await client.send("user_modification", session_id=session_id, modification="更幽默")
        error = await client.expect_error("INVALID_EVENT_DATA", session_id)
        assert details_of(error) == {"field": "modifications", "limit": "2"}
        context = generation_context(
            client.conversation.services.sessions.get(session_id, client.conversation.connection_id)
        )
        assert context.modifications == ("更礼貌", "更简短")


@pytest.mark.parametrize(
    "session_id",
    # The largest id that fits in a frame (MAX_MESSAGE_BYTES); a larger frame is closed with 1009.
    ["s" * 65, "abc\ndef", "会话", "a b", "../../etc", "x" * 500_000],
    ids=["65-chars", "newline", "non-ascii", "space", "path", "half-a-megabyte"],
)
async def test_a_malformed_session_id_is_invalid_and_never_echoed(connect: Connect, session_id: str) -> None:
    async with connect() as client:
        own = await client.create_session()
        await client.send("manual_generate", session_id=session_id)
        error = await client.expect_error("INVALID_EVENT_DATA", None)
        assert details_of(error)["field"] == "session_id"
        assert session_id not in str(error)
        await client.still_works(own)


async def test_a_well_formed_unknown_session_id_of_64_characters_is_echoed(connect: Connect) -> None:
    async with connect() as client:
        await client.send("manual_generate", session_id="A-z_9" * 12 + "abcd")
        await client.expect_error("SESSION_NOT_FOUND", "A-z_9" * 12 + "abcd")


async def test_one_connection_holds_one_recording_so_four_held_by_a_trickle_starve_nobody(
    limited: Connect, limited_services: Services
) -> None:
    """The attack: one connection opened every decoder slot (4 here) and kept them with tiny frames."""
    assert isinstance(limited_services.transcriber, FakeTranscriber)
    async with limited() as attacker, limited() as victim:
        sessions = [await attacker.create_session() for _ in range(4)]
        await attacker.open_recording(sessions[0])
        for session_id in sessions[1:]:
            await attacker.send("message_start", session_id=session_id, sender="对方")
            error = await attacker.expect_error("RATE_LIMITED", session_id)
            assert details_of(error)["limit"] == "1"
            await attacker.send("audio_stream", session_id=session_id, audio_chunk=b64(speech(0.1)))
        assert limited_services.transcriber.open_streams == 1
        victim_session = await victim.create_session()
        await victim.open_recording(victim_session)
        # The trickle goes on past the wall-clock limit: the recording is finished and recorded.
        for _ in range(round(2 * WALL_LIMIT / 0.05)):
            await attacker.send("audio_stream", session_id=sessions[0], audio_chunk=b64(speech(0.01)))
            await asyncio.sleep(0.05)
        await attacker.expect_status("processing_stt", sessions[0])
        await attacker.expect_recorded(sessions[0], "msg_001", "对方", spoken=True)
        await attacker.expect_status("generating_opinions", sessions[0])
        await attacker.expect_suggestions("opinion_suggestions", sessions[0])
        await attacker.expect_silence(0.1)  # the trickle's later chunks were dropped without errors
        await victim.send_audio(victim_session, speech(0.1))
        await victim.expect_status("processing_stt", victim_session, timeout=WALL_LIMIT + 5)


async def test_a_recording_open_past_the_wall_clock_limit_is_recorded_as_on_message_end(limited: Connect) -> None:
    async with limited() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send_audio(session_id, speech(1.0))
        await client.expect_status("processing_stt", session_id, timeout=WALL_LIMIT + 5)
        recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert "1.0" in recorded["content"]
        await client.expect_status("generating_opinions", session_id)
        await client.expect_suggestions("opinion_suggestions", session_id)
        await client.send_audio(session_id, speech(0.5))
        await client.send("message_end", session_id=session_id)
        await client.expect_silence(0.1)
        await client.record(session_id, speech(0.5), "msg_002")


async def test_the_ended_sessions_a_connection_remembers_are_bounded(limited: Connect) -> None:
    async with limited() as client:
        ended = []
        for _ in range(5):
            session_id = await client.create_session()
            await client.end_session(session_id)
            ended.append(session_id)
        for session_id in ended[-3:]:
            await client.send("manual_generate", session_id=session_id)
            await client.expect_error("SESSION_EXPIRED", session_id)
        for session_id in ended[:2]:
            await client.send("manual_generate", session_id=session_id)
            await client.expect_error("SESSION_NOT_FOUND", session_id)
