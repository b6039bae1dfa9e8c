"""A Sanic worker talks to the pool through `stt_pool.client` without loading the decoding side."""

from __future__ import annotations

import os
import subprocess
import sys

from harness.server import ROOT


def test_the_pool_client_imports_neither_vosk_nor_the_decoder_nor_the_settings():
    probe = (
        "import sys, stt_pool.client; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {'vosk', 'stt_pool', 'config'})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "stt_pool.client" in loaded
    assert not {"vosk", "stt_pool.decoder", "stt_pool.supervisor", "stt_pool.model", "config"} & set(loaded), loaded


def test_a_sanic_worker_building_its_app_and_engines_loads_nothing_of_the_decoding_side(tmp_path):
    """What a worker runs (create_app, then build_transcriber at start-up) with a model configured:
    the pool client only; the supervisor is imported by the main process when it registers it."""
    (tmp_path / "model").mkdir()
    probe = (
        "import sys\n"
        "from server.app import create_app\n"
        "from server.engines import build_transcriber\n"
        "app = create_app()\n"
        "assert app.ctx.settings.stt_mode == 'vosk'\n"
        "assert build_transcriber(app.ctx.settings, on_fatal=print).mode == 'vosk'\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {'vosk', 'stt_pool'})))"
    )
    env = {
        **os.environ,
        "ENV_FILE": os.devnull,
        "SANIC_WORKER_NAME": "Sanic-Server-0-0",
        "VOSK_MODEL_PATH": str(tmp_path / "model"),
        "RUNTIME_DIR": str(tmp_path / "run"),
    }
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "stt_pool.client" in loaded
    assert not {"vosk", "stt_pool.decoder", "stt_pool.supervisor", "stt_pool.model"} & set(loaded), loaded


def test_the_pool_imports_no_settings_but_in_its_process_entry_point():
    """Only the supervisor (the pool process's entry point) uses `config`, for its logging set-up."""
    modules = [path.stem for path in (ROOT / "stt_pool").glob("*.py") if path.stem not in {"__init__", "supervisor"}]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module('stt_pool.' + name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'config')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "model" in modules and "decoder" in modules
    assert loaded.stdout.split() == [], loaded.stdout
