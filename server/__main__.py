"""`python -m server`: validate the settings, prepare the runtime directory, run Sanic.

An invalid setting stops here with one line naming the variable (exit code 2); a Vosk model that
exists but cannot be loaded stops the service with one line too (exit code 3).
"""

from __future__ import annotations

import os
import shutil
import sys

from config import ConfigError, Settings, load_settings


def prepare_runtime_dir(settings: Settings) -> None:
    """Start from an empty runtime directory: sockets, PCM buffers and metrics of a previous run go."""
    runtime = settings.pool_dir
    shutil.rmtree(runtime, ignore_errors=True)
    (runtime / "metrics").mkdir(parents=True, mode=0o700)
    # prometheus_client reads this when first imported, in this process and in every worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(runtime / "metrics")


def main() -> int:
    try:
        settings = load_settings()
        if settings.stt_mode == "vosk":
            from stt_pool.model import check_model_dir

            check_model_dir(settings.vosk_model_path)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    prepare_runtime_dir(settings)

    from sanic import Sanic
    from sanic.worker.loader import AppLoader

    from server.app import create_app

    loader = AppLoader(factory=create_app)
    app = loader.load()
    app.prepare(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        debug=settings.debug,
        access_log=settings.debug,
        motd=False,
    )
    Sanic.serve(primary=app, app_loader=loader)
    if settings.stt_mode == "vosk":
        from stt_pool.status import PoolStatus

        failure = PoolStatus.read_failure(settings.pool_dir)
        if failure:
            print(f"STT pool failed: {failure}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
