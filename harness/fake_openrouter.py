"""A local OpenAI-compatible chat-completions server that stands in for OpenRouter in tests.

It runs on 127.0.0.1 (random port) in a background thread with its own event loop, so both the
in-process client tests and the service subprocess can use it. It records every request, answers
as scripted (status codes, Retry-After, delays, loose or malformed content, JSON or SSE), and
notices when a client hangs up on a request it is still working on.

    with FakeOpenRouter() as fake:
        fake.queue(Reply(status=429, headers={"Retry-After": "1"}), Reply())
        ... point OPENROUTER_BASE_URL at fake.url ...
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
DISCONNECT_POLL_SECONDS = 0.01
SSE_PIECE_CHARS = 4


@dataclass
class Reply:
    """How the fake answers one request. By default: 200 with as many suggestions as the schema asks."""

    status: int = 200
    suggestions: list[str] | None = None
    content: str | None = None  # the message content verbatim (loose formats), instead of suggestions
    body: bytes | None = None  # the HTTP body verbatim (malformed envelopes), instead of everything else
    headers: dict[str, str] = field(default_factory=dict)
    error_message: str = "scripted failure"
    delay: float = 0.0  # before answering; a client that hangs up meanwhile is recorded
    chunk_delay: float = 0.0  # between SSE chunks
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    peer_port: int
    received_at: float  # time.monotonic()
    handled_seconds: float = 0.0  # the fake's own time, from request to the last byte it wrote
    answer: str = ""
    disconnected: bool = False

    @property
    def task(self) -> str:
        """The name of the requested JSON schema ("replies" / "opinions")."""
        return str(self.body.get("response_format", {}).get("json_schema", {}).get("name", ""))

    @property
    def schema_items(self) -> tuple[int, int]:
        schema = self.body["response_format"]["json_schema"]["schema"]["properties"]["suggestions"]
        return int(schema["minItems"]), int(schema["maxItems"])

    @property
    def prompt(self) -> str:
        return "\n".join(str(message.get("content", "")) for message in self.body.get("messages", []))


class FakeOpenRouter:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._queued: list[tuple[str | None, Reply]] = []
        self._defaults: dict[str | None, Reply] = {}
        self._requests: list[RecordedRequest] = []
        self._numbers = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> FakeOpenRouter:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-openrouter", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("fake OpenRouter did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeOpenRouter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_post("/api/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = int(self._runner.addresses[0][1])
        ready.set()
        loop.run_forever()
        loop.close()

    async def _shutdown(self) -> None:
        assert self._runner is not None and self._loop is not None
        await self._runner.cleanup()
        self._loop.call_soon(self._loop.stop)

    # -- scripting and inspection ---------------------------------------------------------------

    def queue(self, *replies: Reply, task: str | None = None) -> None:
        """Answer the next requests (of `task`, or of any task) with `replies`, in order."""
        with self._lock:
            self._queued.extend((task, reply) for reply in replies)

    def set_default(self, reply: Reply, task: str | None = None) -> None:
        """Answer every request of `task` (or of any task) with `reply` once the queue is used up."""
        with self._lock:
            self._defaults[task] = reply

    def reset(self) -> None:
        with self._lock:
            self._queued.clear()
            self._defaults.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"expected {count} requests, got {len(self._requests)}")
            return list(self._requests)

    def wait_for_disconnect(self, timeout: float = 10.0) -> RecordedRequest:
        """The first request whose client hung up before the answer was complete."""
        with self._lock:
            if not self._lock.wait_for(lambda: any(r.disconnected for r in self._requests), timeout):
                raise TimeoutError("no client disconnected")
            return next(r for r in self._requests if r.disconnected)

    def _next_reply(self, task: str) -> Reply:
        with self._lock:
            for index, (wanted, reply) in enumerate(self._queued):
                if wanted in (None, task):
                    del self._queued[index]
                    return reply
            return self._defaults.get(task) or self._defaults.get(None) or Reply()

    def _mark_disconnected(self, record: RecordedRequest) -> None:
        with self._lock:
            record.disconnected = True
            self._lock.notify_all()

    # -- the chat-completions endpoint -------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        record = RecordedRequest(
            path=request.path,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            peer_port=int(peer[1]) if peer else 0,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(record)
            self._lock.notify_all()
        reply = self._next_reply(record.task)
        if reply.delay and await self._client_left(request, reply.delay):
            self._mark_disconnected(record)
            return web.Response(status=499)
        if reply.body is not None:
            response = web.Response(
                status=reply.status, body=reply.body, content_type="application/json", headers=reply.headers
            )
        elif reply.status >= 400:
            error = {"error": {"code": reply.status, "message": reply.error_message}}
            response = web.json_response(error, status=reply.status, headers=reply.headers)
        else:
            record.answer = self._content(reply, record)
            if body.get("stream"):
                return await self._stream(request, record, reply, started)
            response = web.json_response(_completion(body, record.answer, reply.usage), headers=reply.headers)
        record.handled_seconds = time.perf_counter() - started
        return response

    def _content(self, reply: Reply, record: RecordedRequest) -> str:
        if reply.content is not None:
            return reply.content
        suggestions = reply.suggestions
        if suggestions is None:
            label = "观点" if record.task == "opinions" else "回复"
            suggestions = [f"{label}{next(self._numbers)}" for _ in range(record.schema_items[0])]
        return json.dumps({"suggestions": suggestions}, ensure_ascii=False)

    async def _stream(
        self, request: web.Request, record: RecordedRequest, reply: Reply, started: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await response.write(b": OPENROUTER PROCESSING\n\n")
            for event in _stream_events(record.body, record.answer, reply.usage):
                await response.write(b"data: " + event.encode() + b"\n\n")
                if reply.chunk_delay and await self._client_left(request, reply.chunk_delay):
                    self._mark_disconnected(record)
                    return response
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            self._mark_disconnected(record)
        record.handled_seconds = time.perf_counter() - started
        return response

    @staticmethod
    async def _client_left(request: web.Request, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client closes the connection."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if request.transport is None or request.transport.is_closing():
                return True
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        return False


def _completion(request: dict[str, Any], content: str, usage: dict[str, int] | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "gen-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", ""),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"},
        ],
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def _stream_events(request: dict[str, Any], content: str, usage: dict[str, int] | None) -> Iterator[str]:
    """Chunks of a few characters, then a final chunk with finish_reason (and usage), like OpenRouter."""
    base = {"id": "gen-fake", "object": "chat.completion.chunk", "model": request.get("model", "")}
    for start in range(0, len(content), SSE_PIECE_CHARS):
        piece = content[start : start + SSE_PIECE_CHARS]
        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        yield json.dumps({**base, "choices": [choice]}, ensure_ascii=False)
    final: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if usage is not None:
        final["usage"] = usage
    yield json.dumps(final)
