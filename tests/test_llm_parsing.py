"""Suggestions are recovered from the ways models actually answer, and nothing is made up."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from llm.parsing import clean_opinions, parse_suggestions, sse_data

EXPECTED = ["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]


@pytest.mark.parametrize(
    "answer",
    [
        '{"suggestions": ["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]}',
        '```json\n{"suggestions": ["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]}\n```',
        '```\n["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]\n```',
        '["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]',
        '以下是回复：\n["好的，我明天上午过来。", "谢谢您，我会准时到的。", "明天几点比较方便？"]\n希望有帮助。',
        '{"replies": [{"style": "直接", "text": "好的，我明天上午过来。"},'
        ' {"style": "礼貌", "text": "谢谢您，我会准时到的。"},'
        ' {"style": "反问", "text": "明天几点比较方便？"}]}',
        "1. 好的，我明天上午过来。\n2. 谢谢您，我会准时到的。\n3. 明天几点比较方便？",
        "回复如下：\n1、“好的，我明天上午过来。”\n2）谢谢您，我会准时到的。\n（3）明天几点比较方便？",
        "- 好的，我明天上午过来。\n- 谢谢您，我会准时到的。\n- 明天几点比较方便？",
        "• 好的，我明天上午过来。\n* 谢谢您，我会准时到的。\n• 明天几点比较方便？",
    ],
    ids=[
        "json",
        "fenced-json",
        "fenced-array",
        "bare-array",
        "array-in-prose",
        "objects-with-text",
        "numbered",
        "numbered-chinese",
        "dashes",
        "bullets",
    ],
)
def test_loosely_formatted_answers_yield_the_suggestions(answer: str) -> None:
    assert parse_suggestions(answer) == EXPECTED


def test_prose_without_a_list_yields_nothing() -> None:
    assert parse_suggestions("抱歉，我无法回答这个问题。") == []
    assert parse_suggestions("") == []


def test_items_are_trimmed_unquoted_and_unique() -> None:
    answer = '{"suggestions": ["  好的 ", "", "\\"好的\\"", "   ", "不用了\\n谢谢"]}'
    assert parse_suggestions(answer) == ["好的", "不用了 谢谢"]


def test_opinions_lose_trailing_punctuation_and_sentences_are_rejected() -> None:
    opinions = clean_opinions(["同意。", "  反对 ", "", "再考虑一下！", "我觉得这个方案整体上还可以但是价格太高了"])
    assert opinions == ["同意", "反对", "再考虑一下"]


async def _lines(*lines: bytes) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def test_sse_data_joins_multiline_events_and_skips_comments() -> None:
    stream = _lines(
        b": OPENROUTER PROCESSING\n",
        b"\n",
        b'data: {"a":\n',
        b"data: 1}\n",
        b"\n",
        b"event: ignored\r\n",
        b"data:[DONE]\r\n",
        b"\r\n",
        b"data: tail-without-blank-line\n",
    )
    assert [data async for data in sse_data(stream)] == ['{"a":\n1}', "[DONE]", "tail-without-blank-line"]
