"""`python -m server.protocol_doc` prints docs/PROTOCOL.md, generated from server/protocol.py.

Every table (client events and their fields, server events, statuses, error codes, opt-in
options) and every limit comes from the declarations and the settings' defaults; the prose
around them is the template `protocol_doc.md` next to this file (`$name` placeholders).
Regenerate with `python -m server.protocol_doc > docs/PROTOCOL.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from config import Settings
from config.settings import RECORDING_WALL_MARGIN_SECONDS
from server.protocol import (
    CLIENT_EVENTS,
    ERROR_MESSAGES,
    LIMIT_SETTINGS,
    LIMIT_UNITS,
    PCM_FORMATS,
    SERVER_EVENTS,
    STATUS_MESSAGES,
    AudioStream,
    ErrorCode,
    HistoryMessage,
    Profile,
    SessionOptions,
)

TEMPLATE = Path(__file__).with_name("protocol_doc.md")
JSON_TYPES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "object": "object"}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _is_strict(field: FieldInfo) -> bool:
    return any(getattr(item, "strict", None) for item in field.metadata)


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a value that may be null, without the null alternative."""
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    return options[0] if len(options) == 1 else schema


def _type_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return f"object ({schema['$ref'].rsplit('/', 1)[-1]})"
    if schema.get("type") == "array":
        return f"list of {_type_name(schema['items'])}"
    return JSON_TYPES.get(schema.get("type", ""), "any")


def _constraints(schema: dict[str, Any], strict: bool) -> list[str]:
    found: list[str] = []
    if schema.get("minLength") == 1:
        found.append("non-empty")
    if "minimum" in schema and "maximum" in schema:
        found.append(f"{schema['minimum']}–{schema['maximum']}")
    if "enum" in schema:
        found.append(_one_of(schema))
    if "x-limit" in schema:
        found.append(_limit(schema["x-limit"]))
    if "pattern" in schema:
        found.append(f"matches `{schema['pattern']}`")
    if schema.get("type") == "array":
        if schema["items"].get("minLength") == 1:
            found.append("items non-empty")
        if "x-limit" in schema["items"]:
            found.append("items " + _limit(schema["items"]["x-limit"]))
    if strict:
        found.append("exact type")
    return found


def _limit(name: str) -> str:
    setting = LIMIT_SETTINGS[name]
    default = Settings.model_fields[setting.lower()].default
    return f"at most `{setting}` {LIMIT_UNITS[name]} (default {default})"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def field_table(model: type[BaseModel]) -> str:
    """One row per field: name, type, required or default, constraints, description."""
    properties = model.model_json_schema()["properties"]
    rows = ["| field | type | required | constraints | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        schema = _non_null(properties[name])
        nullable = " or null" if schema is not properties[name] else ""
        required = "required" if field.is_required() else f"optional, default {_default(field)}"
        constraints = ", ".join(_constraints(schema, _is_strict(field))) or "—"
        description = _cell(field.description or "")
        rows.append(f"| `{name}` | {_type_name(schema)}{nullable} | {required} | {constraints} | {description} |")
    return "\n".join(rows)


def _doc(model: type[BaseModel]) -> str:
    return _cell(model.__doc__ or "")


def client_summary() -> str:
    rows = []
    for event, model in CLIENT_EVENTS.items():
        required = ", ".join(f"`{name}`" for name, field in model.model_fields.items() if field.is_required())
        rows.append(f"| [`{event}`](#{event}) | {required or '—'} | {_doc(model)} |")
    return "\n".join(rows)


def client_events() -> str:
    sections = []
    for event, model in CLIENT_EVENTS.items():
        fields = field_table(model) if model.model_fields else "No fields."
        sections.append(f"### `{event}`\n\n{_doc(model)}\n\n{fields}")
    return "\n\n".join(sections)


def _schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    return _non_null(model.model_json_schema()["properties"][name])


def _range(model: type[BaseModel], name: str) -> str:
    schema = _schema(model, name)
    return f"{schema['minimum']}–{schema['maximum']}"


def _one_of(schema: dict[str, Any]) -> str:
    return "one of " + ", ".join(str(value) for value in schema["enum"])


def render() -> str:
    """The whole of docs/PROTOCOL.md."""
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    values = {
        "client_summary": client_summary(),
        "client_events": client_events(),
        "history_message": field_table(HistoryMessage),
        "profile": field_table(Profile),
        "server_events": "\n".join(f"| `{event}` | {_cell(data)} |" for event, data in SERVER_EVENTS.items()),
        "statuses": "\n".join(f"| `{status}` | {message} |" for status, message in STATUS_MESSAGES.items()),
        "error_codes": "\n".join(f"| `{code.value}` | {ERROR_MESSAGES[code]} |" for code in ErrorCode),
        "options": field_table(SessionOptions),
        "pcm_formats": ", ".join(f"`{name}`" for name in sorted(PCM_FORMATS)),
        "sample_rates": _one_of(_schema(AudioStream, "sample_rate")),
        "channels_range": _range(AudioStream, "channels"),
        "default_sample_rate": defaults["vosk_sample_rate"],
        "max_message_bytes": defaults["max_message_bytes"],
        "max_recording_seconds": f"{defaults['max_recording_seconds']:g}",
        "max_sessions": defaults["max_sessions_per_connection"],
        "websocket_timeout": f"{defaults['websocket_timeout']:g}",
        "ping_interval": f"{defaults['websocket_ping_interval']:g}",
        "ping_timeout": f"{defaults['websocket_ping_timeout']:g}",
        "session_resume_window": f"{defaults['session_resume_window']:g}",
        "partial_interval_ms": defaults["partial_interval_ms"],
        "max_text_chars": defaults["max_text_chars"],
        "max_label_chars": defaults["max_label_chars"],
        "max_list_items": defaults["max_list_items"],
        "max_history_messages": defaults["max_history_messages"],
        "max_messages_per_session": defaults["max_messages_per_session"],
        "max_modifications_per_session": defaults["max_modifications_per_session"],
        "max_recordings_per_connection": defaults["max_recordings_per_connection"],
        "max_ended_sessions": defaults["max_ended_sessions_per_connection"],
        "wall_margin": f"{RECORDING_WALL_MARGIN_SECONDS:g}",
    }
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    return text.rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
