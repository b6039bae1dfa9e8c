"""The real service with the OpenRouter client, against a local fake provider, through the WebSocket protocol."""

from __future__ import annotations

import asyncio
import json

import pytest

from harness.client import ProtocolClient
from harness.fake_openrouter import FakeOpenRouter, Reply
from harness.server import ServerProcess
from tests.conftest import service_against_fake

KEY = "sk-test-e2e-5b8e2c1f9a7d3e6b4c0a"
LLM_TIMEOUT = 2.0
# Upper bound for waiting on an event; generous so that a loaded machine does not fail the test.
WAIT = 30.0


pytestmark = pytest.mark.usefixtures("fresh_fake")


service = service_against_fake(
    KEY,
    OPENROUTER_MODEL="test/e2e-model",
    OPENROUTER_SITE_URL="https://example.org/dialogue",
    LLM_TIMEOUT=LLM_TIMEOUT,
    LLM_MAX_RETRIES=1,
    LOG_LEVEL="DEBUG",
)


async def _manual_generate(client: ProtocolClient, session_id: str, **data: object) -> None:
    await client.send("manual_generate", session_id=session_id, **data)
    await client.expect_status("generating_response", session_id)


async def test_manual_generate_returns_the_providers_suggestions(service: ServerProcess, fake: FakeOpenRouter):
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(
            response_count=4,
            scenario_description="在餐厅点菜",
            history_messages=[{"message_id": "h1", "sender": "服务员", "content": "您想吃点什么？"}],
        )
        await _manual_generate(client, session_id, focused_message_ids=["h1"], user_opinion="想吃辣的")
        data = await client.expect("llm_response", timeout=WAIT, session_id=session_id)
    # This conversation's request (an earlier test's cancelled one may reach the shared fake late).
    [request] = [request for request in fake.requests if request.task == "replies" and "在餐厅点菜" in request.prompt]
    assert data["suggestions"] == json.loads(request.answer)["suggestions"]
    assert len(data["suggestions"]) == 4
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "test/e2e-model"
    assert "在餐厅点菜" in request.prompt
    assert "[h1] 服务员：您想吃点什么？ ★重点" in request.prompt
    assert "想吃辣的" in request.prompt


async def test_provider_errors_become_llm_service_error(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(status=500), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(response_count=3)
        await _manual_generate(client, session_id)
        error = await client.expect_error("LLM_SERVICE_ERROR", timeout=WAIT)
        assert error["session_id"] == session_id
        await client.expect_silence(0.5)
    assert len(fake.requests) == 2, "one attempt and LLM_MAX_RETRIES=1 retry"


async def test_slow_provider_becomes_service_timeout(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(delay=120), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(response_count=3)
        await _manual_generate(client, session_id)
        error = await client.expect_error("SERVICE_TIMEOUT", timeout=WAIT)
        assert error["session_id"] == session_id
    await asyncio.to_thread(fake.wait_for_disconnect, WAIT)


async def test_message_start_aborts_the_running_generation(service: ServerProcess, fake: FakeOpenRouter):
    fake.set_default(Reply(delay=120), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(response_count=3)
        await _manual_generate(client, session_id)
        await asyncio.to_thread(fake.wait_for_requests, 1, WAIT)
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_status("recording_message", session_id)
        dropped = await asyncio.to_thread(fake.wait_for_disconnect, WAIT)
        assert dropped.task == "replies"
        # Nothing from the aborted generation, not even a timeout once LLM_TIMEOUT has passed.
        await client.expect_silence(LLM_TIMEOUT + 1.0)
        await client.send("conversation_end", session_id=session_id)
    assert len(fake.requests) == 1


async def test_key_appears_neither_in_the_log_nor_in_health(service: ServerProcess, fake: FakeOpenRouter):
    # A provider that quotes the Authorization header back in its error message.
    fake.set_default(Reply(status=401, error_message=f"rejected Bearer {KEY}"), task="replies")
    async with ProtocolClient(service.ws_url) as client:
        session_id = await client.start_session(response_count=2)
        await _manual_generate(client, session_id)
        error = await client.expect_error("LLM_SERVICE_ERROR", timeout=WAIT)
    assert KEY not in json.dumps(error, ensure_ascii=False)
    logs = service.logs()
    assert "generation failed" in logs and "rejected Bearer" in logs
    assert KEY not in logs
    health = service.health()
    assert KEY not in json.dumps(health, ensure_ascii=False)
    llm = health["engines"]["llm"]
    assert (llm["mode"], llm["model"], llm["base_url"]) == ("openrouter", "test/e2e-model", fake.url)
