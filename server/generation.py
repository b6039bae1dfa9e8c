"""Generation requests: opinion, reply and prediction generations run as tasks, at most one of each per session.

Rules (PROTOCOL.md): `message_start` and `conversation_end` cancel everything of the session,
a reply generation cancels a running opinion generation and replaces an older reply
generation. A cancelled generation sends nothing; a failed one sends one `error` event in place
of its result.

Cost: every generation that asks the provider spends a token of its session's bucket and needs
one of LLM_MAX_CONCURRENT slots of the worker; without either it is refused with RATE_LIMITED
(a generation it replaces is still cancelled).

Speculation (SPECULATIVE_REPLIES): an opinion generation asks, in the same streamed provider call,
for replies prepared for each keyword and for no opinion. The keywords are sent as soon as they
are parsed; the call then goes on as the session's speculation, which a reply generation does not
cancel. A reply generation whose exact context (fingerprint) was prepared is answered from it; if that
group is still being written, a provider call of its own races the stream and the first answer
wins. Anything else asks the provider.
A change of context (`context_changed`, `message_start`, a new opinion generation) drops the
speculation and aborts its call, so prepared replies can never answer a different question.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from llm.errors import LlmError, LlmTimeout
from llm.interface import ConversationContext, PartialSink, SuggestionProvider, Task
from server import metrics
from server.protocol import (
    ErrorCode,
    Event,
    ProtocolError,
    Send,
    describe,
    error_event,
    llm_response_event,
    opinion_prediction_event,
    opinion_suggestions_event,
    suggestion_partial_event,
)
from server.rate_limits import SessionRateLimits

log = logging.getLogger("server.generation")

Work = Callable[[], Awaitable[Event | None]]

SESSION_RATE_MESSAGE = "生成请求过于频繁，请稍后再试"
CONCURRENCY_MESSAGE = "回复生成服务繁忙，请稍后再试"


@dataclass(frozen=True, slots=True)
class GenerationPolicy:
    """What the operator decides about generations (see config/settings.py for each)."""

    speculative_replies: bool = True
    opinion_prediction_for_all: bool = False
    session_rate_per_minute: float = 20.0
    session_burst: int = 6
    max_concurrent: int = 64


class SpeculationDropped(Exception):
    """Raised into the provider call to stop writing replies nobody can ask for any more."""


class Speculation:
    """Replies prepared with one session's keywords, keyed by the fingerprint of the exact request
    each answers: the opinion generation's context with that opinion and no focus."""

    def __init__(self, context: ConversationContext) -> None:
        self.base = replace(context, focused_message_ids=(), user_opinion="")
        self.task: asyncio.Task[None] | None = None  # the provider call preparing the replies
        self.keywords_sent = False
        # Dropped before its keywords came: the call still owes the client its keywords, then stops.
        self.dropped = False
        self._entries: dict[str, asyncio.Future[list[str] | None]] = {}
        self._expect("")

    def offer(self, keywords: list[str]) -> None:
        for keyword in keywords:
            self._expect(keyword)

    def fulfil(self, opinion: str, replies: list[str]) -> None:
        entry = self._entries.get(self._key(opinion))
        if entry is not None and not entry.done():
            entry.set_result(replies)

    def lookup(self, context: ConversationContext) -> asyncio.Future[list[str] | None] | None:
        """The prepared replies for exactly `context` (maybe still being written), if any can come."""
        entry = self._entries.get(context.fingerprint())
        if entry is None or (entry.done() and entry.result() is None):
            return None
        return entry

    def close(self) -> None:
        """Nothing more will be prepared: whoever still waits falls back to the provider."""
        for entry in self._entries.values():
            if not entry.done():
                entry.set_result(None)

    def _expect(self, opinion: str) -> None:
        self._entries.setdefault(self._key(opinion), asyncio.get_running_loop().create_future())

    def _key(self, opinion: str) -> str:
        return replace(self.base, user_opinion=opinion).fingerprint()


