"""Turning provider output into suggestions, however loosely the model followed the requested JSON.

Models are asked for `{"suggestions": [...]}` but some ignore `response_format`: they wrap the JSON
in a Markdown code fence, return a bare array, or write a numbered or bulleted list. All of those
are accepted; anything else yields no suggestions, and the caller decides what that means (it
never invents text to fill the gap).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import orjson

FENCED = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.DOTALL)
NUMBERED = re.compile(r"^\s*[(（]?\d{1,2}\s*[.)）、:：]\s*(.+?)\s*$")
BULLETED = re.compile(r"^\s*(?:[-*+]\s+|[•·●▪]\s*)(.+?)\s*$")
# Keys models use for the list when they invent their own object shape, and for the text of an item.
LIST_KEYS = ("suggestions", "replies", "responses", "opinions", "keywords", "items")
TEXT_KEYS = ("text", "content", "reply", "response", "suggestion", "opinion", "keyword")
QUOTES = "\"'“”‘’「」『』"
# An opinion is a stance keyword (about 6 Chinese characters); anything much longer is a sentence.
OPINION_MAX_CHARS = 12
OPINION_TRAILING_PUNCTUATION = "。.!！?？,，;；、"


def parse_suggestions(text: str) -> list[str]:
    """The suggestions found in a model's answer, cleaned and de-duplicated, in order."""
    for value in _json_values(text):
        items = items_from_json(value)
        if items is not None:
            return clean_items(items)
    lines = text.splitlines()
    for pattern in (NUMBERED, BULLETED):
        listed = [match.group(1) for match in map(pattern.match, lines) if match]
        if listed:
            return clean_items(listed)
    return []


def clean_items(items: Iterable[str]) -> list[str]:
    """Trimmed, unquoted, non-empty and unique items in their original order."""
    cleaned: list[str] = []
    for item in items:
        text = " ".join(item.split()).strip(QUOTES).strip()
        if text and text not in cleaned:
            cleaned.append(text)
    return cleaned


def clean_opinions(items: Iterable[str]) -> list[str]:
    """Opinion keywords without trailing punctuation; sentences posing as keywords are rejected."""
    keywords = (item.rstrip(OPINION_TRAILING_PUNCTUATION).strip() for item in items)
    return clean_items(keyword for keyword in keywords if len(keyword) <= OPINION_MAX_CHARS)


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON value found in the answer: the whole text, a fenced block, the outermost braces or brackets."""
    for candidate in _json_candidates(text):
        try:
            yield orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue


def _json_candidates(text: str) -> Iterable[str]:
    stripped = text.strip()
    yield stripped
    for match in FENCED.finditer(stripped):
        yield match.group(1)
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = stripped.find(opening), stripped.rfind(closing)
        if 0 <= start < end:
            yield stripped[start : end + 1]


def items_from_json(value: Any) -> list[str] | None:
    """The list of suggestion texts in a parsed answer, wherever the model put it; None if there is none."""
    if isinstance(value, list):
        return texts(value)
    if isinstance(value, dict):
        for key in LIST_KEYS:
            if isinstance(value.get(key), list):
                return texts(value[key])
        lists = [item for item in value.values() if isinstance(item, list)]
        if len(lists) == 1:
            return texts(lists[0])
    return None


def texts(values: list[Any]) -> list[str]:
    """The text of each item: a string, or an object's text field."""
    texts: list[str] = []
    for value in values:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            text = next((value[key] for key in TEXT_KEYS if isinstance(value.get(key), str)), None)
            if text is not None:
                texts.append(text)
    return texts


PREDICTION_FIELDS = ("tendency", "mood", "tone")
PREDICTION_MAX_CHARS = 40


def parse_prediction(text: str) -> dict[str, str] | None:
    """The three fields of a reaction prediction, each one short line; None unless all three are there."""
    for value in _json_values(text):
        if not isinstance(value, dict):
            continue
        fields = {name: " ".join(str(value.get(name) or "").split()).strip(QUOTES) for name in PREDICTION_FIELDS}
        if all(fields.values()):
            return {name: field[:PREDICTION_MAX_CHARS] for name, field in fields.items()}
    return None


async def sse_data(lines: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The `data` payloads of a server-sent event stream, one per event.

    Comment lines (OpenRouter sends `: OPENROUTER PROCESSING` while a model warms up) and fields
    other than `data` are skipped; an event's several `data` lines are joined with newlines.
    """
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)
