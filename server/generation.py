"""Generation requests: opinion and reply generations run as tasks, at most one of each per session.

Rules (PROTOCOL.md): `message_start` and `conversation_end` cancel everything of the session,
a reply generation cancels a running opinion generation and replaces an older reply
generation. A cancelled generation sends nothing; a failed one sends one `error` event in place
of its result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from enum import StrEnum
from typing import Any

from llm.errors import LlmError, LlmTimeout
from llm.interface import ConversationContext, SuggestionProvider
from server import metrics
from server.protocol import (
    ErrorCode,
    ProtocolError,
    Send,
    describe,
    error_event,
    llm_response_event,
    opinion_suggestions_event,
)

log = logging.getLogger("server.generation")


class Kind(StrEnum):
    OPINIONS = "opinions"
    REPLIES = "replies"


class GenerationManager:
    """The request manager of one worker: running generations keyed by (session, kind)."""

    def __init__(self, provider: SuggestionProvider, timeout: float) -> None:
        self.provider = provider
        # The provider owns the retry budget (LLM_TIMEOUT); this guard only catches a provider that hangs.
        self.guard_timeout = timeout + 5.0
        self._running: dict[tuple[str, Kind], asyncio.Task[None]] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, kind: Kind, context: ConversationContext, send: Send) -> str:
        """Start a generation; return its request id. Replaces what it must, per the rules above."""
        session_id = context.session_id
        self.cancel(session_id, kind)
        if kind is Kind.REPLIES:
            self.cancel(session_id, Kind.OPINIONS)
        request_id = str(uuid.uuid4())
        context = replace(context, request_id=request_id)
        task = asyncio.create_task(self._run(kind, context, send), name=f"{kind}:{session_id}")
        self._running[(session_id, kind)] = task
        task.add_done_callback(lambda done: self._forget((session_id, kind), done))
        return request_id

    def cancel(self, session_id: str, *kinds: Kind) -> None:
        for kind in kinds or tuple(Kind):
            task = self._running.pop((session_id, kind), None)
            if task is not None and not task.done():
                task.cancel()
                log.info("generation cancelled", extra={"session_id": session_id, "task": kind.value})

    def cancel_all(self) -> None:
        for session_id, kind in list(self._running):
            self.cancel(session_id, kind)

    def _forget(self, key: tuple[str, Kind], task: asyncio.Task[None]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    async def _run(self, kind: Kind, context: ConversationContext, send: Send) -> None:
        ids: dict[str, Any] = {"session_id": context.session_id, "request_id": context.request_id}
        started = time.perf_counter()
        outcome = "ok"
        try:
            generate = self.provider.opinions if kind is Kind.OPINIONS else self.provider.replies
            suggestions = await asyncio.wait_for(generate(context), self.guard_timeout)
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
        build = opinion_suggestions_event if kind is Kind.OPINIONS else llm_response_event
        await send(build(context.session_id, suggestions, context.request_id))
        log.info("generation sent", extra={**ids, "task": kind.value, "count": len(suggestions)})


async def send_error(send: Send, code: ErrorCode, session_id: str, kind: Kind) -> None:
    await send(error_event(ProtocolError(code, session_id=session_id, details=describe(task=kind.value))))
