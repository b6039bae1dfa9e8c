"""The labelled mock provider, used only when OPENROUTER_API_KEY is unset.

Every suggestion starts with "[模拟]" so that a developer never mistakes it for a generated reply.
It prepares no speculative replies: with no provider wait to save, it would only change which
path a front-end developer exercises.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llm.interface import ConversationContext, PartialSink, Prediction, SuggestionProvider

MOCK_OPINIONS = ("[模拟]同意", "[模拟]反对", "[模拟]再想想", "[模拟]多了解")
MOCK_REPLY_STYLES = ("直接", "礼貌", "幽默", "反问", "简短")
MOCK_PREDICTION = Prediction(tendency="[模拟]可能同意", mood="[模拟]平静", tone="[模拟]温和")


class MockProvider(SuggestionProvider):
    mode = "mock"

    def __init__(self, delay_seconds: float = 0.0) -> None:
        self.delay_seconds = delay_seconds

    async def opinions(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        await asyncio.sleep(self.delay_seconds)
        return await _handed_on(list(MOCK_OPINIONS), on_partial)

    async def replies(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        await asyncio.sleep(self.delay_seconds)
        last = context.messages[-1].content if context.messages else ""
        about = f"关于“{last[:20]}”" if last else ""
        replies = [
            f"[模拟·{style}] 这是{about}的第 {index + 1} 条示例回复（未配置 OPENROUTER_API_KEY）"
            for index, style in enumerate(MOCK_REPLY_STYLES[: context.response_count])
        ]
        return await _handed_on(replies, on_partial)

    async def predict_reaction(self, context: ConversationContext) -> Prediction:
        await asyncio.sleep(self.delay_seconds)
        return MOCK_PREDICTION

    def health(self) -> dict[str, Any]:
        return {"status": "healthy", "mode": self.mode, "configured": False}


async def _handed_on(suggestions: list[str], on_partial: PartialSink | None) -> list[str]:
    if on_partial is not None:
        for index, text in enumerate(suggestions):
            await on_partial(index, text)
    return suggestions
