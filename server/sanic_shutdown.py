"""A safer stop signal for Sanic's main process (sanic-org/sanic#2997).

Sanic's handler for SIGTERM/SIGINT talks to the worker-state manager (a multiprocessing
Manager, over a socket) from inside the signal handler. When the signal lands while the main
loop is itself in such a call, the two conversations interleave: the service hangs until it is
killed or exits 1 with `TypeError: 'NoneType' object is not a mapping`, so `systemctl stop`
becomes a SIGKILL. Here the handler only wakes the monitor loop; the shutdown itself runs in the
loop, outside the handler. A second signal still kills at once, as in Sanic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from signal import Signals
from types import FrameType
from typing import Any

from sanic.worker.manager import WorkerManager

log = logging.getLogger("sanic.root")

_sanic_shutdown_signal: Callable[..., None] = WorkerManager.shutdown_signal
_sanic_monitor: Callable[..., None] = WorkerManager.monitor


def _shutdown_signal(self: Any, signum: int, frame: FrameType | None) -> None:
    if self._shutting_down or getattr(self, "_stop_requested", False):
        self._shutting_down = True
        _sanic_shutdown_signal(self, signum, frame)  # second signal: kill
        return
    self._stop_requested = True
    log.info("Received signal %s. Shutting down.", Signals(signum).name)
    self.monitor_publisher.send(None)  # makes the monitor loop return


def _monitor(self: Any) -> None:
    _sanic_monitor(self)
    if getattr(self, "_stop_requested", False):
        self.shutdown()


def install() -> None:
    """Patch before `Sanic.serve` creates the manager (it binds the handler in its constructor)."""
    WorkerManager.shutdown_signal = _shutdown_signal  # type: ignore[method-assign]
    WorkerManager.monitor = _monitor  # type: ignore[method-assign]
