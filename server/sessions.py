"""The sessions attached to this worker's connections: a cache of the session store, never its rival.

The store (server/store) is the one source of truth: every change is written there first, then
applied to the `Session` cached here, then confirmed to the client. A `Session` holds only what the
conversation is; the `Attachment` says whether this connection still holds it. Runtime state (open
recordings, running generations) lives with the connection and the generation manager.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from llm.interface import ContextMessage, ConversationContext, PersonProfile
from server.protocol import ErrorCode, Profile, ProtocolError
from server.store import Attachment, SessionState, StoredMessage


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

    @classmethod
    def from_state(cls, state: SessionState) -> Session:
        options = state.options
        return cls(
            session_id=state.session_id,
            response_count=state.response_count,
            scenario_description=state.scenario_description,
            scenario_supplement=state.scenario_supplement,
            messages=[Message(m.message_id, m.sender, m.content) for m in state.messages],
            modifications=list(state.modifications),
            partial_transcripts=bool(options.get("partial_transcripts", False)),
            stream_suggestions=bool(options.get("stream_suggestions", False)),
            opinion_prediction=bool(options.get("opinion_prediction", False)),
            last_focus=list(state.last_focus),
            last_opinion=state.last_opinion,
            user_profile=_profile(state.user_profile),
            target_profile=_profile(state.target_profile),
        )

    def to_state(self) -> SessionState:
        return SessionState(
            session_id=self.session_id,
            response_count=self.response_count,
            scenario_description=self.scenario_description,
            scenario_supplement=self.scenario_supplement,
            messages=[StoredMessage(m.message_id, m.sender, m.content, "history") for m in self.messages],
            modifications=list(self.modifications),
            options={
                "partial_transcripts": self.partial_transcripts,
                "stream_suggestions": self.stream_suggestions,
                "opinion_prediction": self.opinion_prediction,
            },
            user_profile=self.user_profile.given() if self.user_profile else None,
            target_profile=self.target_profile.given() if self.target_profile else None,
            last_focus=list(self.last_focus),
            last_opinion=self.last_opinion,
        )

    def add(self, message: StoredMessage) -> Message:
        """Cache a message the store has appended (with the id the store gave it)."""
        cached = Message(message.message_id, message.sender, message.content)
        self.messages.append(cached)
        return cached

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


def _profile(stored: dict[str, Any] | None) -> Profile | None:
    # Validated with the limits of its time when the client sent it; stored as `given()` wrote it.
    return None if stored is None else Profile.model_construct(**stored)


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


@dataclass(slots=True, eq=False)
class Held:
    """One session attached to one connection of this worker."""

    owner: str
    session: Session
    attachment: Attachment
    # Delivers events queued for this holder, notices a takeover, keeps the session from expiring.
    pump: asyncio.Task[None] | None = None
    # When activity that writes nothing (audio) last renewed the session's resume window.
    touched: float = field(default_factory=time.monotonic)

    @property
    def session_id(self) -> str:
        return self.session.session_id


class AttachedSessions:
    """The sessions held by this worker's connections, by (connection, session): during a takeover
    within one worker, the old and the new connection briefly hold the same session id."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, owner: str, session: Session, attachment: Attachment) -> Held:
        held = Held(owner, session, attachment)
        self._held[owner, session.session_id] = held
        return held

    def held(self, session_id: str, owner: str) -> Held | None:
        return self._held.get((owner, session_id))

    def get(self, session_id: str, owner: str) -> Session:
        """The session if `owner` holds it; anything else is reported as not found."""
        held = self._held.get((owner, session_id))
        if held is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, session_id=session_id)
        return held.session

    def held_by_another(self, session_id: str, owner: str) -> bool:
        return any(sid == session_id and who != owner for (who, sid) in self._held)

    def owned_by(self, owner: str) -> list[Held]:
        return [held for (who, _), held in self._held.items() if who == owner]

    def release(self, held: Held) -> bool:
        """Forget `held`; False if it was already forgotten (each release happens once)."""
        return self._held.pop((held.owner, held.session_id), None) is not None
