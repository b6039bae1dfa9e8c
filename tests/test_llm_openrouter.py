"""The OpenRouter client against a local OpenAI-compatible server: request shape, answers, failures, retries."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from harness.fake_openrouter import FakeOpenRouter, Reply
from harness.server import free_port
from llm.errors import (
    LlmAuthError,
    LlmBadResponse,
    LlmConnectionError,
    LlmError,
    LlmRateLimited,
    LlmStatusError,
    LlmTimeout,
)
from llm.interface import ContextMessage, ConversationContext
from llm.openrouter import HttpCallRecord, OpenRouterProvider
from tests.support.contexts import CONTEXT

KEY = "sk-test-unit-9f3b1c7d5e2a4b6c8d0e"
SITE_URL = "https://example.org/dialogue"
APP_NAME = "Dialogue Assistant Tests"

MakeProvider = Callable[..., Awaitable[OpenRouterProvider]]


pytestmark = pytest.mark.usefixtures("fresh_fake")


@pytest.fixture
async def make_provider(fake: FakeOpenRouter) -> AsyncIterator[MakeProvider]:
    started: list[OpenRouterProvider] = []

    async def make(**overrides: Any) -> OpenRouterProvider:
        options: dict[str, Any] = {
            "api_key": KEY,
            "base_url": fake.url,
            "model": "test/model-a",
            "temperature": 0.3,
            "max_tokens": 321,
            "timeout": 10.0,
            "max_retries": 2,
            "site_url": SITE_URL,
            "app_name": APP_NAME,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            **overrides,
        }
        provider = OpenRouterProvider(**options)
        await provider.start()
        started.append(provider)
        return provider

    yield make
    for provider in started:
        await provider.close()


# -- request shape ------------------------------------------------------------------------------


async def test_request_carries_key_attribution_model_and_schema(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    await provider.replies(CONTEXT)
    [request] = fake.requests
    assert request.path == "/api/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["http-referer"] == SITE_URL
    assert request.headers["x-title"] == APP_NAME
    assert request.headers["content-type"].startswith("application/json")
    assert request.body["model"] == "test/model-a"
    assert request.body["temperature"] == 0.3
    assert request.body["max_tokens"] == 321
    assert "stream" not in request.body
    assert request.body["response_format"]["type"] == "json_schema"
    assert request.task == "replies"
    assert request.schema_items == (3, 3)


async def test_attribution_referer_is_omitted_when_no_site_url(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider(site_url="")
    await provider.replies(CONTEXT)
    assert "http-referer" not in fake.requests[0].headers
    assert fake.requests[0].headers["x-title"] == APP_NAME


async def test_whole_context_reaches_the_prompt(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    await provider.replies(CONTEXT)
    prompt = fake.requests[0].prompt
    for expected in (
        "在社区医院复诊",
        "医生比较忙",
        "[msg_001] 医生：最近睡得怎么样？",
        "[usr_002] 我：还是经常半夜醒。",
        "[msg_003] 医生：那药要不要换一下？ ★重点",
        "不想换药",
        "1. 语气再委婉一点",
        "2. 提一下副作用",
    ):
        assert expected in prompt, expected


async def test_prompt_history_is_trimmed_to_the_budget(fake: FakeOpenRouter, make_provider: MakeProvider):
    messages = tuple(ContextMessage(f"msg_{n:03d}", "对方", f"旧消息{n:03d}" + "啊" * 60) for n in range(1, 41))
    context = ConversationContext(
        scenario_description="在火车站问路", messages=messages, focused_message_ids=("msg_005",), response_count=2
    )
    provider = await make_provider(prompt_char_budget=2400)
    await provider.replies(context)
    prompt = fake.requests[0].prompt
    assert "在火车站问路" in prompt
    assert "旧消息005" in prompt and "旧消息040" in prompt
    assert "旧消息001" not in prompt and "旧消息020" not in prompt
    assert len(prompt) <= 2400
    assert "条较早的消息" in prompt


# -- answers --------------------------------------------------------------------------------------


async def test_replies_are_exactly_the_response_count(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(suggestions=["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"]))
    assert await provider.replies(CONTEXT) == ["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"]


async def test_extra_replies_are_cut(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(suggestions=["一", "二", "三", "四", "五"]))
    assert await provider.replies(CONTEXT) == ["一", "二", "三"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "content",
    [
        '```json\n{"suggestions": ["好的", "谢谢", "为什么？"]}\n```',
        '["好的", "谢谢", "为什么？"]',
        "1. 好的\n2. 谢谢\n3. 为什么？",
        "- 好的\n- 谢谢\n- 为什么？",
    ],
    ids=["fenced-json", "bare-array", "numbered", "bulleted"],
)
async def test_loosely_formatted_answers_are_accepted(
    fake: FakeOpenRouter, make_provider: MakeProvider, content: str
) -> None:
    provider = await make_provider()
    fake.queue(Reply(content=content))
    assert await provider.replies(CONTEXT) == ["好的", "谢谢", "为什么？"]


async def test_too_few_replies_get_one_follow_up_for_the_missing_ones(
    fake: FakeOpenRouter, make_provider: MakeProvider
) -> None:
    provider = await make_provider()
    fake.queue(Reply(suggestions=["好的"]), Reply(suggestions=["谢谢", "为什么？"]))
    assert await provider.replies(CONTEXT) == ["好的", "谢谢", "为什么？"]
    first, follow_up = fake.requests
    assert follow_up.schema_items == (2, 2)
    assert follow_up.body["messages"][:2] == first.body["messages"]
    assert follow_up.body["messages"][2]["role"] == "assistant"
    assert "好的" in follow_up.body["messages"][2]["content"]


async def test_an_empty_answer_is_asked_again_unchanged(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(content=""), Reply(suggestions=["好", "行", "嗯？"]))
    assert await provider.replies(CONTEXT) == ["好", "行", "嗯？"]
    first, again = fake.requests
    assert again.body["messages"] == first.body["messages"]


async def test_content_given_as_typed_parts_is_read(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    parts = [{"type": "text", "text": '{"suggestions": ["好", '}, {"type": "text", "text": '"行", "嗯？"]}'}]
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": parts}}]}
    fake.queue(Reply(body=json.dumps(answer).encode()))
    assert await provider.replies(CONTEXT) == ["好", "行", "嗯？"]


@pytest.mark.parametrize(
    "answers",
    [
        [Reply(suggestions=["好的"]), Reply(suggestions=["好的"])],
        [Reply(content="抱歉，我无法回答。"), Reply(content="抱歉。")],
        [Reply(suggestions=[]), Reply(suggestions=["", "  "])],
    ],
    ids=["duplicate", "prose", "empty"],
)
async def test_still_too_few_after_the_follow_up_is_an_error_not_padding(
    fake: FakeOpenRouter, make_provider: MakeProvider, answers: list[Reply]
) -> None:
    provider = await make_provider()
    fake.queue(*answers)
    with pytest.raises(LlmBadResponse):
        await provider.replies(CONTEXT)
    assert len(fake.requests) == 2


async def test_opinions_are_three_to_five_trimmed_keywords(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(suggestions=[" 同意 ", "", "反对。", "再想想", "   ", "问清楚", "先试试", "看情况"]))
    assert await provider.opinions(CONTEXT) == ["同意", "反对", "再想想", "问清楚", "先试试"]
    assert fake.requests[0].task == "opinions"
    assert fake.requests[0].schema_items == (3, 5)


async def test_empty_opinions_are_rejected(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(suggestions=["同意", " ", ""]), Reply(suggestions=["", "同意"]))
    with pytest.raises(LlmBadResponse):
        await provider.opinions(CONTEXT)
    assert fake.requests[1].schema_items == (2, 4)


@pytest.mark.parametrize(
    "body",
    [b"<html>bad gateway</html>", b'{"choices": []}', b"[1, 2]", b'{"choices": [{"message": null}]}'],
    ids=["not-json", "no-choices", "not-an-object", "no-message"],
)
async def test_malformed_answer_is_a_bad_response(fake: FakeOpenRouter, make_provider: MakeProvider, body: bytes):
    provider = await make_provider()
    fake.queue(Reply(body=body))
    with pytest.raises(LlmBadResponse):
        await provider.replies(CONTEXT)
    assert len(fake.requests) == 1


# -- failures and retries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, LlmStatusError), (401, LlmAuthError), (402, LlmAuthError), (403, LlmAuthError), (404, LlmStatusError)],
)
async def test_client_errors_fail_at_once_without_retry(
    fake: FakeOpenRouter, make_provider: MakeProvider, status: int, error_type: type[LlmStatusError]
) -> None:
    provider = await make_provider()
    fake.set_default(Reply(status=status))
    with pytest.raises(error_type) as caught:
        await provider.replies(CONTEXT)
    assert caught.value.status == status
    assert not isinstance(caught.value, LlmTimeout)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_transient_errors_are_retried(fake: FakeOpenRouter, make_provider: MakeProvider, status: int):
    provider = await make_provider()
    fake.queue(Reply(status=status), Reply(suggestions=["好", "行", "嗯？"]))
    assert await provider.replies(CONTEXT) == ["好", "行", "嗯？"]
    assert len(fake.requests) == 2


async def test_error_reported_inside_a_200_answer_is_retried_like_its_status(
    fake: FakeOpenRouter, make_provider: MakeProvider
) -> None:
    provider = await make_provider()
    fake.queue(Reply(body=b'{"error": {"code": 502, "message": "upstream overloaded"}}'), Reply())
    assert len(await provider.replies(CONTEXT)) == 3
    assert len(fake.requests) == 2


async def test_persistent_server_errors_exhaust_the_retries(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider(max_retries=2)
    fake.set_default(Reply(status=500, error_message="internal"))
    with pytest.raises(LlmStatusError) as caught:
        await provider.replies(CONTEXT)
    assert caught.value.status == 500
    assert "internal" in str(caught.value)
    assert len(fake.requests) == 3


async def test_retry_after_is_honoured(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    fake.queue(Reply(status=429, headers={"Retry-After": "1"}), Reply())
    assert len(await provider.replies(CONTEXT)) == 3
    first, second = fake.requests
    # The backoff alone would be about 10 ms; the provider asked for a full second.
    assert second.received_at - first.received_at >= 0.95


async def test_rate_limit_longer_than_the_budget_fails_without_waiting(
    fake: FakeOpenRouter, make_provider: MakeProvider
) -> None:
    provider = await make_provider(timeout=5.0)
    fake.set_default(Reply(status=429, headers={"Retry-After": "120"}))
    with pytest.raises(LlmRateLimited) as caught:
        await provider.replies(CONTEXT)
    assert caught.value.retry_after == 120
    assert len(fake.requests) == 1


async def test_rate_limited_until_retries_run_out(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider(max_retries=1)
    fake.set_default(Reply(status=429, headers={"Retry-After": "0"}))
    with pytest.raises(LlmRateLimited):
        await provider.replies(CONTEXT)
    assert len(fake.requests) == 2


async def test_slow_provider_times_out_and_the_request_is_dropped(
    fake: FakeOpenRouter, make_provider: MakeProvider
) -> None:
    provider = await make_provider(timeout=0.5)
    fake.set_default(Reply(delay=30))
    with pytest.raises(LlmTimeout):
        await provider.replies(CONTEXT)
    dropped = await asyncio.to_thread(fake.wait_for_disconnect, 10)
    assert dropped.task == "replies"


async def test_unreachable_provider_is_a_connection_error(make_provider: MakeProvider):
    provider = await make_provider(base_url=f"http://127.0.0.1:{free_port()}/api/v1", max_retries=1)
    with pytest.raises(LlmConnectionError) as caught:
        await provider.replies(CONTEXT)
    assert KEY not in str(caught.value)


async def test_cancelled_generation_closes_its_request_at_once(fake: FakeOpenRouter, make_provider: MakeProvider):
    calls: list[HttpCallRecord] = []
    provider = await make_provider(observer=calls.append)
    fake.set_default(Reply(delay=30))
    generation = asyncio.create_task(provider.replies(CONTEXT))
    await asyncio.to_thread(fake.wait_for_requests, 1)
    generation.cancel()
    with pytest.raises(asyncio.CancelledError):
        await generation
    dropped = await asyncio.to_thread(fake.wait_for_disconnect, 10)
    assert dropped is fake.requests[0]
    assert [call.status_class for call in calls] == ["cancelled"]
    assert provider.health()["consecutive_failures"] == 0


# -- streaming ------------------------------------------------------------------------------------


async def test_streamed_answer_is_assembled(fake: FakeOpenRouter, make_provider: MakeProvider):
    calls: list[HttpCallRecord] = []
    provider = await make_provider(stream=True, observer=calls.append)
    fake.queue(Reply(suggestions=["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"]))
    assert await provider.replies(CONTEXT) == ["好的，我知道了。", "谢谢医生提醒。", "换药会有副作用吗？"]
    assert fake.requests[0].body["stream"] is True
    assert (calls[0].prompt_tokens, calls[0].completion_tokens) == (120, 30)


async def test_streamed_loose_answer_is_parsed(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider(stream=True)
    fake.queue(Reply(content="好的，以下是建议：\n1. 同意\n2. 反对\n3. 再想想\n4. 问清楚"))
    assert await provider.opinions(CONTEXT) == ["同意", "反对", "再想想", "问清楚"]


async def test_stalled_stream_times_out_and_is_dropped(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider(stream=True, timeout=0.5)
    fake.set_default(Reply(chunk_delay=30))
    with pytest.raises(LlmTimeout):
        await provider.replies(CONTEXT)
    await asyncio.to_thread(fake.wait_for_disconnect, 10)


# -- connections, observer, health, secrecy -------------------------------------------------------


async def test_connections_are_reused_between_generations(fake: FakeOpenRouter, make_provider: MakeProvider):
    provider = await make_provider()
    for _ in range(3):
        await provider.replies(CONTEXT)
    assert len({request.peer_port for request in fake.requests}) == 1


async def test_observer_gets_every_http_call(fake: FakeOpenRouter, make_provider: MakeProvider):
    calls: list[HttpCallRecord] = []
    provider = await make_provider(observer=calls.append)
    fake.queue(Reply(status=503), Reply(status=429), Reply(usage={"prompt_tokens": 77, "completion_tokens": 9}))
    await provider.replies(CONTEXT)
    assert [(call.task, call.status_class, call.status) for call in calls] == [
        ("replies", "5xx", 503),
        ("replies", "4xx", 429),
        ("replies", "2xx", 200),
    ]
    assert (calls[-1].prompt_tokens, calls[-1].completion_tokens) == (77, 9)
    assert calls[0].prompt_tokens is None
    assert all(call.duration >= 0 for call in calls)


async def test_timeout_is_recorded_as_such(fake: FakeOpenRouter, make_provider: MakeProvider):
    calls: list[HttpCallRecord] = []
    provider = await make_provider(timeout=0.3, observer=calls.append)
    fake.set_default(Reply(delay=30))
    with pytest.raises(LlmTimeout):
        await provider.opinions(CONTEXT)
    assert [(call.task, call.status_class) for call in calls] == [("opinions", "timeout")]


async def test_a_failing_observer_does_not_fail_the_generation(fake: FakeOpenRouter, make_provider: MakeProvider):
    def broken(record: HttpCallRecord) -> None:
        raise RuntimeError("metrics backend gone")

    provider = await make_provider(observer=broken)
    assert len(await provider.replies(CONTEXT)) == 3


async def test_health_names_mode_model_and_url_and_degrades_after_repeated_failures(
    fake: FakeOpenRouter, make_provider: MakeProvider
) -> None:
    provider = await make_provider(max_retries=0)
    health = provider.health()
    assert health["status"] == "healthy"
    assert (health["mode"], health["model"], health["base_url"]) == ("openrouter", "test/model-a", fake.url)
    assert KEY not in repr(health)
    fake.set_default(Reply(status=500))
    for _ in range(3):
        with pytest.raises(LlmError):
            await provider.replies(CONTEXT)
    assert provider.health()["status"] == "degraded"
    fake.set_default(Reply())
    await provider.replies(CONTEXT)
    assert provider.health()["status"] == "healthy"


async def test_health_hides_credentials_in_the_base_url(fake: FakeOpenRouter):
    provider = OpenRouterProvider(api_key=KEY, base_url=f"http://user:secret@127.0.0.1:{fake.port}/api/v1", model="m")
    assert provider.health()["base_url"] == f"http://127.0.0.1:{fake.port}/api/v1"
    assert provider.health()["status"] == "unavailable", "not started yet"


async def test_key_never_appears_in_logs_or_errors(
    fake: FakeOpenRouter, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = await make_provider(max_retries=1)
    # A careless provider that quotes the Authorization header back in its error messages.
    echo = f"invalid credentials: Bearer {KEY}"
    fake.queue(Reply(status=500, error_message=echo), Reply(status=401, error_message=echo))
    with pytest.raises(LlmAuthError) as caught:
        await provider.replies(CONTEXT)
    fake.queue(Reply(body=f'{{"error": {{"message": "{echo}"}}}}'.encode()))
    with pytest.raises(LlmBadResponse) as bad:
        await provider.replies(CONTEXT)
    for error in (caught.value, bad.value):
        assert "invalid credentials" in str(error)
        assert KEY not in str(error) and KEY not in repr(error)
    assert any("retrying" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(vars(record))


async def test_generation_before_start_is_a_programming_error(fake: FakeOpenRouter):
    provider = OpenRouterProvider(api_key=KEY, base_url=fake.url, model="m")
    with pytest.raises(RuntimeError):
        await provider.replies(CONTEXT)


def test_provider_needs_a_key() -> None:
    with pytest.raises(ValueError):
        OpenRouterProvider(api_key="", base_url="http://127.0.0.1:1/api/v1", model="m")
