"""What the service changes in Sanic's worker manager (the main process), installed before `Sanic.serve`.

- A safer stop signal (sanic-org/sanic#2997). Sanic's handler for SIGTERM/SIGINT talks to the
  worker-state manager (a multiprocessing Manager, over a socket) from inside the signal handler.
  When the signal lands while the main loop is itself in such a call, the two conversations
  interleave: the service hangs until it is killed or exits 1 with `TypeError: 'NoneType' object
  is not a mapping`, so `systemctl stop` becomes a SIGKILL. Here the handler only wakes the
  monitor loop; the shutdown itself runs in the loop, outside the handler. A second signal still
  kills at once, as in Sanic.
- SIGHUP (`systemctl reload`) restarts the Sanic workers, each new one started before its old one
  is stopped, so the port never goes unanswered. The STT pool is not restarted.
- On shutdown the Sanic workers stop first, and the STT pool only once they have exited (or after
  SERVER_STOP_WAIT seconds): a stopping worker still finishes its open recordings' transcripts
  (DRAIN_TIMEOUT, server/app.py), which needs the pool.
- A Sanic worker that dies (SIGKILL by the OOM killer, SIGBUS, a crash) is replaced at once.
  Sanic only records its state, so the port stayed bound by the main process with nobody
  accepting, and systemd saw a healthy service. A worker that keeps dying (more than
  MAX_REPLACEMENTS in REPLACEMENT_WINDOW seconds) stops the service with exit code 1 instead,
  so systemd's restart policy and start limit take over.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from signal import Signals
from types import FrameType
from typing import Any

from sanic.worker.constants import ProcessState
from sanic.worker.manager import WorkerManager

log = logging.getLogger("sanic.root")

MAX_REPLACEMENTS = 5
# Longer than DRAIN_TIMEOUT's maximum plus Sanic's own stop; shorter than the unit's TimeoutStopSec=30.
SERVER_STOP_WAIT = 20.0
REPLACEMENT_WINDOW = 60.0
# Sanic's monitor message for "restart every server worker, new one first" (what `app.m.restart(
# all_workers=True, zero_downtime=True)` sends from a worker).
RESTART_ALL_NEW_FIRST = "__ALL_PROCESSES__::STARTUP_FIRST"

# Set when the service stopped because a worker kept dying; `python -m server` then exits 1.
workers_kept_dying = threading.Event()

_sanic_init: Callable[..., None] = WorkerManager.__init__
_sanic_shutdown_signal: Callable[..., None] = WorkerManager.shutdown_signal
_sanic_monitor: Callable[..., None] = WorkerManager.monitor
_sanic_sync_states: Callable[..., None] = WorkerManager._sync_states
_sanic_shutdown: Callable[..., None] = WorkerManager.shutdown


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _sanic_init(self, *args, **kwargs)
    self._replacements = []
    signal.signal(signal.SIGHUP, self.reload_signal)


def _stopping(self: Any) -> bool:
    return bool(self._shutting_down or getattr(self, "_stop_requested", False))


def _shutdown_signal(self: Any, signum: int, frame: FrameType | None) -> None:
    if _stopping(self):
        self._shutting_down = True
        _sanic_shutdown_signal(self, signum, frame)  # second signal: kill
        return
    self._stop_requested = True
    log.info("Received signal %s. Shutting down.", Signals(signum).name)
    self.monitor_publisher.send(None)  # makes the monitor loop return


def _reload_signal(self: Any, signum: int, frame: FrameType | None) -> None:
    if _stopping(self):
        return
    log.info("Received signal SIGHUP. Restarting the Sanic workers (new ones first).")
    self.monitor_publisher.send(RESTART_ALL_NEW_FIRST)  # handled by the monitor loop, not here


def _monitor(self: Any) -> None:
    _sanic_monitor(self)
    if getattr(self, "_stop_requested", False):
        self.shutdown()


def _shutdown(self: Any) -> None:
    servers = [process for process in self.transient_processes if process.is_alive()]
    for process in servers:
        process.terminate()
    deadline = time.monotonic() + SERVER_STOP_WAIT
    while any(process.is_alive() for process in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    if stuck := [process.name for process in servers if process.is_alive()]:
        log.warning("Sanic workers still running %.0f s after SIGTERM: %s", SERVER_STOP_WAIT, ", ".join(stuck))
    _sanic_shutdown(self)  # the STT pool, and any worker still alive


def _sync_states(self: Any) -> None:
    _sanic_sync_states(self)
    # Sanic stops a restarted worker's old process but never waits for it: reap it, or every
    # reload would leave one zombie per worker.
    multiprocessing.active_children()
    if _stopping(self):
        return
    for process in list(self.transient_processes):
        if process.state is ProcessState.FAILED and not process.is_alive():
            _replace_dead_worker(self, process)


def _replace_dead_worker(self: Any, process: Any) -> None:
    now = time.monotonic()
    self._replacements = [at for at in self._replacements if now - at < REPLACEMENT_WINDOW]
    if len(self._replacements) >= MAX_REPLACEMENTS:
        log.error(
            "Sanic worker %s died again (%d replacements in %.0f s): stopping the service",
            process.name,
            len(self._replacements),
            REPLACEMENT_WINDOW,
        )
        workers_kept_dying.set()
        self._stop_requested = True
        self.monitor_publisher.send(None)
        return
    self._replacements.append(now)
    log.error(
        "Sanic worker %s [%s] died (exit code %s); starting a new one", process.name, process.pid, process.exitcode
    )
    self.restart(process_names=[process.name])


def install() -> None:
    """Patch before `Sanic.serve` creates the manager (it binds the signal handlers in its constructor)."""
    WorkerManager.__init__ = _init  # type: ignore[method-assign]
    WorkerManager.shutdown_signal = _shutdown_signal  # type: ignore[method-assign]
    WorkerManager.reload_signal = _reload_signal  # type: ignore[attr-defined]
    WorkerManager.monitor = _monitor  # type: ignore[method-assign]
    WorkerManager._sync_states = _sync_states  # type: ignore[method-assign]
    WorkerManager.shutdown = _shutdown  # type: ignore[method-assign]
