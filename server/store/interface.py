"""The session store contract, and what both backends share: timing and the attachments held here.

One `SessionStore` per process (each Sanic worker opens its own). Every write is committed when
its awaitable returns, so the event that confirms it may be sent. Sessions are resumable for
`resume_window` seconds after their last activity (any write, `attach`, `detach`, `touch`);
after that `load` and every write raise `SessionExpired` and the data is purged, leaving a
tombstone (id, reason, time; no content) for `tombstone_ttl` seconds so the id still answers
expired rather than not found.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from server.store.errors import StoreUnavailable
from server.store.metrics import STORE_FAILURES, STORE_LATENCY
from server.store.model import UPDATABLE_FIELDS, Attachment, Event, Origin, SessionState, StoredMessage

DEFAULT_OUTBOX_LIMIT = 256

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S", bound="SessionStore")


def timed(
    op: str,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, T]]], Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
]:
    """Record the latency of a store operation, and count it as failed when the backend was unavailable."""

    def decorate(
        method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(method)
        async def run(store: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            started = time.perf_counter()
            try:
                result = await method(store, *args, **kwargs)
            except StoreUnavailable:
                STORE_FAILURES.labels(op, store.backend).inc()
                raise
            STORE_LATENCY.labels(op, store.backend).observe(time.perf_counter() - started)
            return result

        return run

    return decorate


def check_updatable(changes: dict[str, Any]) -> None:
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"not updatable with update_fields: {', '.join(sorted(unknown))}")


class SessionStore(ABC):
    """Sessions as data, the one connection attached to each, and the events waiting for it."""

    backend: ClassVar[str]

    def __init__(
        self,
        *,
        resume_window: float,
        tombstone_ttl: float | None = None,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
    ) -> None:
        self.resume_window = resume_window
        self.tombstone_ttl = resume_window if tombstone_ttl is None else tombstone_ttl
        self.outbox_limit = outbox_limit
        # The attachments granted by this process and not yet detached or taken over.
        self._held: dict[str, list[Attachment]] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    @abstractmethod
    async def start(self) -> None:
        """Open the backend (raise `StoreUnavailable` with one clear line if it cannot be used)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and release the backend; everything written is already durable."""

    # -- sessions ---------------------------------------------------------------------------------

    @abstractmethod
    async def create(self, state: SessionState, token: str) -> Attachment:
        """Store a new session (with its history messages) attached to the connection `token`."""

    @abstractmethod
    async def load(self, session_id: str) -> SessionState:
        """The whole session; `SessionNotFound` or `SessionExpired` if it cannot be resumed."""

    @abstractmethod
    async def append_message(self, session_id: str, *, sender: str, content: str, origin: Origin) -> StoredMessage:
        """Append a message; its id is `msg_NNN`/`usr_NNN` with NNN its 1-based position (decided atomically),
        or the next free number when a history message already holds that id."""

    @abstractmethod
    async def append_modification(self, session_id: str, modification: str) -> None:
        """Add one reply modification (they accumulate)."""

    @abstractmethod
    async def update_fields(self, session_id: str, /, **changes: Any) -> None:
        """Replace fields named in `UPDATABLE_FIELDS` (values must be JSON-ready); `ValueError` for others."""

    @abstractmethod
    async def touch(self, session_id: str) -> None:
        """Count as activity: the resume window starts again."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Remove the session and everything in it now (`conversation_end`); its id then answers expired."""

    # -- attachment -----------------------------------------------------------------------------

    @abstractmethod
    async def attach(self, session_id: str, token: str) -> Attachment:
        """Attach connection `token`, taking the session over from whoever held it (on any worker or instance)."""

    @abstractmethod
    async def is_attached(self, attachment: Attachment) -> bool:
        """Ask the store whether `attachment` still holds its session (sets `taken_over` if not)."""

    @abstractmethod
    async def detach(self, attachment: Attachment) -> bool:
        """Release the session if `attachment` still holds it (connection dropped); False if it did not."""

    # -- events for a detached client -------------------------------------------------------------

    @abstractmethod
    async def deliver(self, attachment: Attachment, event: Event) -> bool:
        """True if `attachment` still holds the session: the caller sends `event` itself. Otherwise the
        event is queued as by `enqueue_event` and False is returned."""

    @abstractmethod
    async def enqueue_event(self, session_id: str, event: Event) -> None:
        """Queue an event for the session's next (or current) holder, in order; the holder is signalled.

        At most `outbox_limit` events are kept: beyond that the oldest go (the session's data holds
        everything they reported)."""

    @abstractmethod
    async def drain_events(self, attachment: Attachment) -> list[Event]:
        """Take the queued events, oldest first; `SessionTakenOver` if `attachment` no longer holds the session."""

    # -- attachments held by this process ---------------------------------------------------------

    def _hold(self, attachment: Attachment) -> Attachment:
        self._held.setdefault(attachment.session_id, []).append(attachment)
        return attachment

    def _release(self, attachment: Attachment) -> None:
        held = self._held.get(attachment.session_id)
        if held is not None and attachment in held:
            held.remove(attachment)
            if not held:
                del self._held[attachment.session_id]

    def _lost(self, attachment: Attachment) -> None:
        attachment.taken_over.set()
        self._release(attachment)

    def _observe(self, attachments: list[Attachment], epoch: int | None, holder: str | None, queued: bool) -> None:
        """Bring attachments of one session in line with what the store said about it.

        `epoch` None means the session is gone. A reply older than an attachment (a lower epoch, read
        before that attach committed) says nothing about it. Only attachments that were held when the
        store was asked may be passed: their create or attach had committed before the question.
        """
        for attachment in list(attachments):
            if epoch is None or epoch > attachment.epoch or (epoch == attachment.epoch and holder != attachment.token):
                self._lost(attachment)
            elif epoch == attachment.epoch and queued:
                attachment.events_waiting.set()

    def _held_now(self) -> dict[str, list[Attachment]]:
        return {session_id: list(held) for session_id, held in self._held.items()}
