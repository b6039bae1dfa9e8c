"""The OpenRouter client's streamed suggestions, speculative request and prediction, against the local fake provider."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from harness.fake_openrouter import FakeOpenRouter, Reply
from llm.errors import LlmBadResponse, LlmConnectionError
from llm.interface import Prediction
from llm.openrouter import OpenRouterProvider
from tests.support.contexts import CONTEXT

KEY = "sk-test-streaming-3c5e7a9b1d2f4a6c"


pytestmark = pytest.mark.usefixtures("fresh_fake")


@pytest.fixture
async def provider(fake: FakeOpenRouter) -> AsyncIterator[OpenRouterProvider]:
    client = OpenRouterProvider(
        api_key=KEY, base_url=fake.url, model="test/stream", timeout=10.0, max_retries=2, backoff_initial=0.01
    )
    await client.start()
    yield client
    await client.close()


class Partials:
    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []

    async def __call__(self, index: int, text: str) -> None:
        self.items.append((index, text))

    @property
    def texts(self) -> list[str]:
        assert [index for index, _ in self.items] == list(range(len(self.items))), "indexes in order, no gaps"
        return [text for _, text in self.items]


@pytest.mark.parametrize("streams", [True, False], ids=["sse", "provider-ignores-stream"])
async def test_partials_are_the_final_list_in_order(
    fake: FakeOpenRouter, provider: OpenRouterProvider, streams: bool
) -> None:
    fake.queue(Reply(suggestions=["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"], streams=streams))
    partials = Partials()
    final = await provider.replies(CONTEXT, on_partial=partials)
    assert final == ["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"]
    assert partials.texts == final
    assert fake.requests[0].body["stream"] is True


async def test_each_partial_is_handed_on_before_the_answer_is_complete(
    fake: FakeOpenRouter, provider: OpenRouterProvider
) -> None:
    fake.queue(Reply(suggestions=["第一条回复内容", "第二条回复内容", "第三条回复内容"], tokens_per_second=400))
    finished_when_first_arrived: list[bool] = []

    async def on_partial(index: int, text: str) -> None:
        if index == 0:
            finished_when_first_arrived.append(fake.requests[0].handled_seconds > 0)

    await provider.replies(CONTEXT, on_partial=on_partial)
    assert finished_when_first_arrived == [False]


async def test_cut_extras_and_loose_formats_stream_the_same_list(fake: FakeOpenRouter, provider: OpenRouterProvider):
    fake.queue(Reply(suggestions=["一", "二", "二", "三", "四"]))
    partials = Partials()
    assert await provider.replies(CONTEXT, on_partial=partials) == ["一", "二", "三"]
    assert partials.texts == ["一", "二", "三"]
    fake.queue(Reply(content="1. 好的\n2. 谢谢\n3. 为什么？"))
    partials = Partials()
    assert await provider.replies(CONTEXT, on_partial=partials) == ["好的", "谢谢", "为什么？"]
    assert partials.texts == ["好的", "谢谢", "为什么？"]


async def test_a_short_streamed_answer_continues_with_the_follow_up(fake: FakeOpenRouter, provider: OpenRouterProvider):
    fake.queue(Reply(suggestions=["好的"]), Reply(suggestions=["谢谢", "为什么？"]))
    partials = Partials()
    assert await provider.replies(CONTEXT, on_partial=partials) == ["好的", "谢谢", "为什么？"]
    assert partials.texts == ["好的", "谢谢", "为什么？"]
    assert len(fake.requests) == 2 and fake.requests[1].body["stream"] is True


async def test_a_stream_broken_after_a_partial_is_not_retried(fake: FakeOpenRouter, provider: OpenRouterProvider):
    # Retrying would hand the client a second, different list under the same request.
    broken = Reply(suggestions=["好的", "谢谢", "为什么？"], drop_after_chars=24)
    fake.queue(broken, Reply())
    partials = Partials()
    with pytest.raises(LlmConnectionError):
        await provider.replies(CONTEXT, on_partial=partials)
    assert len(fake.requests) == 1
    assert partials.texts == ["好的"]


async def test_a_stream_broken_before_any_partial_is_retried(fake: FakeOpenRouter, provider: OpenRouterProvider):
    fake.queue(
        Reply(suggestions=["好的", "谢谢", "为什么？"], drop_after_chars=8), Reply(suggestions=["一", "二", "三"])
    )
    partials = Partials()
    assert await provider.replies(CONTEXT, on_partial=partials) == ["一", "二", "三"]
    assert partials.texts == ["一", "二", "三"]
    assert len(fake.requests) == 2


# -- speculation ---------------------------------------------------------------------------------


class Prepared:
    def __init__(self) -> None:
        self.keywords: list[str] = []
        self.lists: dict[str, list[str]] = {}
        self.keywords_before_end: bool | None = None
        self.fake: FakeOpenRouter | None = None

    async def on_keywords(self, keywords: list[str]) -> None:
        self.keywords = keywords
        if self.fake is not None:
            self.keywords_before_end = self.fake.requests[0].handled_seconds == 0

    def on_prepared(self, opinion: str, replies: list[str]) -> None:
        assert opinion not in self.lists, "each list is handed on once"
        self.lists[opinion] = replies


async def test_one_streamed_request_gives_keywords_first_then_replies_for_each(
    fake: FakeOpenRouter, provider: OpenRouterProvider
) -> None:
    fake.queue(Reply(suggestions=["同意", "不想换药", "再想想"], tokens_per_second=2000))
    prepared = Prepared()
    prepared.fake = fake
    partials = Partials()
    await provider.opinions_with_replies(CONTEXT, prepared.on_keywords, prepared.on_prepared, partials)
    [request] = fake.requests
    assert request.task == "opinions_with_replies" and request.body["stream"] is True
    assert request.schema_items == (3, 5)
    assert request.properties["no_opinion_replies"]["minItems"] == CONTEXT.response_count
    assert prepared.keywords == ["同意", "不想换药", "再想想"] == partials.texts
    assert prepared.keywords_before_end is True, "keywords are handed on while the replies are still written"
    answer = json.loads(request.answer)
    expected = {group["opinion"]: group["suggestions"] for group in answer["replies"]}
    expected[""] = answer["no_opinion_replies"]
    assert prepared.lists == expected
    assert all(len(replies) == CONTEXT.response_count for replies in prepared.lists.values())


async def test_prepared_lists_that_are_not_exact_are_dropped_never_padded(
    fake: FakeOpenRouter, provider: OpenRouterProvider
) -> None:
    answer = {
        "suggestions": ["同意", "反对", "再想想"],
        "replies": [
            {"opinion": "同意", "suggestions": ["好的", "行", "没问题"]},
            {"opinion": "反对", "suggestions": ["不行", "不要"]},
            {"opinion": "没提过的观点", "suggestions": ["一", "二", "三"]},
            {"opinion": "再想想", "suggestions": ["等等", "让我想想", "等等", "稍后再说", "好吧"]},
        ],
        "no_opinion_replies": ["嗯", "哦"],
    }
    fake.queue(Reply(content=json.dumps(answer, ensure_ascii=False)))
    prepared = Prepared()
    await provider.opinions_with_replies(CONTEXT, prepared.on_keywords, prepared.on_prepared)
    assert prepared.keywords == ["同意", "反对", "再想想"]
    assert prepared.lists == {"同意": ["好的", "行", "没问题"], "再想想": ["等等", "让我想想", "稍后再说"]}


async def test_too_few_keywords_get_the_usual_follow_up(fake: FakeOpenRouter, provider: OpenRouterProvider):
    fake.queue(Reply(content='{"suggestions": ["同意"], "replies": [], "no_opinion_replies": []}'))
    fake.queue(Reply(suggestions=["反对", "再想想"]))
    prepared = Prepared()
    await provider.opinions_with_replies(CONTEXT, prepared.on_keywords, prepared.on_prepared)
    assert prepared.keywords == ["同意", "反对", "再想想"]
    assert prepared.lists == {}
    assert [request.task for request in fake.requests] == ["opinions_with_replies", "opinions"]


async def test_cancelling_the_speculative_request_drops_it_at_the_provider(
    fake: FakeOpenRouter, provider: OpenRouterProvider
) -> None:
    fake.queue(Reply(tokens_per_second=20))
    prepared = Prepared()
    keywords_seen = asyncio.Event()

    async def on_keywords(keywords: list[str]) -> None:
        keywords_seen.set()

    call = asyncio.create_task(provider.opinions_with_replies(CONTEXT, on_keywords, prepared.on_prepared))
    await asyncio.wait_for(keywords_seen.wait(), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.to_thread(fake.wait_for_disconnect, 10)


# -- prediction ------------------------------------------------------------------------------------


async def test_prediction_asks_for_three_fields_and_returns_them(fake: FakeOpenRouter, provider: OpenRouterProvider):
    context = replace(CONTEXT, messages=(*CONTEXT.messages,))
    prediction = await provider.predict_reaction(context)
    assert prediction == Prediction(tendency="可能同意", mood="平静", tone="温和")
    [request] = fake.requests
    assert request.task == "prediction"
    assert set(request.properties) == {"tendency", "mood", "tone"}
    assert "预测对方" in request.prompt and "那药要不要换一下？" in request.prompt


async def test_a_prediction_missing_a_field_is_a_bad_response(fake: FakeOpenRouter, provider: OpenRouterProvider):
    fake.queue(Reply(content='{"tendency": "同意", "mood": ""}'))
    with pytest.raises(LlmBadResponse):
        await provider.predict_reaction(CONTEXT)
