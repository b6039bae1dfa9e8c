"""A local OpenAI-compatible chat-completions server that stands in for OpenRouter in tests.

It runs on 127.0.0.1 (random port) in a background thread with its own event loop, so both the
in-process client tests and the service subprocess can use it. It records every request, answers
as scripted (status codes, Retry-After, delays, loose or malformed content, JSON or SSE), and
notices when a client hangs up on a request it is still working on.

It can also answer at a real model's pace: `first_token` seconds before the first token, then
`tokens_per_second` (a token being CHARS_PER_TOKEN characters of the answer), streamed as one SSE
event per token when the request asks for a stream, else all at once after the same time; and
`streams=False` plays an endpoint that ignores `stream: true`.

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
# Roughly what a tokenizer makes of Chinese text with some JSON punctuation.
CHARS_PER_TOKEN = 2
FILLER = "好的我明白您的意思了谢谢您这么说我们再商量一下吧"
PREDICTION = {"tendency": "可能同意", "mood": "平静", "tone": "温和"}


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
    first_token: float = 0.0  # seconds before the first token (or before a whole answer)
    tokens_per_second: float = 0.0  # 0: the whole answer at once
    streams: bool = True  # False: plain JSON even when the request asks for a stream
    count_usage: bool = False  # report usage counted from the prompt and the answer instead of `usage`
    suggestion_chars: int = 0  # generated suggestions are padded to this length (a realistic reply)
    drop_after_chars: int | None = None  # a stream breaks off (connection closed) after this much content


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    peer_port: int
    received_at: float  # time.monotonic()
    handled_seconds: float = 0.0  # the fake's own time, from request to the last byte it wrote
    answer: str = ""
    usage: dict[str, int] | None = None
    disconnected: bool = False

    @property
    def task(self) -> str:
        """The name of the requested JSON schema ("replies" / "opinions")."""
        return str(self.body.get("response_format", {}).get("json_schema", {}).get("name", ""))

    @property
    def properties(self) -> dict[str, Any]:
        properties: dict[str, Any] = self.body["response_format"]["json_schema"]["schema"]["properties"]
        return properties

    @property
    def schema_items(self) -> tuple[int, int]:
        schema = self.properties["suggestions"]
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

    def prompts(self, task: str, containing: str) -> list[str]:
        """The prompts of `task` requests that contain `containing` (a test's own scenario, say), in order:
        a request an earlier test cancelled may still arrive after a `reset`."""
        return [request.prompt for request in self.requests if request.task == task and containing in request.prompt]

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
        streamed = bool(body.get("stream")) and reply.streams
        if (
            not streamed
            and reply.status < 400
            and reply.body is None
            and (reply.first_token or reply.tokens_per_second)
        ):
            # A model that does not stream answers only once it has written everything.
            record.answer = self._content(reply, record)
            if await self._client_left(request, reply.first_token + _writing_seconds(record.answer, reply)):
                self._mark_disconnected(record)
                return web.Response(status=499)
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
            record.answer = record.answer or self._content(reply, record)
            record.usage = _usage(record, reply)
            if streamed:
                return await self._stream(request, record, reply, started)
            response = web.json_response(_completion(body, record.answer, record.usage), headers=reply.headers)
        record.handled_seconds = time.perf_counter() - started
        return response

    def _content(self, reply: Reply, record: RecordedRequest) -> str:
        if reply.content is not None:
            return reply.content
        if record.task == "prediction":
            return json.dumps(PREDICTION, ensure_ascii=False)
        suggestions = reply.suggestions
        if suggestions is None:
            label = "观点" if record.task in ("opinions", "opinions_with_replies") else "回复"
            suggestions = [self._made_up(label, 0) for _ in range(record.schema_items[0])]
        if record.task != "opinions_with_replies":
            return json.dumps({"suggestions": suggestions}, ensure_ascii=False)
        count = int(record.properties["no_opinion_replies"]["minItems"])
        answer = {
            "suggestions": suggestions,
            "replies": [
                {
                    "opinion": keyword,
                    "suggestions": [self._made_up(f"{keyword}·回复", reply.suggestion_chars) for _ in range(count)],
                }
                for keyword in suggestions
            ],
            "no_opinion_replies": [self._made_up("回复", reply.suggestion_chars) for _ in range(count)],
        }
        return json.dumps(answer, ensure_ascii=False)

    def _made_up(self, label: str, length: int) -> str:
        # Fixed-width numbers: an answer's length (and so its pace) does not grow as the fake ages.
        text = f"{label}{next(self._numbers) % 10000:04d}"
        return text + FILLER[: max(0, length - len(text))]

    async def _stream(
        self, request: web.Request, record: RecordedRequest, reply: Reply, started: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await response.write(b": OPENROUTER PROCESSING\n\n")
            if reply.first_token and await self._client_left(request, reply.first_token):
                self._mark_disconnected(record)
                return response
            piece = CHARS_PER_TOKEN if reply.tokens_per_second else SSE_PIECE_CHARS
            pause = 1 / reply.tokens_per_second if reply.tokens_per_second else reply.chunk_delay
            # On a fixed schedule from the first token, so that polling for a hang-up adds no drift.
            first = time.monotonic()
            for written, event in enumerate(_stream_events(record.body, record.answer, record.usage, piece)):
                if reply.drop_after_chars is not None and written * piece >= reply.drop_after_chars:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(b"data: " + event.encode() + b"\n\n")
                wait = first + (written + 1) * pause - time.monotonic()
                if pause and await self._client_left(request, max(0.0, wait)):
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
        while (left := deadline - time.monotonic()) > 0:
            if request.transport is None or request.transport.is_closing():
                return True
            await asyncio.sleep(min(DISCONNECT_POLL_SECONDS, left))
        return request.transport is None or request.transport.is_closing()


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


def _writing_seconds(answer: str, reply: Reply) -> float:
    return len(answer) / CHARS_PER_TOKEN / reply.tokens_per_second if reply.tokens_per_second else 0.0


def _usage(record: RecordedRequest, reply: Reply) -> dict[str, int] | None:
    if not reply.count_usage:
        return reply.usage
    prompt, completion = -(-len(record.prompt) // CHARS_PER_TOKEN), -(-len(record.answer) // CHARS_PER_TOKEN)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream_events(
    request: dict[str, Any], content: str, usage: dict[str, int] | None, piece_chars: int = SSE_PIECE_CHARS
) -> Iterator[str]:
    """Chunks of a few characters, then a final chunk with finish_reason (and usage), like OpenRouter."""
    base = {"id": "gen-fake", "object": "chat.completion.chunk", "model": request.get("model", "")}
    for start in range(0, len(content), piece_chars):
        piece = content[start : start + piece_chars]
        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        yield json.dumps({**base, "choices": [choice]}, ensure_ascii=False)
    final: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if usage is not None:
        final["usage"] = usage
    yield json.dumps(final)
