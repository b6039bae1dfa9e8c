"""What the store keeps: a session as plain JSON-ready data, and the handle of an attached connection.

`SessionState` is the one model of a conversation: the store keeps it, a worker caches it for the
connections attached to it, and a generation is asked about it (`generation_context` in server/sessions.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# A server event as it goes over the wire ({"type": ..., "data": {...}}); the store only keeps it.
Event = dict[str, Any]
JsonObject = dict[str, Any]

Origin = Literal["history", "recorded", "selected"]
ORIGINS: tuple[Origin, ...] = get_args(Origin)
# PROTOCOL.md: recorded messages are `msg_NNN`, selected replies `usr_NNN` (NNN = 1-based position).
ID_PREFIX: dict[Origin, str] = {"history": "msg", "recorded": "msg", "selected": "usr"}

# The fields `update_fields` may change; messages, modifications and timestamps have their own operations.
UPDATABLE_FIELDS = frozenset(
    {
        "response_count",
        "scenario_description",
        "scenario_supplement",
        "options",
        "user_profile",
        "target_profile",
        "last_focus",
        "last_opinion",
    }
)


def message_id_for(origin: Origin, position: int) -> str:
    return f"{ID_PREFIX[origin]}_{position:03d}"


@dataclass(slots=True)
class StoredMessage:
    message_id: str
    sender: str
    content: str
    origin: Origin
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> JsonObject:
        return {
            "message_id": self.message_id,
            "sender": self.sender,
            "content": self.content,
            "origin": self.origin,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: JsonObject) -> StoredMessage:
        origin = data["origin"]
        if origin not in ORIGINS:
            raise ValueError(f"unknown message origin {origin!r}")
        return cls(
            str(data["message_id"]), str(data["sender"]), str(data["content"]), origin, float(data["created_at"])
        )


@dataclass(slots=True)
class SessionState:
    """Everything a conversation is, and nothing about the connection or tasks serving it."""

    session_id: str
    response_count: int
    scenario_description: str = ""
    scenario_supplement: str = ""
    messages: list[StoredMessage] = field(default_factory=list)
    modifications: list[str] = field(default_factory=list)
    options: JsonObject = field(default_factory=dict)
    user_profile: JsonObject | None = None
    target_profile: JsonObject | None = None
    last_focus: list[str] = field(default_factory=list)
    last_opinion: str = ""
    created_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)

    # The client's options of conversation_start, kept in `options`.
    @property
    def partial_transcripts(self) -> bool:
        return bool(self.options.get("partial_transcripts", False))

    @property
    def stream_suggestions(self) -> bool:
        return bool(self.options.get("stream_suggestions", False))

    @property
    def opinion_prediction(self) -> bool:
        return bool(self.options.get("opinion_prediction", False))

    @property
    def has_context(self) -> bool:
        return bool(self.messages or self.scenario_description)

    def to_dict(self) -> JsonObject:
        return {**self.fields_dict(), "messages": [message.to_dict() for message in self.messages]}

    def fields_dict(self) -> JsonObject:
        """Everything but the messages, which the stores keep one row or list item each."""
        return {
            "session_id": self.session_id,
            "response_count": self.response_count,
            "scenario_description": self.scenario_description,
            "scenario_supplement": self.scenario_supplement,
            "modifications": list(self.modifications),
            "options": dict(self.options),
            "user_profile": self.user_profile,
            "target_profile": self.target_profile,
            "last_focus": list(self.last_focus),
            "last_opinion": self.last_opinion,
            "created_at": self.created_at,
            "last_activity": self.last_activity,
        }

    @classmethod
    def from_dict(cls, data: JsonObject) -> SessionState:
        return cls(
            session_id=str(data["session_id"]),
            response_count=int(data["response_count"]),
            scenario_description=str(data.get("scenario_description", "")),
            scenario_supplement=str(data.get("scenario_supplement", "")),
            messages=[StoredMessage.from_dict(item) for item in data.get("messages", [])],
            modifications=[str(item) for item in data.get("modifications", [])],
            options=dict(data.get("options") or {}),
            user_profile=data.get("user_profile"),
            target_profile=data.get("target_profile"),
            last_focus=[str(item) for item in data.get("last_focus", [])],
            last_opinion=str(data.get("last_opinion", "")),
            created_at=float(data["created_at"]),
            last_activity=float(data["last_activity"]),
        )


@dataclass(slots=True, eq=False)
class Attachment:
    """One connection's hold on one session, as granted by `SessionStore.attach`.

    `epoch` grows with every attach of the session, so a stale holder is told apart from the
    current one on any worker or instance. The store sets `taken_over` (for good) when another
    connection attached or the session was deleted or purged, and `events_waiting` when events
    were queued for this holder; the holder clears `events_waiting` and calls `drain_events`.
    Both signals arrive at once within a process and through Redis pub/sub, and within a poll
    interval (0.2 s) from another process sharing a SQLite file. Every write to the session by
    this process also brings `taken_over` up to date; `SessionStore.is_attached` asks the store.
    """

    session_id: str
    token: str
    epoch: int
    taken_over: asyncio.Event = field(default_factory=asyncio.Event)
    events_waiting: asyncio.Event = field(default_factory=asyncio.Event)
