"""Sessions as plain data, and the store that knows which connection owns which session.

A `Session` holds no tasks, sockets or streams, only what the conversation is, so a later store
can persist it and resume it across reconnects and restarts. Runtime state (open recordings,
running generations) lives with the connection and the generation manager.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from llm.interface import ContextMessage, ConversationContext, PersonProfile
from server.protocol import ErrorCode, Profile, ProtocolError

MessageKind = Literal["history", "recorded", "selected"]
ID_PREFIX: dict[MessageKind, str] = {"recorded": "msg", "selected": "usr", "history": "msg"}
PROBE_OWNER = "readiness-probe"


@dataclass(slots=True)
class Message:
    message_id: str
    sender: str
    content: str


@dataclass(slots=True)
class Session:
    session_id: str
    response_count: int
    scenario_description: str = ""
    scenario_supplement: str = ""
    messages: list[Message] = field(default_factory=list)
    modifications: list[str] = field(default_factory=list)
    partial_transcripts: bool = False
    stream_suggestions: bool = False
    opinion_prediction: bool = False
    last_focus: list[str] = field(default_factory=list)
    last_opinion: str = ""
    user_profile: Profile | None = None
    target_profile: Profile | None = None
    message_ids: set[str] = field(default_factory=set)

    def add_message(self, sender: str, content: str, kind: MessageKind, message_id: str = "") -> Message:
        """Append a message; a new id is `msg_NNN`/`usr_NNN` with NNN its 1-based position, or the
        next free number when a history message already holds that id."""
        if not message_id:
            position = len(self.messages) + 1
            while (message_id := f"{ID_PREFIX[kind]}_{position:03d}") in self.message_ids:
                position += 1
        message = Message(message_id, sender, content)
        self.messages.append(message)
        self.message_ids.add(message_id)
        return message

    @property
    def has_context(self) -> bool:
        return bool(self.messages or self.scenario_description)

    def context(self, *, focused: tuple[str, ...] = (), opinion: str = "", request_id: str = "") -> ConversationContext:
        return ConversationContext(
            scenario_description=self.scenario_description,
            scenario_supplement=self.scenario_supplement,
            messages=tuple(ContextMessage(m.message_id, m.sender, m.content) for m in self.messages),
            focused_message_ids=focused,
            user_opinion=opinion,
            modifications=tuple(self.modifications),
            response_count=self.response_count,
            user_profile=_person(self.user_profile),
            target_profile=_person(self.target_profile),
            session_id=self.session_id,
            request_id=request_id,
        )


def _person(profile: Profile | None) -> PersonProfile | None:
    if profile is None:
        return None
    return PersonProfile(
        name=profile.name or "",
        age=profile.age,
        gender=profile.gender or "",
        relations=tuple(profile.relations or ()),
        personalities=tuple(profile.personalities or ()),
        preferences=tuple(profile.preferences or ()),
        taboos=tuple(profile.taboos or ()),
        common_topics=tuple(profile.common_topics or ()),
    )


class SessionStore:
    """In-memory sessions of one worker, each owned by exactly one connection."""

    def __init__(self, max_ended_per_owner: int) -> None:
        self._sessions: dict[str, Session] = {}
        self._owners: dict[str, str] = {}
        # The sessions each connection ended, newest last, so that their ids answer SESSION_EXPIRED;
        # bounded, so a connection that starts and ends sessions for ever holds no growing list.
        self._ended: dict[str, deque[str]] = {}
        self._max_ended = max_ended_per_owner

    def __len__(self) -> int:
        return len(self._sessions)

    def health(self) -> str:
        """A probe session goes through create, get and end, and every live session has exactly one owner."""
        probe = self.create(PROBE_OWNER, 1)
        try:
            found = self.get(probe.session_id, PROBE_OWNER) is probe
        finally:
            self.end(probe.session_id)
            self._ended.pop(PROBE_OWNER, None)
        consistent = self._sessions.keys() == self._owners.keys()
        return "healthy" if found and consistent else "degraded"

    def create(self, owner: str, response_count: int, scenario_description: str = "") -> Session:
        session = Session(str(uuid.uuid4()), response_count, scenario_description)
        self._sessions[session.session_id] = session
        self._owners[session.session_id] = owner
        return session

    def get(self, session_id: str, owner: str) -> Session:
        """The session if `owner` owns it; another connection's session is reported as not found."""
        if self._owners.get(session_id) == owner:
            return self._sessions[session_id]
        if session_id in self._ended.get(owner, ()):
            raise ProtocolError(ErrorCode.SESSION_EXPIRED, session_id=session_id)
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, session_id=session_id)

    def end(self, session_id: str) -> None:
        owner = self._owners.pop(session_id, None)
        self._sessions.pop(session_id, None)
        if owner is not None:
            self._ended.setdefault(owner, deque(maxlen=self._max_ended)).append(session_id)

    def owned_by(self, owner: str) -> list[str]:
        return [sid for sid, who in self._owners.items() if who == owner]

    def forget_owner(self, owner: str) -> None:
        """Drop everything a closed connection owned, ended sessions included."""
        for session_id in self.owned_by(owner):
            self.end(session_id)
        self._ended.pop(owner, None)
