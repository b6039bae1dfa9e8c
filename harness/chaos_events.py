"""The bad frames of the chaos run: what a buggy client or an attacker sends, each answered by one `error`.

`stray_frame` needs no session of the connection (it is safe while a recording is open);
`session_frame` targets an idle session of the connection (no open recording); `audio_fault`
is a bad `audio_stream` for the open recording, which the server refuses without storing it.
Every frame stays within the default frame limit: the 1009 close has its own scenario.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import orjson

from config import Settings
from harness.client import b64

Frame = str | bytes
TEXT_LIMIT: int = Settings.model_fields["max_text_chars"].default  # one more character is INVALID_EVENT_DATA


def event(event_type: str, **data: Any) -> str:
    return orjson.dumps({"type": event_type, "data": data}).decode()


def _unknown_session(rng: random.Random) -> str:
    return f"nosuch{rng.randrange(10**9)}"


STRAY: dict[str, Callable[[random.Random], Frame]] = {
    "bad_json": lambda rng: rng.choice(["{not json", "", "[1, 2]", "null", '"text"', '{"type": "message_start"']),
    "unknown_type": lambda rng: event(rng.choice(["hack", "message_delete", "", "CONVERSATION_START"])),
    "data_not_object": lambda rng: orjson.dumps({"type": "conversation_start", "data": rng.choice([1, "x", []])}),
    "wrong_type": lambda rng: rng.choice(
        [
            event("conversation_start", response_count="3"),
            event("conversation_start", response_count=rng.choice([0, 6, 99, -1, 2.5, True])),
            event("conversation_start", response_count=3, history_messages="none"),
            event("conversation_start", response_count=3, user_profile={"age": "old"}),
            event("manual_generate", session_id=rng.randrange(10**6)),
        ]
    ),
    "oversize_field": lambda rng: event(
        "conversation_start", response_count=3, scenario_description="长" * (TEXT_LIMIT + rng.randint(1, 20_000))
    ),
    "bad_session_id": lambda rng: event(
        "manual_generate", session_id=rng.choice(["a" * rng.randint(65, 5000), "bad id\n", "../x", "é"])
    ),
    "unknown_session": lambda rng: event(
        rng.choice(["manual_generate", "message_start", "message_end", "conversation_end"]),
        session_id=_unknown_session(rng),
        sender="对方",
    ),
    "audio_unknown_session": lambda rng: event(
        "audio_stream", session_id=_unknown_session(rng), audio_chunk=b64(bytes(3200))
    ),
    "binary_garbage": lambda rng: rng.randbytes(rng.randint(1, 2000)),
    "binary_truncated_json": lambda rng: orjson.dumps({"type": "heartbeat", "data": {"a": 1}})[:-3],
}

SESSION: dict[str, Callable[[random.Random, str], Frame]] = {
    "audio_without_message_start": lambda rng, sid: event("audio_stream", session_id=sid, audio_chunk=b64(bytes(3200))),
    "message_end_without_start": lambda rng, sid: event("message_end", session_id=sid),
    "oversize_modification": lambda rng, sid: event(
        "user_modification", session_id=sid, modification="x" * (TEXT_LIMIT + rng.randint(1, 100_000))
    ),
    "empty_selection": lambda rng, sid: event(
        "user_selected_response", session_id=sid, selected_content="", sender="我"
    ),
    "selection_wrong_type": lambda rng, sid: event(
        "user_selected_response", session_id=sid, selected_content=["a"], sender="我"
    ),
    "bad_response_count": lambda rng, sid: event("response_count_update", session_id=sid, response_count=0),
    "focus_not_a_list": lambda rng, sid: event("manual_generate", session_id=sid, focused_message_ids="msg_001"),
}

AUDIO: dict[str, Callable[[random.Random, str], Frame]] = {
    "bad_base64": lambda rng, sid: event(
        "audio_stream", session_id=sid, audio_chunk=rng.choice(["!!!!", "abc", "YWJj\n===", "☃"])
    ),
    "unaccepted_rate": lambda rng, sid: event(
        "audio_stream",
        session_id=sid,
        audio_chunk=b64(bytes(3200)),
        sample_rate=rng.choice([12345, 96000, 7999, 0, -16000]),
    ),
    "rate_changed": lambda rng, sid: event(
        "audio_stream", session_id=sid, audio_chunk=b64(bytes(1600)), sample_rate=8000
    ),
    "not_pcm": lambda rng, sid: event("audio_stream", session_id=sid, audio_chunk=b64(bytes(3200)), format="mp3"),
    "three_channels": lambda rng, sid: event("audio_stream", session_id=sid, audio_chunk=b64(bytes(3000)), channels=3),
    "empty_chunk": lambda rng, sid: event("audio_stream", session_id=sid, audio_chunk=""),
}


def stray_frame(rng: random.Random) -> tuple[str, Frame]:
    name = rng.choice(sorted(STRAY))
    return name, STRAY[name](rng)


def session_frame(rng: random.Random, session_id: str) -> tuple[str, Frame]:
    name = rng.choice(sorted(SESSION))
    return name, SESSION[name](rng, session_id)


def audio_fault(rng: random.Random, session_id: str) -> tuple[str, Frame]:
    name = rng.choice(sorted(AUDIO))
    return name, AUDIO[name](rng, session_id)
