"""`adb_memory_limit_bytes`: the memory limit of the service's cgroup (systemd's `MemoryMax=`), at scrape time.

Every process of the service lives in the unit's cgroup, so an alert can compare the service's
summed PSS with this limit without repeating its number. The tightest limit on the way to the root
counts (a slice may limit the unit too); without any limit the value is +Inf and the ratio stays 0.
Both cgroup v2 (`memory.max`) and the v1 memory controller (`memory.limit_in_bytes`) are read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit number.
V1_UNLIMITED = 2**62


def _limit(value: str, unlimited: int | None) -> float:
    text = value.strip()
    if text == "max":
        return math.inf
    number = int(text)
    return math.inf if unlimited is not None and number >= unlimited else float(number)


def _tightest(directory: Path, mount: Path, name: str, unlimited: int | None) -> float:
    limits = [
        _limit((level / name).read_text(), unlimited)
        for level in (directory, *directory.parents)
        if level.is_relative_to(mount) and (level / name).is_file()
    ]
    return min(limits, default=math.inf)


def memory_limit_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> float:
    """The tightest memory limit over this process's cgroup and its ancestors; +Inf without one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return math.inf
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "" and (root / "cgroup.controllers").is_file():
            return _tightest(root / relative, root, "memory.max", None)
        if "memory" in controllers.split(","):
            mount = root / "memory"
            return _tightest(mount / relative, mount, "memory.limit_in_bytes", V1_UNLIMITED)
    return math.inf


class MemoryLimit(Collector):
    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "adb_memory_limit_bytes",
            "Memory limit of the service's cgroup (systemd MemoryMax), +Inf without one",
            value=memory_limit_bytes(),
        )
