"""Suggestions out of an answer that is still being written, each handed on as soon as it is complete.

A streamed answer is re-read as a whole after every piece with pydantic-core's partial JSON mode,
which returns every value that is complete so far (an unfinished string is left out), so a
suggestion is only ever handed on whole. Cleaning is the same as for a whole answer and keeps
order, so what is handed on piece by piece is exactly the start of the final list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
from pydantic_core import from_json

from llm.interface import KeywordSink, PartialSink, PreparedSink
from llm.parsing import clean_items, clean_opinions, items_from_json, parse_suggestions, texts

Cleaner = Callable[[Iterable[str]], list[str]]


def partial_document(text: str) -> Any:
    """What is complete so far of a JSON answer being written; None if it is not JSON (yet or at all)."""
    try:
        return from_json(text, allow_partial=True)
    except ValueError:
        return None


def _closes_with(text: str, closing: str) -> bool:
    """Whether `text` (an unfinished JSON document) is complete once `closing` is appended."""
    try:
        orjson.loads(text.rstrip().removesuffix(",") + closing)
    except orjson.JSONDecodeError:
        return False
    return True


class SuggestionStream:
    """The suggestions of one generation, handed to `on_partial` one by one (index, text).

    A generation may take a second answer (the follow-up asking for missing ones): `next_answer`
    keeps what the first gave and continues the numbering with what the next one adds.
    """

    def __init__(self, clean: Cleaner, maximum: int, on_partial: PartialSink | None) -> None:
        self.items: list[str] = []
        self._clean = clean
        self._maximum = maximum
        self._on_partial = on_partial
        self._base: list[str] = []

    @property
    def streams(self) -> bool:
        """Whether anyone waits for the suggestions one by one (else the answer may come whole)."""
        return self._on_partial is not None

    def answer_started(self) -> bool:
        """Whether something of the current answer has been handed on."""
        return len(self.items) > len(self._base)

    def next_answer(self) -> None:
        self._base = list(self.items)

    async def finish_answer(self, text: str) -> None:
        """The current answer is complete: hand on what the piecewise reading missed, including a
        loosely formatted answer (a numbered list, a fenced block), which is only understood whole."""
        await self.feed(text)
        if not self.answer_started():
            await self.complete(self._clean([*self._base, *parse_suggestions(text)])[: self._maximum])

    async def feed(self, text: str) -> None:
        raw = items_from_json(partial_document(text))
        if raw:
            await self.offer(raw)

    async def offer(self, raw: list[str]) -> None:
        """`raw` is every complete item of the current answer so far."""
        candidate = self._clean([*self._base, *raw])[: self._maximum]
        await self.complete(candidate)

    async def complete(self, final: list[str]) -> None:
        """Hand on whatever of `final` was not handed on yet (`final` starts with what was)."""
        for item in final[len(self.items) :]:
            self.items.append(item)
            if self._on_partial is not None:
                await self._on_partial(len(self.items) - 1, item)


class PreparedRepliesStream:
    """The answer to the speculative request: keywords first, then replies prepared per keyword.

    The keywords go to `on_keywords` as soon as their list is closed (a later key has begun); each
    keyword's replies go to `on_prepared` once that group is closed, and only when the group names
    an offered keyword and holds exactly `response_count` usable replies: nothing is made up or padded.
    """

    def __init__(
        self,
        response_count: int,
        keywords: SuggestionStream,
        on_keywords: KeywordSink,
        on_prepared: PreparedSink,
    ) -> None:
        self.response_count = response_count
        self.keywords = keywords
        self.offered: list[str] | None = None
        self._on_keywords = on_keywords
        self._on_prepared = on_prepared
        self._handled: set[str] = set()

    async def feed(self, text: str, *, whole: bool = False) -> None:
        document = partial_document(text)
        if not isinstance(document, dict):
            return
        keys = list(document)
        # The last value written so far is complete when the text needs only its closing brace.
        last_complete = whole or _closes_with(text, "}")

        def closed(key: str) -> bool:
            return key in document and (keys[-1] != key or last_complete)

        raw_keywords = document.get("suggestions")
        if self.offered is None and isinstance(raw_keywords, list):
            await self.keywords.offer(texts(raw_keywords))
            if closed("suggestions"):
                self.offered = list(self.keywords.items)
                await self._on_keywords(self.offered)
        groups = document.get("replies")
        if self.offered is not None and isinstance(groups, list):
            last_group_complete = closed("replies") or (keys[-1] == "replies" and _closes_with(text, "]}"))
            for position, group in enumerate(groups):
                if isinstance(group, dict) and (position < len(groups) - 1 or last_group_complete):
                    self._prepare_group(group)
        no_opinion = document.get("no_opinion_replies")
        if closed("no_opinion_replies") and isinstance(no_opinion, list):
            self._prepare("", no_opinion)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        opinion = clean_opinions([group["opinion"]]) if isinstance(group.get("opinion"), str) else []
        replies = group.get("suggestions")
        if opinion and self.offered and opinion[0] in self.offered and isinstance(replies, list):
            self._prepare(opinion[0], replies)

    def _prepare(self, opinion: str, raw: list[Any]) -> None:
        if opinion in self._handled:
            return
        self._handled.add(opinion)
        replies = clean_items(texts(raw))[: self.response_count]
        if len(replies) == self.response_count:
            self._on_prepared(opinion, replies)
