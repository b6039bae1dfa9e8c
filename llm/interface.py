"""What the server hands a suggestion provider, and the interface real and mock providers share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ContextMessage:
    message_id: str
    sender: str
    content: str


@dataclass(frozen=True, slots=True)
class PersonProfile:
    """Who a participant is (from the app's profile card); empty fields are unknown."""

    name: str = ""
    age: int | None = None
    gender: str = ""
    relations: tuple[str, ...] = ()
    personalities: tuple[str, ...] = ()
    preferences: tuple[str, ...] = ()
    taboos: tuple[str, ...] = ()
    common_topics: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConversationContext:
    """Everything a generation may use, copied from the session at request time."""

    scenario_description: str = ""
    scenario_supplement: str = ""
    messages: tuple[ContextMessage, ...] = ()
    focused_message_ids: tuple[str, ...] = ()
    user_opinion: str = ""
    modifications: tuple[str, ...] = ()
    response_count: int = 3
    user_profile: PersonProfile | None = None
    target_profile: PersonProfile | None = None
    session_id: str = ""
    request_id: str = ""


class SuggestionProvider(ABC):
    mode: str

    @abstractmethod
    async def opinions(self, context: ConversationContext) -> list[str]:
        """3-5 short stance keywords for the current state of the conversation."""

    @abstractmethod
    async def replies(self, context: ConversationContext) -> list[str]:
        """Exactly `context.response_count` complete replies in different styles."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """`{"status": ..., "mode": ...}`; never contains the key."""
