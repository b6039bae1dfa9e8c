"""The pool supervisor: load the model once, fork the decoding processes, replace the dead ones.

Sanic's worker manager starts this process (see server/app.py) and stops it with SIGTERM. The
decoders are forked from here after the model is loaded, so they share its pages copy-on-write,
and a replacement is ready in milliseconds. Each decoder slot owns a listening Unix socket that
the supervisor keeps open across restarts: Sanic workers reconnect at once and their requests
wait in the socket's backlog until the replacement accepts them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from config.logs import configure_logging
from stt_pool.decoder import DecoderConfig, run_decoder
from stt_pool.layout import buffer_dir, socket_path
from stt_pool.model import load_model
from stt_pool.status import PoolState, PoolStatus, SlotState

if TYPE_CHECKING:
    from config import Settings

log = logging.getLogger("stt_pool.supervisor")

POLL_INTERVAL = 0.05
HUNG_AFTER = 15.0
MAX_BACKOFF = 5.0
# A decoder that dies sooner after its start than this is failing, not unlucky: restart it later.
YOUNG = 1.0


@dataclass(frozen=True)
class PoolConfig:
    runtime_dir: Path
    model_path: Path
    workers: int
    streams_per_worker: int
    max_backlog_ms: int
    piece_ms: int
    partial_interval: float


class Supervisor:
    def __init__(self, config: PoolConfig, model: Any, status: PoolStatus, stop: threading.Event) -> None:
        self.config = config
        self.stop_requested = stop
        self.model = model
        self.status = status
        self.listeners = [self._listen(socket_path(config.runtime_dir, i)) for i in range(config.workers)]
        self.children: dict[int, int] = {}  # pid -> slot index
        self.failures = [0] * config.workers
        self.spawned_at = [0.0] * config.workers  # monotonic
        # Slots whose decoder died, with the time (monotonic) their replacement is due.
        self.restarts_due: dict[int, float] = {}

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(128)
        return listener

    def spawn(self, index: int) -> None:
        slot = self.status.slots[index]
        slot.state = SlotState.STARTING
        slot.heartbeat = time.time()
        self.spawned_at[index] = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the decoder
            code = 0
            try:
                for other, listener in enumerate(self.listeners):
                    if other != index:
                        listener.close()
                config = DecoderConfig(
                    index=index,
                    runtime_dir=self.config.runtime_dir,
                    streams_limit=self.config.streams_per_worker,
                    max_backlog_ms=self.config.max_backlog_ms,
                    piece_ms=self.config.piece_ms,
                    partial_interval=self.config.partial_interval,
                )
                run_decoder(config, self.model, self.listeners[index], self.status)
            except BaseException:
                log.exception("decoder crashed", extra={"decoder": index})
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        slot.pid = pid
        log.info("decoder started", extra={"decoder": index, "decoder_pid": pid})

    def run(self) -> None:
        for index in range(len(self.listeners)):
            self.spawn(index)
        if not self.stop_requested.is_set():
            self.status.header.state = PoolState.READY
        log.info("stt pool ready", extra={"workers": len(self.listeners)})
        while not self.stop_requested.is_set():
            self._reap()
            self._restart_due()
            self._kill_hung()
            time.sleep(POLL_INTERVAL)
        self.shutdown()

    def _reap(self) -> None:
        """Collect dead decoders and schedule their replacement, backing off while they die young.

        Never waits: this loop also watches for stop and for hung decoders.
        """
        for pid, index in list(self.children.items()):
            try:
                done, wait_status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, wait_status = pid, 0
            if not done:
                continue
            del self.children[pid]
            if self.stop_requested.is_set():
                continue
            slot = self.status.slots[index]
            slot.state = SlotState.DEAD
            slot.restarts += 1
            self.status.header.restarts += 1
            lived = time.monotonic() - self.spawned_at[index]
            self.failures[index] = self.failures[index] + 1 if lived < YOUNG else 0
            backoff = min(MAX_BACKOFF, 0.1 * 2 ** self.failures[index]) if self.failures[index] else 0.0
            log.warning(
                "decoder died, restarting",
                extra={"decoder": index, "decoder_pid": pid, "exit": _describe_exit(wait_status), "backoff_s": backoff},
            )
            self.restarts_due[index] = time.monotonic() + backoff

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, due in list(self.restarts_due.items()):
            if due <= now:
                del self.restarts_due[index]
                self.spawn(index)

    def _kill_hung(self) -> None:
        now = time.time()
        for pid, index in list(self.children.items()):
            slot = self.status.slots[index]
            if slot.state == SlotState.READY and now - slot.heartbeat > HUNG_AFTER:
                log.error("decoder hung, killing", extra={"decoder": index, "decoder_pid": pid})
                _signal(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        self.status.header.state = PoolState.STOPPING
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self.children[pid]
            time.sleep(POLL_INTERVAL)
        for pid in self.children:
            _signal(pid, signal.SIGKILL)
        for index, listener in enumerate(self.listeners):
            listener.close()
            socket_path(self.config.runtime_dir, index).unlink(missing_ok=True)
        log.info("stt pool stopped")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return


def _describe_exit(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return signal.Signals(os.WTERMSIG(wait_status)).name
    return f"exit {os.waitstatus_to_exitcode(wait_status)}"


def run_supervisor(settings: Settings) -> None:
    """Entry point of the process Sanic's worker manager starts."""
    configure_logging(settings)
    config = PoolConfig(
        runtime_dir=settings.pool_dir,
        model_path=settings.vosk_model_path,
        workers=settings.stt_workers,
        streams_per_worker=settings.stt_streams_per_worker,
        max_backlog_ms=settings.stt_max_backlog_ms,
        piece_ms=settings.stt_piece_ms,
        partial_interval=settings.partial_interval_ms / 1000,
    )
    status = PoolStatus.create(config.runtime_dir, config.workers)
    buffer_dir(config.runtime_dir).mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def request_stop(*_: object) -> None:
        # Said before anything dies, so the Sanic workers do not take this exit for a crash.
        status.header.state = PoolState.STOPPING
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    status.header.state = PoolState.LOADING
    started = time.monotonic()
    try:
        model = load_model(config.model_path)
    except Exception as error:
        message = f"cannot load the Vosk model at {config.model_path}: {error}"
        log.error(message)
        status.fail(message)  # the Sanic workers see it and stop the service (see PoolTranscriber)
        sys.exit(1)
    status.header.model_load_ms = int((time.monotonic() - started) * 1000)
    status.header.model_rss = psutil.Process().memory_info().rss
    log.info("vosk model loaded", extra={"model": str(config.model_path), "load_ms": status.header.model_load_ms})
    if not stop.is_set():
        Supervisor(config, model, status, stop).run()
