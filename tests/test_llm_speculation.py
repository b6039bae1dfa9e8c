"""Speculative replies, streamed suggestions and the LLM bill, over real WebSockets against the real
service, with the OpenRouter client pointed at the local fake provider (which counts every request)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.client import ProtocolClient
from harness.fake_openrouter import FakeOpenRouter, RecordedRequest, Reply
from harness.server import ServerProcess, http_get
from tests.conftest import service_against_fake, speech

KEY = "sk-test-speculation-7e1a3c5b9d2f"
WAIT = 30.0
BURST = 6
PROMPT_BUDGET = 12000


pytestmark = pytest.mark.usefixtures("fresh_fake")


service = service_against_fake(
    KEY,
    LLM_TIMEOUT=20,
    LLM_MAX_RETRIES=0,
    LLM_SESSION_BURST=BURST,
    LLM_SESSION_RATE_PER_MINUTE=1,
    LLM_PROMPT_CHAR_BUDGET=PROMPT_BUDGET,
    MAX_TEXT_CHARS=1_000_000,  # the largest text the protocol can be set to accept, for the 3 MB message
    MAX_MESSAGE_BYTES=4 * 1024 * 1024,  # and a frame that can carry it
)


def tasks(fake: FakeOpenRouter) -> list[str]:
    return [request.task for request in fake.requests]


async def finished(fake: FakeOpenRouter, count: int) -> list[RecordedRequest]:
    """The first `count` requests, once the fake has written each answer to its end."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        requests = fake.requests
        if len(requests) >= count and all(r.handled_seconds > 0 for r in requests[:count]):
            return requests
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the fake did not finish {count} answers")


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def start(client: ProtocolClient, **options: bool) -> str:
    await client.send("conversation_start", response_count=3, options=options)
    session_id: str = (await client.expect("session_created"))["session_id"]
    return session_id


async def record(client: ProtocolClient, session_id: str, *, partials: bool = False) -> dict[str, Any]:
    """A spoken message up to its keywords; returns the opinion_suggestions data."""
    await client.send("message_start", session_id=session_id, sender="对方")
    await client.expect_status("recording_message", session_id)
    chunk = base64.b64encode(speech(0.5)).decode()
    await client.send("audio_stream", session_id=session_id, audio_chunk=chunk)
    await client.send("message_end", session_id=session_id)
    await client.expect_status("processing_stt", session_id)
    await client.expect("message_recorded", session_id=session_id, timeout=WAIT)
    await client.expect_status("generating_opinions", session_id)
    if partials:
        return await streamed(client, session_id, "opinions", "opinion_suggestions")
    return await client.expect("opinion_suggestions", timeout=WAIT, session_id=session_id)


async def streamed(client: ProtocolClient, session_id: str, kind: str, final: str) -> dict[str, Any]:
    """`suggestion_partial` events in order, then the full event: its texts are exactly the partials."""
    texts: list[str] = []
    request_ids: set[str] = set()
    while True:
        event = await client.recv(WAIT)
        if event["type"] == final:
            data: dict[str, Any] = event["data"]
            assert data["suggestions"] == texts
            assert request_ids == {data["request_id"]}
            return data
        assert event["type"] == "suggestion_partial", event
        partial = event["data"]
        assert (partial["session_id"], partial["kind"], partial["index"]) == (session_id, kind, len(texts))
        texts.append(partial["text"])
        request_ids.add(partial["request_id"])


async def generate(client: ProtocolClient, session_id: str, opinion: str = "") -> list[str]:
    await client.send("manual_generate", session_id=session_id, focused_message_ids=[], user_opinion=opinion)
    await client.expect_status("generating_response", session_id)
    suggestions: list[str] = (await client.expect("llm_response", timeout=WAIT, session_id=session_id))["suggestions"]
    return suggestions


def metric(service: ServerProcess, name: str, **labels: str) -> float:
    status, body = http_get(service.base_url + "/metrics")
    assert status == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    )


def prepared(request: RecordedRequest) -> dict[str, list[str]]:
    answer = json.loads(request.answer)
    lists = {group["opinion"]: group["suggestions"] for group in answer["replies"]}
    lists[""] = answer["no_opinion_replies"]
    return lists


# -- speculation -------------------------------------------------------------------------------------


