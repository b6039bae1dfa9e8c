"""Figures of every process of the service and of the STT pool, read when `/metrics` is scraped.

The Sanic worker that answers the scrape finds the others: the main process is its parent; Sanic
names the children it starts in their environment (SANIC_WORKER_NAME is "Sanic-Server-<n>-<k>" for
server worker n, "Sanic-STTPool-<k>" for the pool supervisor); the decoding processes are the
supervisor's children that hold a slot of the pool's status table. Any other child of the main
process (multiprocessing's resource tracker, the SyncManager behind Sanic's shared state) is
reported as role="helper": it serves no request, but its memory is the service's, so a sum over
`adb_process_*` is what the service costs the machine.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stt_pool.layout import POOL_PROCESS_NAME
from stt_pool.status import PoolStatus, SlotState

SERVER_WORKER_NAME = re.compile(r"^Sanic-Server-(\d+)-\d+$")
POOL_SUPERVISOR_NAME = re.compile(rf"^Sanic-{POOL_PROCESS_NAME}-\d+$")
# PSS comes from /proc/<pid>/smaps_rollup, which the kernel computes by walking every mapping.
SAMPLE_MAX_AGE = 2.0
PROCESS_LABELS = ("role", "index", "pid")


@dataclass(frozen=True, slots=True)
class ServiceProcess:
    role: str  # main, worker, pool_supervisor, decoder or helper
    index: int
    pid: int

    @property
    def labels(self) -> list[str]:
        return [self.role, str(self.index), str(self.pid)]


@dataclass(frozen=True, slots=True)
class ProcessSample:
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int
    threads: int
    open_fds: int
    start_time: float


class ProcessSampler:
    """psutil figures per process, kept `max_age` seconds so frequent scrapes stay cheap."""

    def __init__(self, max_age: float = SAMPLE_MAX_AGE) -> None:
        self.max_age = max_age
        self._samples: dict[int, tuple[float, ProcessSample]] = {}
        self._lock = threading.Lock()

    def sample(self, pid: int) -> ProcessSample | None:
        """The figures of `pid`, or None once it is gone."""
        now = time.monotonic()
        with self._lock:
            cached = self._samples.get(pid)
        if cached is not None and now - cached[0] < self.max_age:
            return cached[1]
        sample = _measure(pid)
        with self._lock:
            if sample is None:
                self._samples.pop(pid, None)
            else:
                self._samples[pid] = (now, sample)
        return sample

    def forget_all_but(self, pids: Iterable[int]) -> None:
        keep = set(pids)
        with self._lock:
            for pid in [pid for pid in self._samples if pid not in keep]:
                del self._samples[pid]


def _measure(pid: int) -> ProcessSample | None:
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            cpu = process.cpu_times()
            memory = process.memory_full_info()
            return ProcessSample(
                cpu_seconds=cpu.user + cpu.system,
                rss_bytes=memory.rss,
                pss_bytes=memory.pss,
                threads=process.num_threads(),
                open_fds=process.num_fds(),
                start_time=process.create_time(),
            )
    except psutil.Error:  # gone (or a zombie) between discovery and measurement
        return None


def discover_processes(status: PoolStatus | None) -> list[ServiceProcess]:
    """Every live process of the service, seen from the Sanic worker calling this."""
    main_pid = os.getppid() if os.environ.get("SANIC_WORKER_NAME") else os.getpid()
    found = [ServiceProcess("main", 0, main_pid)]
    helpers: list[psutil.Process] = []
    supervisor: psutil.Process | None = None
    try:
        children = psutil.Process(main_pid).children()
    except psutil.Error:
        return found
    for child in children:
        try:
            name = child.environ().get("SANIC_WORKER_NAME", "")
        except psutil.Error:
            continue
        if worker := SERVER_WORKER_NAME.match(name):
            found.append(ServiceProcess("worker", int(worker.group(1)), child.pid))
        elif POOL_SUPERVISOR_NAME.match(name):
            supervisor = child
            found.append(ServiceProcess("pool_supervisor", 0, child.pid))
        else:
            helpers.append(child)
    found.extend(ServiceProcess("helper", index, helper.pid) for index, helper in enumerate(_by_age(helpers)))
    if supervisor is not None and status is not None:
        found.extend(_decoders(supervisor, status))
    return sorted(found, key=lambda process: (process.role, process.index))


def _by_age(processes: list[psutil.Process]) -> list[psutil.Process]:
    def started(process: psutil.Process) -> float:
        try:
            return float(process.create_time())
        except psutil.Error:
            return 0.0

    return sorted(processes, key=started)


def _decoders(supervisor: psutil.Process, status: PoolStatus) -> Iterator[ServiceProcess]:
    # A slot may still name a decoder that died and is being replaced: only the supervisor's
    # current children count.
    try:
        children = {child.pid for child in supervisor.children()}
    except psutil.Error:
        return
    for index, slot in enumerate(status.slots):
        if slot.pid in children and slot.state != SlotState.DEAD:
            yield ServiceProcess("decoder", index, int(slot.pid))


class ServiceCollector(Collector):
    """`adb_process_*` for every process of the service, `adb_stt_pool_*` from the status table."""

    def __init__(self, pool_dir: Path | None) -> None:
        self.pool_dir = pool_dir
        self.sampler = ProcessSampler()

    def collect(self) -> Iterator[Metric]:
        status = PoolStatus.attach(self.pool_dir) if self.pool_dir is not None else None
        processes = discover_processes(status)
        self.sampler.forget_all_but(process.pid for process in processes)
        samples = {process: sample for process in processes if (sample := self.sampler.sample(process.pid))}
        yield from process_families(samples)
        if status is not None:
            yield from pool_families(status, samples)


def process_families(samples: dict[ServiceProcess, ProcessSample]) -> Iterator[Metric]:
    cpu = CounterMetricFamily(
        "adb_process_cpu_seconds", "CPU time (user + system) of each process of the service", labels=PROCESS_LABELS
    )
    rss = GaugeMetricFamily("adb_process_resident_memory_bytes", "Resident set size", labels=PROCESS_LABELS)
    pss = GaugeMetricFamily(
        "adb_process_proportional_memory_bytes",
        "Proportional set size: shared pages divided among the processes sharing them",
        labels=PROCESS_LABELS,
    )
    threads = GaugeMetricFamily("adb_process_threads", "Threads", labels=PROCESS_LABELS)
    fds = GaugeMetricFamily("adb_process_open_fds", "Open file descriptors", labels=PROCESS_LABELS)
    started = GaugeMetricFamily(
        "adb_process_start_time_seconds", "Start time since the Unix epoch", labels=PROCESS_LABELS
    )
    for process, sample in samples.items():
        cpu.add_metric(process.labels, sample.cpu_seconds)
        rss.add_metric(process.labels, sample.rss_bytes)
        pss.add_metric(process.labels, sample.pss_bytes)
        threads.add_metric(process.labels, sample.threads)
        fds.add_metric(process.labels, sample.open_fds)
        started.add_metric(process.labels, sample.start_time)
    yield from (cpu, rss, pss, threads, fds, started)


def pool_families(status: PoolStatus, samples: dict[ServiceProcess, ProcessSample]) -> Iterator[Metric]:
    header = status.header
    yield GaugeMetricFamily("adb_stt_pool_workers", "Decoding processes configured", value=header.workers)
    alive = len(status.live_slots())
    yield GaugeMetricFamily("adb_stt_pool_workers_alive", "Decoding processes with a recent heartbeat", value=alive)
    yield GaugeMetricFamily(
        "adb_stt_pool_model_resident_memory_bytes",
        "Resident memory of the pool supervisor once the Vosk model is loaded",
        value=header.model_rss,
    )
    pool_pss = sum(
        sample.pss_bytes for process, sample in samples.items() if process.role in {"pool_supervisor", "decoder"}
    )
    yield GaugeMetricFamily(
        "adb_stt_pool_proportional_memory_bytes",
        "Proportional set size of the pool: supervisor plus decoding processes (the model is shared)",
        value=pool_pss,
    )
    streams = GaugeMetricFamily("adb_stt_pool_streams", "Streams open on each decoding process", labels=["index"])
    backlog = GaugeMetricFamily(
        "adb_stt_pool_backlog_seconds", "Audio received but not decoded yet, per decoding process", labels=["index"]
    )
    decoded = CounterMetricFamily(
        "adb_stt_pool_decoded_audio_seconds", "Seconds of audio decoded to a final result", labels=["index"]
    )
    decode_cpu = CounterMetricFamily(
        "adb_stt_pool_decode_cpu_seconds", "CPU seconds spent decoding finished streams", labels=["index"]
    )
    completed = CounterMetricFamily("adb_stt_pool_streams_completed", "Streams decoded to the end", labels=["index"])
    restarts = CounterMetricFamily(
        "adb_stt_pool_decoder_restarts", "Decoding processes replaced after dying or hanging", labels=["index"]
    )
    for index, slot in enumerate(status.slots):
        label = [str(index)]
        streams.add_metric(label, slot.streams)
        backlog.add_metric(label, slot.backlog_ms / 1000)
        decoded.add_metric(label, slot.decoded_ms / 1000)
        decode_cpu.add_metric(label, slot.decode_cpu_ms / 1000)
        completed.add_metric(label, slot.streams_done)
        restarts.add_metric(label, slot.restarts)
    yield from (streams, backlog, decoded, decode_cpu, completed, restarts)
