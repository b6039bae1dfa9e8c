"""docs/PROTOCOL.md is generated from server/protocol.py, is up to date and documents every declaration."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Annotated

from pydantic import BaseModel, Field

from config import Settings
from harness.server import ROOT
from server.protocol import (
    CLIENT_EVENTS,
    ERROR_MESSAGES,
    PCM_FORMATS,
    SERVER_EVENTS,
    STATUS_MESSAGES,
    ErrorCode,
    HistoryMessage,
    Profile,
    RequiredText,
    ResponseCount,
    SessionOptions,
)
from server.protocol_doc import field_table, render

DOC = ROOT / "docs" / "PROTOCOL.md"
REGENERATE = "run `python -m server.protocol_doc > docs/PROTOCOL.md`"


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    pattern = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE)
    following = pattern.search(text, start + len(heading) + 1)
    return text[start : following.start() if following else len(text)]


def test_committed_protocol_doc_is_the_generated_one() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), REGENERATE


def test_the_module_prints_the_doc() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.protocol_doc"], cwd=ROOT, capture_output=True, timeout=60, check=True
    )
    assert result.stdout.decode("utf-8") == render()
    assert result.stderr == b""


def test_every_client_event_is_documented_with_each_of_its_fields() -> None:
    doc = render()
    summary = section(doc, "## Client → server events")
    for event, model in CLIENT_EVENTS.items():
        assert f"[`{event}`](#{event})" in summary
        body = section(doc, f"### `{event}`")
        assert model.__doc__ is not None
        assert " ".join(model.__doc__.split()) in body
        for name, field in model.model_fields.items():
            row = next((line for line in body.splitlines() if line.startswith(f"| `{name}` |")), None)
            assert row is not None, f"{event}.{name} is documented"
            assert ("| required |" in row) == field.is_required(), row
            if field.description:
                assert " ".join(field.description.split()) in row


def test_nested_objects_and_every_option_are_documented() -> None:
    doc = render()
    history = section(doc, "### Nested object: history message")
    label = "at most `MAX_LABEL_CHARS` characters (default 200)"
    for name in ("message_id", "sender"):
        assert f"| `{name}` | string | required | non-empty, {label}, exact type |" in history
    text = "at most `MAX_TEXT_CHARS` characters (default 4000)"
    assert f"| `content` | string | required | {text}, exact type |" in history, "a silent recording's content is empty"
    assert set(HistoryMessage.model_fields) == {"message_id", "sender", "content"}
    profile = section(doc, "### Nested object: profile")
    for name in Profile.model_fields:
        assert f"| `{name}` |" in profile
    assert "at most `MAX_LIST_ITEMS` items (default 50), items at most `MAX_LABEL_CHARS` characters" in profile
    options = section(doc, "## Opt-in options")
    for name, field in SessionOptions.model_fields.items():
        assert f"| `{name}` |" in options
        assert field.description
        assert " ".join(field.description.split()) in options
    assert "transcript_partial" in options


def test_every_server_event_status_and_error_code_is_documented() -> None:
    doc = render()
    server_events = section(doc, "## Server → client events")
    for event in SERVER_EVENTS:
        assert f"| `{event}` |" in server_events
    for status, message in STATUS_MESSAGES.items():
        assert f"| `{status}` | {message} |" in server_events
    errors = section(doc, "## Error codes")
    assert set(ERROR_MESSAGES) == set(ErrorCode)
    for code in ErrorCode:
        assert f"| `{code.value}` | {ERROR_MESSAGES[code]} |" in errors


def test_default_sequences_name_every_client_event_and_audio_lists_every_format() -> None:
    doc = render()
    sequences = section(doc, "## Event sequences (default)")
    block = sequences.split("```")[1]
    for event in CLIENT_EVENTS:
        assert event in block
    assert "message_start -> message_recorded" in sequences, "the second message_start rule"
    audio = section(doc, "## Audio")
    for name in PCM_FORMATS:
        assert f"`{name}`" in audio
    assert "one of 8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000 Hz" in audio
    assert "MAX_RECORDING_SECONDS" in audio
    assert "MAX_MESSAGE_BYTES" in audio


def test_every_limit_setting_is_documented_with_its_default() -> None:
    limits = " ".join(section(render(), "## Limits").split())
    for name in (
        "max_text_chars",
        "max_label_chars",
        "max_list_items",
        "max_history_messages",
        "max_messages_per_session",
        "max_modifications_per_session",
        "max_recordings_per_connection",
        "max_ended_sessions_per_connection",
    ):
        assert f"`{name.upper()}`" in limits
        assert f"(default {Settings.model_fields[name].default})" in limits
    assert "`RECORDING_WALL_LIMIT_SECONDS`" in limits


def test_http_endpoints_are_documented() -> None:
    http = section(render(), "## HTTP endpoints")
    for endpoint in ("GET /`", "GET /conversation/health", "GET /metrics", "GET /docs", "/docs/openapi.json"):
        assert endpoint in http


def test_field_table_renders_type_requirement_constraints_and_description() -> None:
    class Example(BaseModel):
        name: RequiredText = Field(description="A | name")
        count: ResponseCount
        rate: Annotated[int, Field(ge=8000, le=48000)] | None = None
        rates: Annotated[int, Field(json_schema_extra={"enum": [8000, 16000]})] = 16000
        tags: list[RequiredText] = Field(default_factory=list)
        nested: HistoryMessage | None = None

    assert field_table(Example).splitlines() == [
        "| field | type | required | constraints | description |",
        "|---|---|---|---|---|",
        "| `name` | string | required | non-empty, at most `MAX_TEXT_CHARS` characters (default 4000), exact type "
        "| A \\| name |",
        "| `count` | integer | required | 1–5, exact type |  |",
        "| `rate` | integer or null | optional, default `null` | 8000–48000 |  |",
        "| `rates` | integer | optional, default `16000` | one of 8000, 16000 |  |",
        "| `tags` | list of string | optional, default `[]` | items non-empty, "
        "items at most `MAX_TEXT_CHARS` characters (default 4000) |  |",
        "| `nested` | object (HistoryMessage) or null | optional, default `null` | — |  |",
    ]