class GenerationManager:
    """The request manager of one worker: running generations keyed by (session, task)."""

    def __init__(self, provider: SuggestionProvider, timeout: float, policy: GenerationPolicy | None = None) -> None:
        self.provider = provider
        self.policy = policy or GenerationPolicy()
        # The provider owns the retry budget (LLM_TIMEOUT); this guard only catches a provider that hangs.
        self.guard_timeout = timeout + 5.0
        self._running: dict[tuple[str, Task], asyncio.Task[None]] = {}
        self._speculations: dict[str, Speculation] = {}
        # Tasks with a provider call in flight (or about to be): what LLM_MAX_CONCURRENT counts.
        self._calls: set[asyncio.Task[None]] = set()
        self._rates = SessionRateLimits(self.policy.session_rate_per_minute, self.policy.session_burst)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, kind: Task, context: ConversationContext, send: Send, *, stream: bool = False) -> str:
        """Start a generation; return its request id. Replaces what it must, per the rules above.

        Raises ProtocolError(RATE_LIMITED) when the provider may not be asked now. `stream` sends
        each suggestion as a `suggestion_partial` event before the full list.
        """
        session_id = context.session_id
        self.cancel(session_id, kind)
        if kind is Task.REPLIES:
            if (session_id, Task.OPINIONS) in self._running:
                # Keywords never shown: nothing their generation would prepare can be asked for.
                self.context_changed(session_id)
            self.cancel(session_id, Task.OPINIONS)
        request_id = str(uuid.uuid4())
        context = replace(context, request_id=request_id)
        on_partial = _partial_sender(kind, context, send) if stream else None
        prepared = self._prepared(context) if kind is Task.REPLIES else None
        if prepared is None:
            self._admit(session_id)
        if kind is Task.REPLIES and self.policy.speculative_replies and prepared is None:
            metrics.LLM_SPECULATION.labels("miss").inc()
        work = self._work(kind, context, send, on_partial, prepared)
        task = asyncio.create_task(self._guarded(kind, context, send, work), name=f"{kind}:{session_id}")
        self._running[(session_id, kind)] = task
        task.add_done_callback(lambda done: self._forget((session_id, kind), done))
        task.add_done_callback(self._calls.discard)
        if prepared is None:
            self._calls.add(task)
        return request_id

    def cancel(self, session_id: str, *kinds: Task) -> None:
        """Cancel the given generations of the session; with no kinds, everything (speculation too)."""
        if not kinds:
            self.context_changed(session_id)
        for kind in kinds or tuple(Task):
            task = self._running.pop((session_id, kind), None)
            if task is not None and not task.done():
                self._abort(task)
                log.info("generation cancelled", extra={"session_id": session_id, "task": kind.value})

    def context_changed(self, session_id: str) -> None:
        """The session's context changed: its prepared replies answer nothing any more."""
        speculation = self._speculations.pop(session_id, None)
        if speculation is None:
            return
        speculation.close()
        if not speculation.keywords_sent:
            # The running opinion generation is still the client's (a supplement does not cancel it).
            speculation.dropped = True
        elif speculation.task is not None and not speculation.task.done():
            self._abort(speculation.task)
            log.info("speculation dropped", extra={"session_id": session_id})

    def cancel_all(self) -> None:
        for session_id, kind in list(self._running):
            self.cancel(session_id, kind)
        for session_id in list(self._speculations):
            self.context_changed(session_id)

    def _abort(self, task: asyncio.Task[Any]) -> None:
        task.cancel()
        # Its provider call is being dropped: the slot is free for whoever replaces it.
        self._calls.discard(task)

    def _forget(self, key: tuple[str, Task], task: asyncio.Task[None]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    def _admit(self, session_id: str) -> None:
        if len(self._calls) >= self.policy.max_concurrent:
            metrics.LLM_REFUSED.labels("concurrency").inc()
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                CONCURRENCY_MESSAGE,
                session_id=session_id,
                details=f"同时进行的生成已达上限（{self.policy.max_concurrent} 个），请几秒后重试",
            )
        if not self._rates.take(session_id):
            metrics.LLM_REFUSED.labels("session_rate").inc()
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                SESSION_RATE_MESSAGE,
                session_id=session_id,
                details=f"每个会话每分钟最多生成 {self.policy.session_rate_per_minute:g} 次"
                f"（可连续 {self.policy.session_burst} 次），请稍后重试",
            )

    def _prepared(self, context: ConversationContext) -> asyncio.Future[list[str] | None] | None:
        speculation = self._speculations.get(context.session_id)
        return speculation.lookup(context) if speculation is not None else None

    # -- what each generation does ------------------------------------------------------------

    def _work(
        self,
        kind: Task,
        context: ConversationContext,
        send: Send,
        on_partial: PartialSink | None,
        prepared: asyncio.Future[list[str] | None] | None,
    ) -> Work:
        session_id, request_id = context.session_id, context.request_id

        async def opinions() -> Event:
            return opinion_suggestions_event(session_id, await self.provider.opinions(context, on_partial), request_id)

        async def replies() -> Event:
            return llm_response_event(session_id, await self.provider.replies(context, on_partial), request_id)

        async def prepared_replies() -> Event:
            assert prepared is not None
            suggestions = await self._prepared_or_asked(context, prepared)
            if suggestions is None:
                log.info("prepared replies did not come, asking the provider", extra={"session_id": session_id})
                self._hold_slot()
                return await replies()
            if on_partial is not None:
                for index, text in enumerate(suggestions):
                    await on_partial(index, text)
            return llm_response_event(session_id, suggestions, request_id)

        async def prediction() -> Event:
            predicted = await self.provider.predict_reaction(context)
            return opinion_prediction_event(session_id, dataclasses.asdict(predicted), request_id)

        if kind is Task.OPINIONS and self.policy.speculative_replies:
            return self._speculative_opinions(context, send, on_partial)
        if kind is Task.OPINIONS:
            return opinions
        if kind is Task.PREDICTION:
            return prediction
        return replies if prepared is None else prepared_replies

    async def _prepared_or_asked(
        self, context: ConversationContext, prepared: asyncio.Future[list[str] | None]
    ) -> list[str] | None:
        """The prepared replies. While they are still being written, a provider call of its own races
        them (when the limits allow one), so a pick never waits longer than asking would have.
        None when they never came and nothing else answered: then the provider must be asked."""
        # Shielded: this request giving up must not cancel the entry other requests may share.
        waiting: asyncio.Future[list[str] | None] = asyncio.shield(prepared)
        racer: asyncio.Task[list[str]] | None = None
        if not prepared.done() and self._may_ask(context.session_id):
            self._hold_slot()
            racer = asyncio.create_task(self.provider.replies(context))
        pending: set[asyncio.Future[Any]] = {waiting} if racer is None else {waiting, racer}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done and waiting.result() is not None:
                    metrics.LLM_SPECULATION.labels("hit").inc()
                    return waiting.result()
                if racer in done and racer.exception() is None:
                    metrics.LLM_SPECULATION.labels("miss").inc()
                    return racer.result()
            metrics.LLM_SPECULATION.labels("miss").inc()
            if racer is not None:
                return racer.result()  # raises the racer's error: there is nothing else to send
            return None
        finally:
            waiting.cancel()
            if racer is not None:
                racer.cancel()

    def _may_ask(self, session_id: str) -> bool:
        return len(self._calls) < self.policy.max_concurrent and self._rates.take(session_id)

    def _hold_slot(self) -> None:
        """The running generation has turned into a provider call: count it against the cap."""
        current = asyncio.current_task()
        if current is not None:
            self._calls.add(current)

    def _speculative_opinions(self, context: ConversationContext, send: Send, on_partial: PartialSink | None) -> Work:
        """The opinion generation ends with the keywords; its provider call goes on as the session's
        speculation (a task of its own, which reply generations do not cancel)."""
        session_id = context.session_id

        async def work() -> Event:
            speculation = Speculation(context)
            self.context_changed(session_id)
            self._speculations[session_id] = speculation
            keywords: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

            async def on_keywords(found: list[str]) -> None:
                speculation.offer(found)
                speculation.keywords_sent = True
                keywords.set_result(found)
                if speculation.dropped:
                    raise SpeculationDropped("the context changed while the keywords were written")

            async def prepare() -> None:
                try:
                    await self.provider.opinions_with_replies(context, on_keywords, speculation.fulfil, on_partial)
                except Exception as error:
                    if not keywords.done():
                        keywords.set_exception(error)
                    else:
                        log.info("speculation ended early", extra={"session_id": session_id, "reason": str(error)})
                finally:
                    speculation.close()

            call = speculation.task = asyncio.create_task(prepare(), name=f"speculation:{session_id}")
            # The call holds the slot this generation was admitted with, for as long as it runs.
            self._calls.add(call)
            parent = asyncio.current_task()
            if parent is not None:
                self._calls.discard(parent)
            call.add_done_callback(self._calls.discard)
            metrics.LLM_SPECULATIVE_CALLS.inc()
            try:
                found = await asyncio.shield(keywords)
            except BaseException:
                # No keywords shown (failed or no longer wanted): nothing prepared can be asked for.
                self._abort(call)
                if self._speculations.get(session_id) is speculation:
                    del self._speculations[session_id]
                raise
            return opinion_suggestions_event(session_id, found, context.request_id)

        return work

    async def _guarded(self, kind: Task, context: ConversationContext, send: Send, work: Work) -> None:
        """Run `work`, send the event it returns; every failure becomes one error event."""
        ids: dict[str, Any] = {"session_id": context.session_id, "request_id": context.request_id}
        started = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(self.guard_timeout):
                event = await work()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except (LlmTimeout, TimeoutError) as error:
            outcome = "timeout"
            log.warning("generation timed out", extra={**ids, "task": kind.value, "error": str(error)})
            await send_error(send, ErrorCode.SERVICE_TIMEOUT, context.session_id, kind)
            return
        except LlmError as error:
            outcome = "error"
            log.warning("generation failed", extra={**ids, "task": kind.value, "error": str(error)})
            await send_error(send, ErrorCode.LLM_SERVICE_ERROR, context.session_id, kind)
            return
        except Exception:
            outcome = "error"
            log.exception("generation crashed", extra={**ids, "task": kind.value})
            await send_error(send, ErrorCode.LLM_SERVICE_ERROR, context.session_id, kind)
            return
        finally:
            elapsed = time.perf_counter() - started
            metrics.LLM_LATENCY.labels(kind.value).observe(elapsed)
            metrics.LLM_OUTCOMES.labels(kind.value, outcome).inc()
        if event is not None:
            await send(event)
            log.info("generation sent", extra={**ids, "task": kind.value})


def _partial_sender(kind: Task, context: ConversationContext, send: Send) -> PartialSink:
    async def on_partial(index: int, text: str) -> None:
        await send(suggestion_partial_event(context.session_id, context.request_id, kind.value, index, text))

    return on_partial


async def send_error(send: Send, code: ErrorCode, session_id: str, kind: Task) -> None:
    await send(error_event(ProtocolError(code, session_id=session_id, details=describe(task=kind.value))))
