"""Turning Vosk segment texts into one message text."""

from __future__ import annotations

import re

# Vosk separates every word with a space; Chinese text is written without them.
_SPACE_BETWEEN_CJK = re.compile(
    r"(?<=[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef])\s+(?=[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef])"
)


def join_segments(segments: list[str]) -> str:
    text = " ".join(segment.strip() for segment in segments if segment.strip())
    return _SPACE_BETWEEN_CJK.sub("", text)
