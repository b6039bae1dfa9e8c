"""What the server hands a suggestion provider, and the interface real and mock providers share."""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson


class Task(StrEnum):
    """What a generation produces; the server runs at most one of each per session."""

    OPINIONS = "opinions"
    REPLIES = "replies"
    PREDICTION = "prediction"


@dataclass(frozen=True, slots=True)
class ContextMessage:
    message_id: str
    sender: str
    content: str


# Fields that name a request rather than describe the conversation: two contexts that differ only
# in these ask the provider the same question.
IDENTITY_FIELDS = frozenset({"session_id", "request_id"})


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

    def fingerprint(self) -> str:
        """A digest of everything the provider sees: equal only for the exact same question.

        Every field counts except the session and request ids, so a field added later is covered
        without touching this method.
        """
        content = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in IDENTITY_FIELDS
        }
        return hashlib.blake2b(orjson.dumps(content), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class Prediction:
    """How the partner is likely to react to what the user just said."""

    tendency: str
    mood: str
    tone: str


# Called once per suggestion as soon as it is complete: its index in the final list and its text.
PartialSink = Callable[[int, str], Awaitable[None]]
# Called once with the final keyword list, as soon as it is known.
KeywordSink = Callable[[list[str]], Awaitable[None]]
# Called with ready-made replies for one opinion ("" = no opinion), exactly `response_count` of them.
PreparedSink = Callable[[str, list[str]], None]


class SuggestionProvider(ABC):
    mode: str

    @abstractmethod
    async def opinions(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        """3-5 short stance keywords for the current state of the conversation."""

    @abstractmethod
    async def replies(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        """Exactly `context.response_count` complete replies in different styles."""

    @abstractmethod
    async def predict_reaction(self, context: ConversationContext) -> Prediction:
        """The partner's likely reaction to the latest message (the user's chosen reply)."""

    async def opinions_with_replies(
        self,
        context: ConversationContext,
        on_keywords: KeywordSink,
        on_prepared: PreparedSink,
        on_partial: PartialSink | None = None,
    ) -> None:
        """Keywords as `opinions` gives them, handed to `on_keywords` as soon as they are known;
        then, where the provider can, replies prepared for each keyword and for no opinion.

        This default prepares nothing: a provider without speculation only finds the keywords.
        """
        await on_keywords(await self.opinions(context, on_partial))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """`{"status": ..., "mode": ...}`; never contains the key."""
