"""The baseline: a one-process thread-pool Vosk server, the design of alphacephei's vosk-server.

One process loads the model; every WebSocket connection gets a `KaldiRecognizer`; each binary
audio message is decoded in a `ThreadPoolExecutor` (one thread per core) as it arrives, and the
text message `{"eof": 1}` returns the final result. Written here from that design for a side by
side comparison in the same run; run with `python -m bench.baseline_threadpool_server PORT MODEL`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
from typing import Any

import vosk
import websockets

SAMPLE_RATE = 16000


async def serve(port: int, model_path: str) -> None:
    vosk.SetLogLevel(-1)
    model = vosk.Model(model_path)
    pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    loop = asyncio.get_running_loop()

    async def recognize(websocket: Any) -> None:
        recognizer = vosk.KaldiRecognizer(model, SAMPLE_RATE)
        async for message in websocket:
            if isinstance(message, bytes):
                await loop.run_in_executor(pool, recognizer.AcceptWaveform, message)
                continue
            if json.loads(message).get("eof"):
                final = await loop.run_in_executor(pool, recognizer.FinalResult)
                await websocket.send(final)
                recognizer = vosk.KaldiRecognizer(model, SAMPLE_RATE)

    async with websockets.serve(recognize, "127.0.0.1", port, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