async def test_an_offered_keyword_is_answered_without_a_provider_call(service: ServerProcess, fake: FakeOpenRouter):
    hits = metric(service, "adb_llm_speculation_total", result="hit")
    calls = metric(service, "adb_llm_speculative_calls_total")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        [speculative] = await finished(fake, 1)
        assert speculative.task == "opinions_with_replies" and speculative.body["stream"] is True
        assert await generate(client, session_id, keywords[1]) == prepared(speculative)[keywords[1]]
        assert await generate(client, session_id, "") == prepared(speculative)[""]
        assert await generate(client, session_id, keywords[0]) == prepared(speculative)[keywords[0]]
        await client.expect_silence(0.3)
    assert tasks(fake) == ["opinions_with_replies"]
    assert metric(service, "adb_llm_speculation_total", result="hit") == hits + 3
    assert metric(service, "adb_llm_speculative_calls_total") == calls + 1


async def test_a_typed_opinion_or_a_focus_is_asked_of_the_provider(service: ServerProcess, fake: FakeOpenRouter):
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        await finished(fake, 1)
        assert (
            await generate(client, session_id, keywords[0] + "，但是")
            == json.loads(fake.requests[1].answer)["suggestions"]
        )
        await client.send("manual_generate", session_id=session_id, focused_message_ids=["msg_001"])
        await client.expect_status("generating_response", session_id)
        await client.expect("llm_response", timeout=WAIT, session_id=session_id)
    assert tasks(fake) == ["opinions_with_replies", "replies", "replies"]


async def _supplement(client: ProtocolClient, session_id: str) -> None:
    await client.send("scenario_supplement", session_id=session_id, supplement="对方其实是我的老同学")


async def _count_update(client: ProtocolClient, session_id: str) -> None:
    await client.send("response_count_update", session_id=session_id, response_count=2)


async def _modification(client: ProtocolClient, session_id: str) -> None:
    await client.send("user_modification", session_id=session_id, modification="更礼貌一些")
    await client.expect_status("generating_response", session_id)
    await client.expect("llm_response", timeout=WAIT, session_id=session_id)


async def _selection(client: ProtocolClient, session_id: str) -> None:
    await client.send("user_selected_response", session_id=session_id, selected_content="好的，谢谢", sender="我")
    await client.expect("message_recorded", session_id=session_id)


async def _new_message(client: ProtocolClient, session_id: str) -> None:
    await record(client, session_id)


@pytest.mark.parametrize(
    "change",
    [_supplement, _count_update, _modification, _selection, _new_message],
    ids=["supplement", "count-update", "modification", "selected-reply", "new-message"],
)
async def test_each_change_of_context_makes_the_prepared_replies_miss(
    service: ServerProcess, fake: FakeOpenRouter, change: Any
) -> None:
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        await finished(fake, 1)
        await change(client, session_id)
        before = len(fake.requests)
        await generate(client, session_id, keywords[0])
        await client.expect_silence(0.3)
    requests = await finished(fake, before + 1)
    assert len(requests) == before + 1
    assert requests[-1].task == "replies", "the keyword was asked of the provider again"


@pytest.mark.parametrize("change", ["message_start", "scenario_supplement", "conversation_end"])
async def test_a_speculative_call_in_flight_is_aborted_at_the_provider(
    service: ServerProcess, fake: FakeOpenRouter, change: str
) -> None:
    # Keywords after about a second, the replies prepared after them over many more seconds.
    fake.set_default(Reply(tokens_per_second=25, suggestion_chars=30))
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        await record(client, session_id)
        assert fake.requests[0].handled_seconds == 0, "the keywords came while the replies were being written"
        data = {"sender": "对方"} if change == "message_start" else {"supplement": "换个话题"}
        await client.send(change, session_id=session_id, **({} if change == "conversation_end" else data))
        dropped = await asyncio.to_thread(fake.wait_for_disconnect, WAIT)
        assert dropped.task == "opinions_with_replies"
        if change == "message_start":
            await client.expect_status("recording_message", session_id)
        if change == "conversation_end":
            await client.expect("profile_archive", session_id=session_id)
        await client.expect_silence(0.5)
    assert len(fake.requests) == 1


