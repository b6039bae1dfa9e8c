"""`python -m server`: validate the settings, prepare the runtime directory, run Sanic.

An invalid setting stops here with one line naming the variable (exit code 2); a Vosk model that
exists but cannot be loaded stops the service with one line too (exit code 3); a Sanic worker that
keeps dying stops it with exit code 1 (server/worker_manager.py), for systemd to restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

from config import ConfigError, Settings, load_settings


def prepare_runtime_dir(settings: Settings) -> None:
    """Start from an empty runtime directory: sockets, PCM buffers and metrics of a previous run go.

    The directory itself stays: under systemd it is the unit's RuntimeDirectory, created by systemd
    in root-owned /run, where the service user can empty it but not remove or recreate it.
    """
    runtime = settings.pool_dir
    # Emptying is only safe for a directory of our own: a RUNTIME_DIR set to /tmp or a home
    # directory by mistake must stop the start, not lose its files.
    if runtime.is_dir() and (runtime.stat().st_mode & 0o077 or runtime.stat().st_uid != os.geteuid()):
        raise ConfigError(
            f"invalid setting RUNTIME_DIR ({runtime}): it is emptied at every start, so an existing "
            "directory must be the service's own and private (mode 0700)"
        )
    # Private: the decoder sockets and the PCM of open recordings live here.
    runtime.mkdir(parents=True, mode=0o700, exist_ok=True)
    empty_directory(runtime)
    (runtime / "metrics").mkdir(mode=0o700)
    # prometheus_client reads this when first imported, in this process and in every worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(runtime / "metrics")


def empty_directory(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_port_free(host: str, port: int) -> None:
    """One clear line instead of a traceback from deep inside Sanic when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"invalid setting PORT ({host}:{port}): cannot listen there: {error.strerror}") from None


def check_session_store(settings: Settings) -> None:
    """One clear line (exit 2) when the session store cannot be opened, before any worker tries."""
    import asyncio

    from server.store import StoreUnavailable, build_session_store

    async def probe() -> None:
        store = build_session_store(settings)
        await store.start()
        await store.close()

    try:
        asyncio.run(probe())
    except StoreUnavailable as error:
        raise ConfigError(f"session store unavailable: {error}") from None


def main() -> int:
    try:
        settings = load_settings()
        if settings.stt_mode == "vosk":
            from stt_pool.errors import InvalidModel
            from stt_pool.model import check_model_dir

            try:
                check_model_dir(settings.vosk_model_path)
            except InvalidModel as error:
                raise ConfigError(f"invalid setting VOSK_MODEL_PATH ({settings.vosk_model_path}): {error}") from None
        check_port_free(settings.host, settings.port)
        check_session_store(settings)
        prepare_runtime_dir(settings)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    finally:
        empty_directory(settings.pool_dir)
        with contextlib.suppress(OSError):  # systemd's RuntimeDirectory is not ours to remove
            settings.pool_dir.rmdir()


def serve(settings: Settings) -> int:

    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from server import worker_manager
    from server.app import create_app
    from server.websocket_protocol import BackPressureWebSocketProtocol

    worker_manager.install()
    loader = AppLoader(factory=create_app)
    app = loader.load()
    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        debug=settings.debug,
        access_log=settings.debug,
        motd=False,
        protocol=BackPressureWebSocketProtocol,
    )
    Sanic.serve(primary=app, app_loader=loader)
    if worker_manager.workers_kept_dying.is_set():
        print("a Sanic worker kept dying; stopped so that systemd restarts the service", file=sys.stderr)
        return 1
    if settings.stt_mode == "vosk":
        from stt_pool.status import PoolStatus

        failure = PoolStatus.read_failure(settings.pool_dir)
        if failure:
            print(f"STT pool failed: {failure}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
