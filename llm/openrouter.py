"""The OpenRouter client: suggestions from any OpenAI-compatible chat-completions endpoint.

One `aiohttp.ClientSession` per worker (opened in `start`, closed in `close`) keeps connections to
the provider alive between generations. Each generation has one time budget, LLM_TIMEOUT, which
covers every attempt, every backoff and the single follow-up request made when a model returns
too few suggestions. Retries (tenacity) cover what can heal by itself: connection errors, 408,
429 (after its Retry-After) and 5xx; a refused key or a bad request fails at once. Once a
suggestion of an answer has been handed on, that answer is never retried (the client would see
two different lists).

Plain JSON answers by default: a suggestion list is parsed as a whole. A caller that wants each
suggestion as soon as it is written (`on_partial`) gets a streamed request (SSE); so does the
speculative request, whose keywords come first and must not wait for the replies written after
them. An endpoint that answers a streamed request with plain JSON is read just the same, all at
once. `stream=True` streams every request.

A cancelled generation drops its HTTP connection at once instead of draining it, so the provider
sees the disconnect and stops generating (and billing). The API key only ever leaves this module
in the Authorization header: exception messages quote provider text with the key scrubbed out,
and `health()` reports the model and the base URL without credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from yarl import URL

from llm.errors import (
    LlmAuthError,
    LlmBadResponse,
    LlmConnectionError,
    LlmError,
    LlmRateLimited,
    LlmStatusError,
    LlmTimeout,
)
from llm.interface import (
    ConversationContext,
    KeywordSink,
    PartialSink,
    Prediction,
    PreparedSink,
    SuggestionProvider,
    Task,
)
from llm.parsing import clean_items, clean_opinions, parse_prediction, sse_data
from llm.prompts import (
    SPECULATION_SCHEMA,
    Message,
    Wanted,
    build_messages,
    follow_up_messages,
    prediction_format,
    response_format,
    speculation_format,
    wanted,
)
from llm.redaction import REDACTED
from llm.streaming import PreparedRepliesStream, SuggestionStream

log = logging.getLogger("llm.openrouter")

AUTH_STATUSES = frozenset({401, 402, 403})
RETRYABLE_STATUSES = frozenset({408, 429})
# Health turns "degraded" once this many generations in a row have failed.
DEGRADED_AFTER_FAILURES = 3
ERROR_BODY_READ_BYTES = 8192
ERROR_QUOTE_CHARS = 300
# The speculative answer holds a reply list per keyword and one more: room for about that many lists.
SPECULATION_TOKEN_FACTOR = 5

T = TypeVar("T")
TextSink = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpCallRecord:
    """One HTTP call to the provider, for the metrics endpoint.

    `task` is the generation task, or "opinions_with_replies" for the speculative request.
    `status_class` is "2xx", "4xx", "5xx", "timeout" (the budget ran out during the call),
    "connection" (unreachable or dropped) or "cancelled" (the generation was no longer wanted).
    """

    task: str
    duration: float
    status_class: str
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


CallObserver = Callable[[HttpCallRecord], None]


@dataclass(frozen=True, slots=True)
class Budget:
    """One generation's deadline (event-loop time) and the ids its log lines carry."""

    deadline: float
    ids: dict[str, str]


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class OpenRouterProvider(SuggestionProvider):
    mode = "openrouter"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        temperature: float = 0.7,
        max_tokens: int = 800,
        timeout: float = 30.0,
        max_retries: int = 2,
        prompt_char_budget: int = 12000,
        site_url: str = "",
        app_name: str = "",
        stream: bool = False,
        observer: CallObserver | None = None,
        backoff_initial: float = 0.25,
        backoff_max: float = 4.0,
    ) -> None:
        if not api_key:
            raise ValueError("OpenRouterProvider needs an API key")
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.max_retries = max_retries
        self.prompt_char_budget = prompt_char_budget
        self.stream = stream
        self.observer = observer
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        # OpenRouter's optional attribution headers (shown in its rankings and the account's activity).
        if site_url:
            self._headers["HTTP-Referer"] = site_url
        if app_name:
            self._headers["X-Title"] = app_name
        self._backoff = wait_exponential_jitter(initial=backoff_initial, max=backoff_max, jitter=backoff_initial)
        self._session: aiohttp.ClientSession | None = None
        self._consecutive_failures = 0

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(keepalive_timeout=60, ttl_dns_cache=300),
                # No aiohttp timeout: the generation's own budget (asyncio.timeout) bounds every call.
                timeout=aiohttp.ClientTimeout(total=None),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> dict[str, Any]:
        if self._session is None:
            status = "unavailable"
        elif self._consecutive_failures >= DEGRADED_AFTER_FAILURES:
            status = "degraded"
        else:
            status = "healthy"
        return {
            "status": status,
            "mode": self.mode,
            "configured": True,
            "model": self.model,
            "base_url": str(URL(self.base_url).with_user(None)),
            "consecutive_failures": self._consecutive_failures,
        }

    async def opinions(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        return await self._list(Task.OPINIONS, context, on_partial)

    async def replies(self, context: ConversationContext, on_partial: PartialSink | None = None) -> list[str]:
        return await self._list(Task.REPLIES, context, on_partial)

    async def opinions_with_replies(
        self,
        context: ConversationContext,
        on_keywords: KeywordSink,
        on_prepared: PreparedSink,
        on_partial: PartialSink | None = None,
    ) -> None:
        """One streamed request for the keywords and a reply list per keyword (and for no opinion).

        Too few usable keywords get the same single follow-up as `opinions`; prepared lists that do
        not hold exactly `response_count` usable replies are dropped, never padded.
        """
        count = wanted(Task.OPINIONS, context)
        keywords = SuggestionStream(clean_opinions, count.maximum, on_partial)
        delivered = False

        async def offer_keywords(found: list[str]) -> None:
            nonlocal delivered
            if len(found) >= count.minimum:
                delivered = True
                await on_keywords(found)

        answer_stream = PreparedRepliesStream(context.response_count, keywords, offer_keywords, on_prepared)

        async def work(budget: Budget) -> None:
            messages = build_messages(Task.OPINIONS, context, self.prompt_char_budget, prepare_replies=True)
            body = self._body(
                messages,
                speculation_format(context.response_count),
                stream=True,
                max_tokens=self.max_tokens * SPECULATION_TOKEN_FACTOR,
            )
            answer = await self._complete(
                SPECULATION_SCHEMA,
                body,
                budget,
                on_text=answer_stream.feed,
                handed_on=lambda: bool(keywords.items),
            )
            await answer_stream.feed(answer.text, whole=True)
            if not delivered:
                found = await self._suggestions(Task.OPINIONS, messages, count, keywords, budget, first=answer)
                await on_keywords(found)

        await self._within_budget(Task.OPINIONS, context, work)

    async def predict_reaction(self, context: ConversationContext) -> Prediction:
        async def work(budget: Budget) -> Prediction:
            messages = build_messages(Task.PREDICTION, context, self.prompt_char_budget)
            body = self._body(messages, prediction_format(), stream=False)
            answer = await self._complete(Task.PREDICTION.value, body, budget)
            fields = parse_prediction(answer.text)
            if fields is None:
                raise LlmBadResponse("the provider's prediction lacks a tendency, a mood or a tone")
            return Prediction(**fields)

        return await self._within_budget(Task.PREDICTION, context, work)

    # -- one generation ---------------------------------------------------------------------

    async def _list(self, task: Task, context: ConversationContext, on_partial: PartialSink | None) -> list[str]:
        count = wanted(task, context)
        clean = clean_opinions if task is Task.OPINIONS else clean_items
        stream = SuggestionStream(clean, count.maximum, on_partial)

        async def work(budget: Budget) -> list[str]:
            messages = build_messages(task, context, self.prompt_char_budget)
            return await self._suggestions(task, messages, count, stream, budget)

        return await self._within_budget(task, context, work)

    async def _within_budget(
        self, task: Task, context: ConversationContext, work: Callable[[Budget], Awaitable[T]]
    ) -> T:
        """`work(budget)` under one LLM_TIMEOUT, counted in the provider's health."""
        ids = {"session_id": context.session_id, "request_id": context.request_id, "task": task.value}
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                result = await work(Budget(deadline, ids))
        except TimeoutError:
            self._consecutive_failures += 1
            raise LlmTimeout(f"no usable answer from the provider within {self.timeout:g} s") from None
        except LlmError:
            self._consecutive_failures += 1
            raise
        self._consecutive_failures = 0
        return result

    async def _suggestions(
        self,
        task: Task,
        messages: list[Message],
        count: Wanted,
        stream: SuggestionStream,
        budget: Budget,
        *,
        first: Completion | None = None,
    ) -> list[str]:
        """Exactly what `count` allows: extras are cut, a shortfall gets one follow-up request, never filler.

        `first` is an answer already received (the speculative one), which then takes the place of
        the first request.
        """
        streamed = stream.streams
        if first is None:
            body = self._body(messages, response_format(task, count), stream=streamed)
            first = await self._complete(task.value, body, budget, on_text=stream.feed, handed_on=stream.answer_started)
        await stream.finish_answer(first.text)
        if len(stream.items) < count.minimum:
            have = len(stream.items)
            log.info("too few suggestions, asking once more", extra={**budget.ids, "usable": have})
            missing = Wanted(count.minimum - have, count.maximum - have)
            follow_up = follow_up_messages(messages, first.text, have, missing)
            stream.next_answer()
            body = self._body(follow_up, response_format(task, missing), stream=streamed)
            more = await self._complete(task.value, body, budget, on_text=stream.feed, handed_on=stream.answer_started)
            await stream.finish_answer(more.text)
        if len(stream.items) < count.minimum:
            raise LlmBadResponse(
                f"the provider gave {len(stream.items)} usable {task.value} where {count.minimum} are needed"
            )
        return list(stream.items)

    def _body(
        self, messages: list[Message], schema: dict[str, Any], *, stream: bool, max_tokens: int | None = None
    ) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": max_tokens or self.max_tokens,
            "response_format": schema,
        }
        if stream or self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def _complete(
        self,
        task: str,
        body: bytes,
        budget: Budget,
        *,
        on_text: TextSink | None = None,
        handed_on: Callable[[], bool] = lambda: False,
    ) -> Completion:
        """One chat completion, retried while it may heal, while the budget allows another attempt
        and while nothing of the answer has been handed on (`handed_on`). A streamed answer's text
        so far goes to `on_text` as it grows."""

        def log_retry(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            log.warning(
                "llm call failed, retrying",
                extra={
                    **budget.ids,
                    "attempt": retry_state.attempt_number,
                    "retry_in_s": round(retry_state.upcoming_sleep, 3),
                    "error": str(error),
                },
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda error: _worth_retrying(error) and not handed_on()),
            wait=self._wait,
            stop=stop_after_attempt(self.max_retries + 1) | StopAtDeadline(budget.deadline),
            before_sleep=log_retry,
            reraise=True,
        )
        completion: Completion = await retrying(self._post, task, body, budget.deadline, on_text)
        return completion

    def _wait(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, LlmStatusError) and error.retry_after is not None:
            return error.retry_after
        return float(self._backoff(retry_state))

    # -- one HTTP call ----------------------------------------------------------------------

    async def _post(self, task: str, body: bytes, deadline: float, on_text: TextSink | None) -> Completion:
        if self._session is None:
            raise RuntimeError("OpenRouterProvider.start() was not awaited")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        status: int | None = None
        outcome = "connection"
        completion: Completion | None = None
        try:
            async with self._session.post(self.url, data=body) as response:
                status = response.status
                outcome = f"{status // 100}xx"
                try:
                    if status >= 400:
                        raise await self._status_error(response)
                    completion = await self._read_completion(response, on_text)
                except BaseException:
                    # Drop the connection instead of draining it: the provider stops generating at once.
                    response.close()
                    raise
                return completion
        except asyncio.CancelledError:
            outcome = "timeout" if loop.time() >= deadline else "cancelled"
            raise
        except aiohttp.ClientError as error:
            outcome = "connection"
            message = f"cannot reach the provider: {type(error).__name__}: {error}"
            raise LlmConnectionError(self._scrub(message)) from None
        finally:
            self._observe(
                HttpCallRecord(
                    task=task,
                    duration=time.perf_counter() - started,
                    status_class=outcome,
                    status=status,
                    prompt_tokens=completion.prompt_tokens if completion else None,
                    completion_tokens=completion.completion_tokens if completion else None,
                )
            )

    async def _status_error(self, response: aiohttp.ClientResponse) -> LlmStatusError:
        raw = await response.content.read(ERROR_BODY_READ_BYTES)
        detail = self._scrub(_error_detail(raw))[:ERROR_QUOTE_CHARS]
        message = f"provider answered HTTP {response.status}" + (f": {detail}" if detail else "")
        return _status_exception(response.status, message, _retry_after(response.headers.get("Retry-After")))

    async def _read_completion(self, response: aiohttp.ClientResponse, on_text: TextSink | None) -> Completion:
        if response.content_type == "text/event-stream":
            return await self._read_stream(response, on_text)
        try:
            payload = orjson.loads(await response.read())
        except orjson.JSONDecodeError:
            raise LlmBadResponse("the provider's answer is not JSON") from None
        envelope = self._envelope(payload)
        choices = envelope.get("choices")
        message = choices[0].get("message") if isinstance(choices, list) and choices else None
        if not isinstance(message, dict):
            raise LlmBadResponse("the provider's answer has no message")
        return Completion(_text(message.get("content")), *_tokens(envelope.get("usage")))

    async def _read_stream(self, response: aiohttp.ClientResponse, on_text: TextSink | None) -> Completion:
        parts: list[str] = []
        usage: Any = None
        async for data in sse_data(response.content):
            # Keep reading after [DONE] until the body ends, so the connection can go back to the pool.
            if data.strip() == "[DONE]":
                continue
            try:
                chunk = self._envelope(orjson.loads(data))
            except orjson.JSONDecodeError:
                raise LlmBadResponse("the provider's stream carried an event that is not JSON") from None
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    parts.append(delta["content"])
                    # Only a closing quote, bracket or brace can complete a suggestion or a list.
                    if on_text is not None and any(mark in delta["content"] for mark in '"]}'):
                        await on_text("".join(parts))
            usage = chunk.get("usage") or usage
        return Completion("".join(parts), *_tokens(usage))

    def _envelope(self, payload: Any) -> dict[str, Any]:
        """The answer object; an error the provider reports inside a 200 answer is raised like an HTTP one."""
        if not isinstance(payload, dict):
            raise LlmBadResponse("the provider's answer is not a JSON object")
        error = payload.get("error")
        if error is not None:
            detail = self._scrub(str(error.get("message", "") if isinstance(error, dict) else error))
            code = error.get("code") if isinstance(error, dict) else None
            if isinstance(code, int) and code >= 400:
                raise _status_exception(code, f"provider reported error {code}: {detail[:ERROR_QUOTE_CHARS]}", None)
            raise LlmBadResponse(f"provider reported an error: {detail[:ERROR_QUOTE_CHARS]}")
        return payload

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, REDACTED)

    def _observe(self, record: HttpCallRecord) -> None:
        if self.observer is None:
            return
        try:
            self.observer(record)
        except Exception:  # metrics must never fail a generation
            log.exception("llm call observer failed")


class StopAtDeadline(stop_base):
    """Stop retrying when the next attempt could only start after the generation's budget has run out.

    Waiting out a long Retry-After that ends past the deadline would only turn an honest
    "rate limited" into a timeout, so the last error is raised at once instead.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return asyncio.get_running_loop().time() + retry_state.upcoming_sleep >= self.deadline


def _worth_retrying(error: BaseException) -> bool:
    if isinstance(error, LlmConnectionError):
        return True
    return isinstance(error, LlmStatusError) and (error.status in RETRYABLE_STATUSES or error.status >= 500)


def _status_exception(status: int, message: str, retry_after: float | None) -> LlmStatusError:
    if status in AUTH_STATUSES:
        return LlmAuthError(message, status)
    if status == 429:
        return LlmRateLimited(message, status, retry_after)
    return LlmStatusError(message, status, retry_after)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay in seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(raw: bytes) -> str:
    """The provider's own error message when the body is OpenAI-style JSON, else the body's text."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace").strip()
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return raw.decode("utf-8", errors="replace").strip()


def _text(content: Any) -> str:
    """Message content as text: a string, or (some compatible servers) a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _tokens(usage: Any) -> tuple[int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None)
