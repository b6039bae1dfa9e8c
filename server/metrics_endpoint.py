"""`GET /metrics`: the Prometheus text exposition of the whole service, answered by any Sanic worker.

The service metrics (server/metrics.py) live in prometheus_client's multiprocess files, one per
writer, and `MultiProcessCollector` sums them, so a scrape that lands on one worker still counts
the work of all. Process and pool figures are read at scrape time (server/process_metrics.py).
With METRICS_TOKEN set the endpoint needs `Authorization: Bearer <token>` (only the header: a token
in the URL would land in proxy and access logs). `/metrics/` is not a second route to it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import SecretStr
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json
from sanic_ext import openapi

from config import VERSION, Settings
from server.memory_limit import MemoryLimit
from server.process_metrics import ServiceCollector

log = logging.getLogger("server.metrics")

# prometheus_client's multiprocess module has no annotations: typed names for what we call.
_mark_process_dead: Callable[[int, str | None], None] = multiprocess.mark_process_dead
_files_collector: Callable[[CollectorRegistry | None, str], Collector] = multiprocess.MultiProcessCollector


class BuildInfo(Collector):
    def __init__(self, settings: Settings) -> None:
        self.labels = {"version": VERSION, "stt_mode": settings.stt_mode, "llm_mode": settings.llm_mode}

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("adb_build_info", "Version and engine modes of the service", labels=list(self.labels))
        info.add_metric(list(self.labels.values()), 1)
        yield info


class WorkerMetricFiles(Collector):
    """The multiprocess files of every Sanic worker, summed.

    A worker that stops cleanly drops its live gauges itself (see `register_metrics_route`); one
    that was killed cannot, so its live-gauge files are dropped here, or its open connections
    would be counted forever. Its counters stay: what it did still happened.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = _files_collector(None, str(directory))

    def collect(self) -> Iterator[Metric]:
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = int(path.stem.rsplit("_", 1)[1])
            if not psutil.pid_exists(pid):
                _mark_process_dead(pid, str(self.directory))
        yield from self.files.collect()


def build_registry(settings: Settings) -> CollectorRegistry:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set: start the service with `python -m server`")
    registry = CollectorRegistry()
    registry.register(WorkerMetricFiles(Path(directory)))
    registry.register(ServiceCollector(settings.pool_dir if settings.stt_mode == "vosk" else None))
    registry.register(BuildInfo(settings))
    registry.register(MemoryLimit())
    return registry


def authorized(request: Request, token: SecretStr | None) -> bool:
    """True without a configured token, else when the request presents it as a bearer token."""
    if token is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    offered = credentials.strip() if scheme.lower() == "bearer" else ""
    return bool(offered) and hmac.compare_digest(offered.encode(), token.get_secret_value().encode())


def register_metrics_route(app: Sanic[Any, Any]) -> None:
    settings: Settings = app.ctx.settings

    @app.before_server_start
    async def open_metrics(app: Sanic[Any, Any]) -> None:
        app.ctx.metrics_registry = build_registry(settings)

    @app.after_server_stop
    async def drop_live_gauges(app: Sanic[Any, Any]) -> None:
        # What prometheus_client's docs ask of a stopping process: its connections, sessions and
        # recordings no longer count.
        _mark_process_dead(os.getpid(), None)

    @app.get("/metrics", strict_slashes=True)
    @openapi.summary("Prometheus metrics")
    @openapi.description(
        "Prometheus text exposition format (`CONTENT_TYPE_LATEST` of prometheus_client): service "
        "counters and histograms summed over every Sanic worker, CPU and memory of every process of "
        "the service, STT pool figures. When METRICS_TOKEN is set, send `Authorization: Bearer "
        "<token>`; without it the answer is 401 with a JSON error."
    )
    async def metrics(request: Request) -> HTTPResponse:
        if not authorized(request, settings.metrics_token):
            remote = request.remote_addr or request.ip
            log.warning("metrics request refused: missing or wrong token", extra={"remote": remote})
            return json(
                {"error": "unauthorized", "message": "a valid metrics token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        # Reading the multiprocess files and /proc takes milliseconds: not on the event loop.
        body = await asyncio.to_thread(generate_latest, request.app.ctx.metrics_registry)
        return HTTPResponse(body, content_type=CONTENT_TYPE_LATEST)
