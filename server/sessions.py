"""The sessions attached to this worker's connections: a cache of the session store, never its rival.

The store (server/store) is the one source of truth: every change is written there first, then
applied to the `SessionState` cached here, then confirmed to the client. The cached state holds only
what the conversation is; the `Attachment` says whether this connection still holds it. Runtime state
(open recordings, running generations) lives with the connection and the generation manager.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from llm.interface import ContextMessage, ConversationContext, PersonProfile
from server.protocol import ErrorCode, ProtocolError
from server.store import Attachment, SessionState
from server.store.model import JsonObject


@dataclass(slots=True, eq=False)
class Held:
    """One session attached to one connection of this worker."""

    owner: str
    session: SessionState
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

    def hold(self, owner: str, session: SessionState, attachment: Attachment) -> Held:
        held = Held(owner, session, attachment)
        self._held[owner, session.session_id] = held
        return held

    def held(self, session_id: str, owner: str) -> Held | None:
        return self._held.get((owner, session_id))

    def get(self, session_id: str, owner: str) -> SessionState:
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


def generation_context(
    session: SessionState, *, focused: tuple[str, ...] = (), opinion: str = "", request_id: str = ""
) -> ConversationContext:
    """What a generation is asked about: the conversation as it stands."""
    return ConversationContext(
        scenario_description=session.scenario_description,
        scenario_supplement=session.scenario_supplement,
        messages=tuple(ContextMessage(m.message_id, m.sender, m.content) for m in session.messages),
        focused_message_ids=focused,
        user_opinion=opinion,
        modifications=tuple(session.modifications),
        response_count=session.response_count,
        user_profile=_person(session.user_profile),
        target_profile=_person(session.target_profile),
        session_id=session.session_id,
        request_id=request_id,
    )


def _person(profile: JsonObject | None) -> PersonProfile | None:
    # The profile as the client gave it (validated then, stored as `Profile.given()` wrote it).
    if profile is None:
        return None
    return PersonProfile(
        name=profile.get("name") or "",
        age=profile.get("age"),
        gender=profile.get("gender") or "",
        relations=tuple(profile.get("relations") or ()),
        personalities=tuple(profile.get("personalities") or ()),
        preferences=tuple(profile.get("preferences") or ()),
        taboos=tuple(profile.get("taboos") or ()),
        common_topics=tuple(profile.get("common_topics") or ()),
    )
