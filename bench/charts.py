"""PNG charts of the STT benchmark's figures, for the README.

`bench/bench_stt.py` fills an `SttFigures` as it measures and calls `save_and_draw` at the end
(so `make bench` draws them); the figures are kept next to the charts as JSON, and
`python -m bench.charts [FIGURES.json]` redraws the charts from them without measuring again.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
FIGURES_FILE = "bench_stt.json"
CONCURRENCY_CHART = "bench_stt_concurrency.png"
LATENCY_CHART = "bench_stt_latency.png"
# Chinese labels: Noto CJK (Debian fonts-noto-cjk) where present, DejaVu for the rest.
FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "DejaVu Sans"]


@dataclass
class LatencyRow:
    label: str
    seconds: float
    pool_p50: float
    pool_p95: float
    baseline_p50: float
    decode_at_end: float


@dataclass
class SttFigures:
    cores: int
    rtf: float
    decoding_limit: float
    latency_target: float
    latency: list[LatencyRow] = field(default_factory=list)
    # "pool" / "baseline" -> (concurrent streams, p95 final latency in s; inf when a stream failed)
    concurrency: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SttFigures:
        raw = json.loads(path.read_text())
        return cls(
            cores=raw["cores"],
            rtf=raw["rtf"],
            decoding_limit=raw["decoding_limit"],
            latency_target=raw["latency_target"],
            latency=[LatencyRow(**row) for row in raw["latency"]],
            concurrency={
                name: [(int(streams), math.inf if p95 is None else float(p95)) for streams, p95 in points]
                for name, points in raw["concurrency"].items()
            },
        )

    def save(self, path: Path) -> None:
        # JSON has no Infinity: a failed level is stored as null.
        data = asdict(self)
        data["concurrency"] = {
            name: [[streams, None if math.isinf(p95) else p95] for streams, p95 in points]
            for name, points in self.concurrency.items()
        }
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


NAMES = {"pool": "识别池（本服务）", "baseline": "线程池基线（单进程）"}
COLOURS = {"pool": "#2463eb", "baseline": "#c4320a"}


def draw_concurrency(figures: SttFigures, path: Path) -> None:
    """p95 final latency against concurrent real-time streams, pool and baseline."""
    # Figure without pyplot: no global state and no display, only files.
    figure = Figure(figsize=(8, 4.5), dpi=110)
    axes = figure.subplots()
    finite = [p95 for points in figures.concurrency.values() for _, p95 in points if not math.isinf(p95)]
    ceiling = max([*finite, figures.latency_target * 2]) * 1.3 * 1000
    for name, points in figures.concurrency.items():
        streams = [count for count, _ in points]
        shown = [ceiling if math.isinf(p95) else p95 * 1000 for _, p95 in points]
        axes.plot(streams, shown, marker="o", color=COLOURS.get(name), label=NAMES.get(name, name))
        failed = [(count, ceiling) for count, p95 in points if math.isinf(p95)]
        if failed:
            failed_x, failed_y = zip(*failed, strict=True)
            axes.scatter(failed_x, failed_y, marker="x", s=80, color=COLOURS.get(name), zorder=3)
    axes.axhline(figures.latency_target * 1000, color="#667085", linestyle="--", linewidth=1)
    axes.annotate(
        f"目标 p95 ≤ {figures.latency_target * 1000:.0f} ms",
        (0.01, figures.latency_target * 1000),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, 4),
        color="#667085",
    )
    axes.axvline(figures.decoding_limit, color="#067647", linestyle=":", linewidth=1)
    axes.annotate(
        f"解码上限 {figures.decoding_limit:.1f} 路",
        (figures.decoding_limit, 0.97),
        xycoords=("data", "axes fraction"),
        textcoords="offset points",
        xytext=(4, -12),
        color="#067647",
    )
    axes.set_ylim(0, ceiling * 1.05)
    axes.set_xlabel("同时说话的实时音频流（路）")
    axes.set_ylabel("最终识别延迟 p95（毫秒）")
    axes.set_title(f"并发实时流的最终识别延迟（{figures.cores} 核，× = 有流失败）")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(0, 0.92))
    figure.tight_layout()
    figure.savefig(path)


def draw_latency(figures: SttFigures, path: Path) -> None:
    """Final latency on an idle server against utterance length, with the decode-at-end anchor."""
    series = (
        ("识别池 p50", "pool_p50", "#2463eb"),
        ("识别池 p95", "pool_p95", "#93b4f5"),
        ("线程池基线 p50", "baseline_p50", "#c4320a"),
        ("说完才解码（RTF × 时长）", "decode_at_end", "#98a2b3"),
    )
    figure = Figure(figsize=(8, 4.5), dpi=110)
    axes = figure.subplots()
    width = 0.8 / len(series)
    for offset, (label, key, colour) in enumerate(series):
        positions = [index + (offset - (len(series) - 1) / 2) * width for index in range(len(figures.latency))]
        values = [getattr(row, key) * 1000 for row in figures.latency]
        bars = axes.bar(positions, values, width, label=label, color=colour)
        axes.bar_label(bars, labels=[f"{value:.0f}" for value in values], fontsize=7, padding=2)
    axes.set_yscale("log")
    axes.set_xticks(range(len(figures.latency)), [row.label for row in figures.latency])
    axes.set_xlabel("话语长度（实时发送，空闲服务器）")
    axes.set_ylabel("message_end → 最终文字（毫秒，对数）")
    axes.set_title("最终识别延迟与话语长度")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def draw(figures: SttFigures, directory: Path = IMAGES) -> list[Path]:
    matplotlib.rcParams["font.family"] = FONTS
    directory.mkdir(parents=True, exist_ok=True)
    concurrency, latency = directory / CONCURRENCY_CHART, directory / LATENCY_CHART
    draw_concurrency(figures, concurrency)
    draw_latency(figures, latency)
    return [concurrency, latency]


def save_and_draw(figures: SttFigures, directory: Path = IMAGES) -> None:
    """Keep the figures as JSON and draw the charts beside them (what `make bench` calls)."""
    directory.mkdir(parents=True, exist_ok=True)
    figures.save(directory / FIGURES_FILE)
    paths = draw(figures, directory)
    print(f"\ncharts: {', '.join(str(path) for path in paths)} (figures: {directory / FIGURES_FILE})")


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else IMAGES / FIGURES_FILE
    for path in draw(SttFigures.load(source), source.parent):
        print(path)


if __name__ == "__main__":
    main()
