"""A Sanic worker talks to the pool through `stt_pool.client` without loading the decoding side."""

from __future__ import annotations

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