async def test_a_supplement_while_keywords_are_written_keeps_them_but_drops_the_replies(
    service: ServerProcess, fake: FakeOpenRouter
) -> None:
    fake.set_default(Reply(first_token=3.0, tokens_per_second=25, suggestion_chars=30), task="opinions_with_replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(speech(0.5)).decode())
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        await client.expect("message_recorded", session_id=session_id, timeout=WAIT)
        await client.expect_status("generating_opinions", session_id)
        await asyncio.to_thread(fake.wait_for_requests, 1, WAIT)
        await _supplement(client, session_id)
        # As without speculation: a supplement does not cancel the opinion generation under way.
        keywords = (await client.expect("opinion_suggestions", timeout=WAIT, session_id=session_id))["suggestions"]
        dropped = await asyncio.to_thread(fake.wait_for_disconnect, WAIT)
        assert dropped.task == "opinions_with_replies", "the replies nobody can ask for are not written"
        await generate(client, session_id, keywords[0])
    assert tasks(fake) == ["opinions_with_replies", "replies"]


async def test_a_keyword_picked_while_its_replies_are_written_gets_them_if_they_come_first(
    service: ServerProcess, fake: FakeOpenRouter
) -> None:
    fake.set_default(Reply(tokens_per_second=200, suggestion_chars=12))
    fake.set_default(Reply(delay=20), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        replies = await generate(client, session_id, keywords[-1])
        speculative, racer = await asyncio.to_thread(fake.wait_for_requests, 2, WAIT)
        assert replies == prepared(speculative)[keywords[-1]]
        assert racer.task == "replies"
        await until(lambda: racer.disconnected)  # the slower racer is dropped at the provider


async def test_a_keyword_picked_while_its_replies_are_written_gets_a_faster_provider_answer(
    service: ServerProcess, fake: FakeOpenRouter
) -> None:
    fake.set_default(Reply(tokens_per_second=25, suggestion_chars=30))
    fake.set_default(Reply(), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        replies = await generate(client, session_id, keywords[-1])
        speculative, racer = fake.requests
        assert replies == json.loads(racer.answer)["suggestions"]
        assert speculative.handled_seconds == 0 and not speculative.disconnected, "the speculation goes on"
        await client.send("conversation_end", session_id=session_id)
        await asyncio.to_thread(fake.wait_for_disconnect, WAIT)


# -- streamed suggestions ----------------------------------------------------------------------------


async def test_streamed_partials_come_in_order_before_each_full_list(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(tokens_per_second=500))
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client, stream_suggestions=True)
        keywords = (await record(client, session_id, partials=True))["suggestions"]
        assert len(keywords) == 3
        [speculative] = await finished(fake, 1)
        for opinion in (keywords[2], "一个没提供的观点"):
            await client.send("manual_generate", session_id=session_id, focused_message_ids=[], user_opinion=opinion)
            await client.expect_status("generating_response", session_id)
            replies = (await streamed(client, session_id, "replies", "llm_response"))["suggestions"]
            assert len(replies) == 3
        assert fake.requests[1].task == "replies" and fake.requests[1].body["stream"] is True
        assert prepared(speculative)[keywords[2]] != replies
        await client.expect_silence(0.3)


async def test_clients_that_did_not_opt_in_see_no_new_events(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(tokens_per_second=500))
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        await generate(client, session_id, keywords[0])
        await generate(client, session_id, "自己打的字")
        await _selection(client, session_id)
        await client.expect_silence(0.5)


async def test_opted_in_clients_get_a_prediction_after_their_selected_reply(
    service: ServerProcess, fake: FakeOpenRouter
) -> None:
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client, opinion_prediction=True)
        await client.send("user_selected_response", session_id=session_id, selected_content="明天见", sender="我")
        recorded = await client.expect("message_recorded", session_id=session_id)
        data = await client.expect("opinion_prediction_response", timeout=WAIT, session_id=session_id)
    assert data["prediction"] == {"tendency": "可能同意", "mood": "平静", "tone": "温和"}
    assert isinstance(data["request_id"], str) and data["request_id"]
    [request] = fake.requests
    assert request.task == "prediction" and f"[{recorded['message_id']}] 我：明天见" in request.prompt


# -- the LLM bill ------------------------------------------------------------------------------------


async def test_repeated_manual_generate_cannot_exceed_the_session_rate(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(delay=3.0), task="replies")
    attempts = 40
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        for number in range(attempts):
            await client.send("manual_generate", session_id=session_id, user_opinion=f"观点{number}")
        # Each request: status_update, then (beyond the burst) RATE_LIMITED in place of a result.
        statuses, refused = 0, []
        while statuses < attempts or len(refused) < attempts - BURST:
            event = await client.recv(WAIT)
            if event["type"] == "status_update":
                statuses += 1
            else:
                assert event["type"] == "error" and event["data"]["error_code"] == "RATE_LIMITED", event
                refused.append(event["data"])
        # The last admitted generation was replaced by a refused one: it is cancelled, nothing answers.
        await client.expect_silence(4.0)
    assert len(fake.requests) <= BURST
    assert metric(service, "adb_llm_refused_total", reason="session_rate") >= attempts - BURST
    assert all(request.task == "replies" for request in fake.requests)
    assert {error["session_id"] for error in refused} == {session_id}
    assert "频繁" in refused[0]["message"] and isinstance(refused[0]["details"], str)
    await asyncio.to_thread(fake.wait_for_disconnect, WAIT)


async def test_a_huge_message_reaches_the_provider_within_the_prompt_budget(
    service: ServerProcess, fake: FakeOpenRouter
) -> None:
    huge = "开头" + "很长的一句话。" * 140_000 + "结尾"  # about 3 MB of UTF-8
    async with ProtocolClient(service.ws_url) as client:
        session_id = await start(client)
        await client.send("user_selected_response", session_id=session_id, selected_content=huge, sender="我")
        await client.expect("message_recorded", session_id=session_id, timeout=WAIT)
        await generate(client, session_id, "同意" * 5000)
    [request] = fake.requests
    assert len(request.prompt) <= PROMPT_BUDGET
    assert "开头" in request.prompt and "结尾" in request.prompt and "中间省略" in request.prompt


# -- speculation off, predictions for everyone, a small cap on calls in flight -----------------------------


@pytest.fixture(scope="module")
def plain_service(fake: FakeOpenRouter) -> Iterator[ServerProcess]:
    with ServerProcess(
        OPENROUTER_API_KEY=KEY,
        OPENROUTER_BASE_URL=fake.url,
        LLM_TIMEOUT=20,
        LLM_MAX_RETRIES=0,
        SPECULATIVE_REPLIES="false",
        OPINION_PREDICTION="true",
        LLM_MAX_CONCURRENT=2,
    ) as server:
        yield server


async def test_without_speculation_a_keyword_is_asked_of_the_provider(
    plain_service: ServerProcess, fake: FakeOpenRouter
) -> None:
    async with ProtocolClient(plain_service.ws_url) as client:
        session_id = await start(client)
        keywords = (await record(client, session_id))["suggestions"]
        await generate(client, session_id, keywords[0])
        await generate(client, session_id, "")
    assert tasks(fake) == ["opinions", "replies", "replies"]
    assert "stream" not in fake.requests[0].body


async def test_the_operator_switch_sends_predictions_to_every_client_and_they_are_cancelled_like_the_rest(
    plain_service: ServerProcess, fake: FakeOpenRouter
) -> None:
    async with ProtocolClient(plain_service.ws_url) as client:
        session_id = await start(client)
        await _selection(client, session_id)
        data = await client.expect("opinion_prediction_response", timeout=WAIT, session_id=session_id)
        assert set(data["prediction"]) == {"tendency", "mood", "tone"}
        fake.set_default(Reply(delay=20), task="prediction")
        await _selection(client, session_id)
        await asyncio.to_thread(fake.wait_for_requests, 2, WAIT)
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        assert (await asyncio.to_thread(fake.wait_for_disconnect, WAIT)).task == "prediction"
        await client.expect_silence(0.5)


async def test_calls_beyond_the_workers_cap_are_refused_until_one_ends(
    plain_service: ServerProcess, fake: FakeOpenRouter
) -> None:
    fake.set_default(Reply(delay=20), task="replies")
    async with (
        ProtocolClient(plain_service.ws_url) as first,
        ProtocolClient(plain_service.ws_url) as second,
        ProtocolClient(plain_service.ws_url) as third,
    ):
        sessions = [await start(client) for client in (first, second, third)]
        for client, session_id in zip((first, second), sessions, strict=False):
            await client.send("manual_generate", session_id=session_id)
            await client.expect_status("generating_response", session_id)
        await asyncio.to_thread(fake.wait_for_requests, 2, WAIT)
        await third.send("manual_generate", session_id=sessions[2])
        await third.expect_status("generating_response", sessions[2])
        error = await third.expect_error("RATE_LIMITED")
        assert "繁忙" in error["message"] and isinstance(error["details"], str)
        await first.send("conversation_end", session_id=sessions[0])
        await asyncio.to_thread(fake.wait_for_disconnect, WAIT)
        await third.send("manual_generate", session_id=sessions[2])
        await third.expect_status("generating_response", sessions[2])
        await asyncio.to_thread(fake.wait_for_requests, 3, WAIT)
        await third.expect_silence(0.3)
