"""The OpenRouter client: suggestions from any OpenAI-compatible chat-completions endpoint.

One `aiohttp.ClientSession` per worker (opened in `start`, closed in `close`) keeps connections to
the provider alive between generations. Each generation has one time budget, LLM_TIMEOUT, which
covers every attempt, every backoff and the single follow-up request made when a model returns
too few suggestions. Retries (tenacity) cover what can heal by itself: connection errors, 408,
429 (after its Retry-After) and 5xx; a refused key or a bad request fails at once.

Non-streaming by default: a suggestion is only useful once it is complete and the list is parsed
as a whole, so streaming would not show the user anything sooner, while a plain JSON answer
reports token usage on every compatible endpoint. `stream=True` asks for server-sent events
(for endpoints that prefer streaming); an SSE answer is parsed whichever way was asked.

A cancelled generation drops its HTTP connection at once instead of draining it, so the provider
sees the disconnect and stops generating (and billing). The API key only ever leaves this module
in the Authorization header: exception messages quote provider text with the key scrubbed out,
and `health()` reports the model and the base URL without credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base
from yarl import URL

from config import Settings
from llm.errors import (
    LlmAuthError,
    LlmBadResponse,
    LlmConnectionError,
    LlmError,
    LlmRateLimited,
    LlmStatusError,
    LlmTimeout,
)
from llm.interface import ConversationContext, SuggestionProvider
from llm.parsing import clean_items, clean_opinions, parse_suggestions, sse_data
from llm.prompts import Message, Task, Wanted, build_messages, follow_up_messages, response_format, wanted

log = logging.getLogger("llm.openrouter")

REDACTED = "[REDACTED]"
AUTH_STATUSES = frozenset({401, 402, 403})
RETRYABLE_STATUSES = frozenset({408, 429})
# Health turns "degraded" once this many generations in a row have failed.
DEGRADED_AFTER_FAILURES = 3
ERROR_BODY_READ_BYTES = 8192
ERROR_QUOTE_CHARS = 300


@dataclass(frozen=True, slots=True)
class HttpCallRecord:
    """One HTTP call to the provider, for the metrics endpoint.

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
        history_char_budget: int = 6000,
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
        self.history_char_budget = history_char_budget
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

    @classmethod
    def from_settings(cls, settings: Settings, observer: CallObserver | None = None) -> OpenRouterProvider:
        if settings.openrouter_api_key is None:
            raise ValueError("OPENROUTER_API_KEY is not set")
        return cls(
            api_key=settings.openrouter_api_key.get_secret_value(),
            base_url=settings.openrouter_base_url,
            model=settings.openrouter_model,
            temperature=settings.openrouter_temperature,
            max_tokens=settings.openrouter_max_tokens,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
            history_char_budget=settings.llm_history_char_budget,
            site_url=settings.openrouter_site_url,
            app_name=settings.openrouter_app_name,
            observer=observer,
        )

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

    async def opinions(self, context: ConversationContext) -> list[str]:
        return await self._generate(Task.OPINIONS, context)

    async def replies(self, context: ConversationContext) -> list[str]:
        return await self._generate(Task.REPLIES, context)

    # -- one generation ---------------------------------------------------------------------

    async def _generate(self, task: Task, context: ConversationContext) -> list[str]:
        ids = {"session_id": context.session_id, "request_id": context.request_id, "task": task.value}
        count = wanted(task, context)
        messages = build_messages(task, context, self.history_char_budget)
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                suggestions = await self._suggestions(task, messages, count, deadline, ids)
        except TimeoutError:
            self._consecutive_failures += 1
            raise LlmTimeout(f"no usable answer from the provider within {self.timeout:g} s") from None
        except LlmError:
            self._consecutive_failures += 1
            raise
        self._consecutive_failures = 0
        return suggestions

    async def _suggestions(
        self, task: Task, messages: list[Message], count: Wanted, deadline: float, ids: dict[str, str]
    ) -> list[str]:
        """Exactly what `count` allows: extras are cut, a shortfall gets one follow-up request, never filler."""
        clean = clean_opinions if task is Task.OPINIONS else clean_items
        answer = await self._complete(task, self._body(task, messages, count), deadline, ids)
        suggestions = clean(parse_suggestions(answer.text))
        if len(suggestions) < count.minimum:
            log.info("too few suggestions, asking once more", extra={**ids, "usable": len(suggestions)})
            missing = Wanted(count.minimum - len(suggestions), count.maximum - len(suggestions))
            follow_up = follow_up_messages(messages, answer.text, len(suggestions), missing)
            more = await self._complete(task, self._body(task, follow_up, missing), deadline, ids)
            suggestions = clean([*suggestions, *clean(parse_suggestions(more.text))])
        if len(suggestions) < count.minimum:
            raise LlmBadResponse(
                f"the provider gave {len(suggestions)} usable {task.value} where {count.minimum} are needed"
            )
        return suggestions[: count.maximum]

    def _body(self, task: Task, messages: list[Message], count: Wanted) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "response_format": response_format(task, count),
        }
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def _complete(self, task: Task, body: bytes, deadline: float, ids: dict[str, str]) -> Completion:
        """One chat completion, retried while it may heal and while the budget allows another attempt."""

        def log_retry(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            log.warning(
                "llm call failed, retrying",
                extra={
                    **ids,
                    "attempt": retry_state.attempt_number,
                    "retry_in_s": round(retry_state.upcoming_sleep, 3),
                    "error": str(error),
                },
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception(_worth_retrying),
            wait=self._wait,
            stop=stop_after_attempt(self.max_retries + 1) | StopAtDeadline(deadline),
            before_sleep=log_retry,
            reraise=True,
        )
        completion: Completion = await retrying(self._post, task, body, deadline)
        return completion

    def _wait(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, LlmStatusError) and error.retry_after is not None:
            return error.retry_after
        return float(self._backoff(retry_state))

    # -- one HTTP call ----------------------------------------------------------------------

    async def _post(self, task: Task, body: bytes, deadline: float) -> Completion:
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
                    completion = await self._read_completion(response)
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
                    task=task.value,
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

    async def _read_completion(self, response: aiohttp.ClientResponse) -> Completion:
        if response.content_type == "text/event-stream":
            return await self._read_stream(response)
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

    async def _read_stream(self, response: aiohttp.ClientResponse) -> Completion:
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
