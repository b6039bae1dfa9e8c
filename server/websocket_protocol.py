"""Sanic's WebSocket protocol with back-pressure, a stall limit and a clean close for undecodable text.

Sanic hands every chunk read from a WebSocket to a new task and keeps reading, whether or not the
earlier chunks have been handled. A client that sends faster than its connection handles frames
(or sends pings while not reading our pongs) therefore made the worker buffer without bound: 1.4 GB
in 15 s in one test. Here reading pauses while a few chunks are still in flight, so the client's
own TCP window absorbs the excess. (Sanic's own pause, taken while a whole message waits to be
fetched, is switched off: every fetch lifted it, even with thousands of chunks still waiting.)

A client that stops reading fills our write buffer; every send then waits, Sanic's keep-alive ping
included, so it escaped every timeout and kept its recordings. When writing has been blocked for
WEBSOCKET_SEND_TIMEOUT seconds the connection is aborted, which ends its handler like any drop.

A text frame that is not UTF-8 failed such a task with a traceback and left the connection
hanging; it now closes the connection with 1007, as RFC 6455 asks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sanic.server.protocols.websocket_protocol import WebSocketProtocol

log = logging.getLogger("server.websocket")

# Chunks (each at most one socket read) handed to Sanic but not yet handled. Two keep the
# pipeline full while a frame is being handled; beyond that the bytes may as well stay in TCP.
MAX_CHUNKS_IN_FLIGHT = 2


class BackPressureWebSocketProtocol(WebSocketProtocol):
    __slots__ = ("_in_flight", "_paused_here", "_stall_timer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._paused_here = False
        self._stall_timer: asyncio.TimerHandle | None = None

    async def websocket_handshake(self, request: Any, subprotocols: Any = None) -> Any:
        websocket = await super().websocket_handshake(request, subprotocols)
        websocket.can_pause = False  # reading is paused here, for every reason at once
        return websocket

    def data_received(self, data: bytes) -> None:
        websocket: Any = self.websocket
        if websocket is None:  # still HTTP: the upgrade request
            super().data_received(data)  # type: ignore[no-untyped-call]
            return
        websocket.ws_proto.receive_data(data)
        to_send = websocket.ws_proto.data_to_send()
        events = websocket.ws_proto.events_received()
        if not to_send and not events:
            return
        task = asyncio.create_task(websocket.async_data_received(to_send, events))
        self._in_flight.add(task)
        task.add_done_callback(self._chunk_handled)
        if len(self._in_flight) >= MAX_CHUNKS_IN_FLIGHT and self.transport is not None:
            self.transport.pause_reading()
            self._paused_here = True

    def _chunk_handled(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        error = None if task.cancelled() else task.exception()
        if self.transport is None or self.transport.is_closing():
            return  # whatever failed, failed because the connection is gone
        if isinstance(error, UnicodeDecodeError):
            log.info("text frame is not UTF-8, closing", extra={"peer": self.websocket_peer})
            self._fail(1007, "text frame is not valid UTF-8")
        elif error is not None:
            log.error("websocket frame handling failed", exc_info=error)
            self._fail(1011, "internal error")
        if self._paused_here and len(self._in_flight) < MAX_CHUNKS_IN_FLIGHT:
            self._paused_here = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[no-untyped-call]
        if self.websocket is not None and self._stall_timer is None:
            timeout = float(self.app.config.WEBSOCKET_SEND_TIMEOUT)
            self._stall_timer = self.loop.call_later(timeout, self._abort_stalled, timeout)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[no-untyped-call]
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _abort_stalled(self, timeout: float) -> None:
        self._stall_timer = None
        log.warning("client has not read for %.0f s, closing", timeout, extra={"peer": self.websocket_peer})
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, code: int, reason: str) -> None:
        if self.websocket is not None:
            self.websocket.fail_connection(code, reason)
