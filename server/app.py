"""The Sanic application: routes, listeners and the wiring of engines into the protocol.

`create_app` runs in the main process and again in every Sanic worker (spawned, via AppLoader).
The main process prepares the runtime directory and registers the STT pool supervisor with
Sanic's worker manager; each worker builds its engines and serves WebSockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sanic import Request, Sanic, Websocket
from sanic.response import HTTPResponse, json
from sanic.server.protocols.websocket_protocol import WebSocketProtocol
from sanic_ext import Extend, openapi

from config import SERVICE_NAME, VERSION, Settings, load_settings
from config.logs import configure_logging
from server import metrics
from server.admission import ConnectionCounter, client_address, origin_allowed
from server.console_routes import register_console_routes
from server.conversation import Conversation, Services
from server.engines import build_generations, build_provider, build_transcriber
from server.metrics_endpoint import register_metrics_route
from server.protocol import encode
from server.sessions import AttachedSessions
from server.store import SessionExpired, SessionNotFound, SessionStore, StoreError, build_session_store
from stt_pool.layout import POOL_PROCESS_NAME

log = logging.getLogger("server.app")

APP_NAME = "ai_dialogue_backend"
# How long a worker waits for the main process's SIGTERM after asking it to stop the service.
FATAL_STOP_GRACE = 1.0
App = Sanic[Any, Any]


def _dumps(value: Any, **_: Any) -> str:
    # Non-string keys: sanic-ext keys OpenAPI responses by status code.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_app(settings: Settings | None = None) -> App:
    settings = settings or load_settings()
    configure_logging(settings)
    app = Sanic(APP_NAME, dumps=_dumps, configure_logging=False)
    app.config.update(
        {
            # One rule: a frame above MAX_MESSAGE_BYTES closes the connection with 1009.
            "WEBSOCKET_MAX_SIZE": settings.max_message_bytes,
            "WEBSOCKET_PING_INTERVAL": settings.websocket_ping_interval,
            "WEBSOCKET_PING_TIMEOUT": settings.websocket_ping_timeout,
            # Read by server/websocket_protocol.py: how long a client may leave our writes blocked.
            "WEBSOCKET_SEND_TIMEOUT": settings.websocket_send_timeout,
            "KEEP_ALIVE_TIMEOUT": 75,
            "OAS_UI_DEFAULT": "swagger",
            "OAS_URI_TO_UI": "/docs",
            "OAS_URL_PREFIX": "/docs",
            "CORS": False,
            "HEALTH": False,
        }
    )
    app.ctx.settings = settings
    Extend(app, config={"oas_ui_default": "swagger"})
    app.ext.openapi.describe(
        "AI对话应用后端 API",
        version=VERSION,
        description="HTTP endpoints of the conversation backend. The WebSocket protocol on "
        "`/conversation` is documented in docs/PROTOCOL.md.",
    )
    _register_listeners(app, settings)
    _register_routes(app)
    register_metrics_route(app)
    register_console_routes(app)
    return app


def _register_listeners(app: App, settings: Settings) -> None:
    @app.main_process_ready
    async def start_stt_pool(app: App) -> None:
        if settings.stt_mode == "vosk":
            # Imported here, in the main process only: a Sanic worker never loads the decoding side.
            from stt_pool.supervisor import run_supervisor

            app.manager.manage(POOL_PROCESS_NAME, run_supervisor, {"settings": settings})

    @app.before_server_start
    async def start_engines(app: App) -> None:
        transcriber = build_transcriber(settings, on_fatal=lambda error: _stop_the_service(app))
        provider = build_provider(settings)
        store = build_session_store(settings)
        # StoreUnavailable stops the worker; `python -m server` checked the store with one clear line first.
        await store.start()
        await transcriber.start()
        await provider.start()
        app.ctx.connections = 0
        app.ctx.connections_by_address = ConnectionCounter(settings.max_connections_per_ip)
        app.ctx.open_conversations = {}
        app.ctx.closing = set()
        app.ctx.stopping = False
        app.ctx.services = Services(
            settings=settings,
            store=store,
            sessions=AttachedSessions(),
            transcriber=transcriber,
            generations=build_generations(settings, provider),
        )
        log.info(
            "engines ready",
            extra={"stt_mode": transcriber.mode, "llm_mode": provider.mode, "service": SERVICE_NAME},
        )

    @app.after_server_start
    async def exit_with_main_process(app: App) -> None:
        # A worker whose main process was killed would live on unsupervised (still bound to the
        # port, still polling); it leaves instead. systemd does the same to the whole cgroup.
        main_pid = os.getppid()

        async def watch() -> None:
            while os.getppid() == main_pid:  # noqa: ASYNC110 (a parent's death has no event to wait on)
                await asyncio.sleep(1.0)
            log.error("main process gone, worker exiting", extra={"main_pid": main_pid})
            os._exit(1)

        app.add_task(watch(), name="watch-main-process")

    @app.before_server_stop
    async def drain_connections(app: App) -> None:
        # Runs while connections are still open: each open recording is finished and recorded, each
        # session detached (durable, resumable), then the socket closed with 1012 so the app reconnects
        # and resumes against the restarted service.
        app.ctx.stopping = True
        conversations: dict[Conversation, Websocket] = app.ctx.open_conversations
        if not conversations:
            return
        started = time.perf_counter()

        async def drain(conv: Conversation, ws: Websocket) -> None:
            await conv.close()
            await ws.close(1012, "service restarting")

        tasks = [asyncio.create_task(drain(conv, ws)) for conv, ws in list(conversations.items())]
        _, late = await asyncio.wait(tasks, timeout=settings.drain_timeout)
        for task in late:
            task.cancel()
        log.info(
            "connections drained",
            extra={
                "connections": len(tasks),
                "unfinished": len(late),
                "seconds": round(time.perf_counter() - started, 3),
            },
        )

    @app.after_server_stop
    async def stop_engines(app: App) -> None:
        services: Services = app.ctx.services
        closing: set[asyncio.Task[None]] = app.ctx.closing
        if closing:  # connections that ended just before the stop are still being detached
            await asyncio.wait(closing, timeout=settings.drain_timeout)
        services.generations.cancel_all()
        await services.generations.provider.close()
        await services.transcriber.close()
        await services.store.close()


def _register_routes(app: App) -> None:
    settings: Settings = app.ctx.settings
    timezone = local_timezone()

    @app.on_request
    async def refuse_foreign_origins(request: Request) -> HTTPResponse | None:
        # Before the upgrade, so a refused browser page gets a plain 403 and no WebSocket.
        if request.path == "/conversation" and not origin_allowed(
            request.headers.get("origin"), settings.allowed_origins
        ):
            log.info("websocket refused: origin not allowed", extra={"origin": request.headers.get("origin")})
            return json({"error": "forbidden", "message": "this Origin is not in ALLOWED_ORIGINS"}, status=403)
        return None

    @app.get("/")
    @openapi.summary("Liveness")
    @openapi.description("Fast liveness probe: answers as long as the process serves HTTP; no dependency checks.")
    async def liveness(request: Request) -> HTTPResponse:
        return json(
            {
                "status": "healthy",
                "timestamp": datetime.now(UTC).isoformat(),
                "service": "AI对话应用后端总服务",
                "version": VERSION,
                "description": "后端进程运行正常，各服务状态良好",
                "timezone": timezone,
            }
        )

    @app.get("/conversation/health")
    @openapi.summary("Readiness")
    @openapi.description(
        "Readiness of the conversation service from real checks of each part, with the mode of "
        "each engine (`vosk`/`mock`, `openrouter`/`mock`). Never contains keys."
    )
    async def readiness(request: Request) -> HTTPResponse:
        services: Services = request.app.ctx.services
        stt = services.transcriber.health()
        llm = services.generations.provider.health()
        loop_lag = await _loop_lag()
        parts = {
            "session_manager": await _store_health(services.store),
            "stt_service": stt["status"],
            "llm_service": llm["status"],
            "request_manager": "healthy" if loop_lag < 0.5 else "degraded",
            "websocket_handler": _websocket_health(request),
        }
        overall = "healthy" if all(state == "healthy" for state in parts.values()) else "degraded"
        return json(
            {
                "status": overall,
                "timestamp": time.time(),
                "service": "对话服务",
                "version": VERSION,
                "timezone": timezone,
                "services": parts,
                "engines": {"stt": stt, "llm": llm},
                "stats": {
                    "connections": request.app.ctx.connections,
                    "sessions": len(services.sessions),
                    "generations_running": services.generations.running,
                    "event_loop_lag_ms": round(loop_lag * 1000, 2),
                },
            }
        )

    @app.websocket("/conversation")  # type: ignore[untyped-decorator]
    @openapi.exclude()
    async def conversation(request: Request, ws: Websocket) -> None:
        if request.app.ctx.stopping:
            await ws.close(1012, "service restarting")
            return
        address = client_address(request)
        by_address: ConnectionCounter = request.app.ctx.connections_by_address
        if not by_address.enter(address):
            log.warning("websocket refused: too many connections", extra={"remote": address})
            await ws.close(1013, f"too many connections from this address (limit {by_address.limit})")
            return

        async def send(event: dict[str, Any]) -> None:
            # A client that stops reading is aborted by the protocol after WEBSOCKET_SEND_TIMEOUT.
            await ws.send(encode(event))

        conv = Conversation(request.app.ctx.services, send)
        conversations: dict[Conversation, Websocket] = request.app.ctx.open_conversations
        conversations[conv] = ws
        request.app.ctx.connections += 1
        metrics.CONNECTIONS.inc()
        log.info("connection opened", extra={"connection_id": conv.connection_id})
        try:
            while True:
                # Quiet is not dead: once the connection holds a session only a failed WebSocket ping
                # (server/websocket_protocol.py) closes it; before that, WEBSOCKET_TIMEOUT does.
                timeout = None if conv.holds_sessions.is_set() else settings.websocket_timeout
                raw = await ws.recv(timeout=timeout)
                if raw is None:
                    log.info("connection idle, closing", extra={"connection_id": conv.connection_id})
                    await ws.close(1000, "idle timeout")
                    break
                await conv.handle_frame(raw)
        finally:
            by_address.leave(address)
            conversations.pop(conv, None)
            # A closing handshake ends this loop by cancelling `recv`; the connection's loss then cancels
            # the handler a second time (Sanic's connection_lost), maybe in the middle of the cleanup, which
            # may wait on the store. The cleanup is a task of its own, which that cancel does not cut short.
            cleanup = asyncio.create_task(_closed(request.app, conv), name=f"close:{conv.connection_id}")
            closing: set[asyncio.Task[None]] = request.app.ctx.closing
            closing.add(cleanup)
            cleanup.add_done_callback(closing.discard)
            await asyncio.shield(cleanup)


def _stop_the_service(app: App) -> None:
    """The STT pool failed for good: ask the main process to stop the whole service (exit code 3).

    The main process answers with a SIGTERM to every worker. One that lands while this worker is
    still starting is lost (Sanic stops the loop of its start-up, then serves on), and the service
    stayed up some 30 s more until Sanic's stop timeout killed the worker. So the worker also stops
    itself a moment later, unless it is already stopping.
    """
    app.m.terminate()

    async def stop_unless_stopping() -> None:
        await asyncio.sleep(FATAL_STOP_GRACE)
        if not getattr(app.ctx, "stopping", False):
            log.warning("the stop request was lost while the worker started; stopping it")
            app.stop(terminate=False)

    app.ctx.fatal_stop = asyncio.get_running_loop().create_task(stop_unless_stopping(), name="stop-the-service")


async def _closed(app: App, conv: Conversation) -> None:
    """A connection's end: its sessions detached (an open recording recorded), then it is counted closed."""
    try:
        await conv.close()
    finally:
        app.ctx.connections -= 1
        metrics.CONNECTIONS.dec()
        log.info("connection closed", extra={"connection_id": conv.connection_id})


async def _store_health(store: SessionStore) -> str:
    """The session store answers a read: an unknown id is reported as not found, not as a failure."""
    try:
        await store.load("readiness-probe")
    except (SessionNotFound, SessionExpired):
        return "healthy"
    except StoreError:
        return "unavailable"
    return "healthy"


def _websocket_health(request: Request) -> str:
    """Whether this worker's server speaks the WebSocket upgrade that `/conversation` needs."""
    protocol = request.transport.get_protocol()
    return "healthy" if request.app.websocket_enabled and isinstance(protocol, WebSocketProtocol) else "unavailable"


def local_timezone() -> str:
    """The IANA name of the server's time zone (TZ, else /etc/localtime), else its abbreviation."""
    configured = os.environ.get("TZ", "").lstrip(":")
    if configured:
        return configured
    localtime = Path("/etc/localtime")
    if localtime.is_symlink() and "zoneinfo/" in str(localtime.resolve()):
        return str(localtime.resolve()).split("zoneinfo/", 1)[1]
    return datetime.now().astimezone().tzname() or "UTC"


async def _loop_lag() -> float:
    started = time.perf_counter()
    await asyncio.sleep(0)
    return time.perf_counter() - started
