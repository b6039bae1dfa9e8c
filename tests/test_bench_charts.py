"""The benchmark's chart drawing (bench/charts.py, called at the end of `make bench`) on given figures."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from bench.charts import CONCURRENCY_CHART, FIGURES_FILE, LATENCY_CHART, LatencyRow, SttFigures, save_and_draw


def figures() -> SttFigures:
    return SttFigures(
        cores=2,
        rtf=0.12,
        decoding_limit=16.7,
        latency_target=0.5,
        latency=[
            LatencyRow("1 s, cut mid-word", 1, 0.06, 0.09, 0.12, 0.12),
            LatencyRow("30 s, cut mid-word", 30, 0.09, 0.15, 1.6, 3.6),
        ],
        concurrency={"pool": [(7, 0.1), (9, 0.3), (11, 0.7)], "baseline": [(7, 0.4), (9, math.inf)]},
    )


def test_figures_are_kept_as_json_and_drawn_as_png_charts(tmp_path: Path) -> None:
    save_and_draw(figures(), tmp_path)
    assert SttFigures.load(tmp_path / FIGURES_FILE) == figures(), "a failed level (inf) survives the JSON"
    for chart in (CONCURRENCY_CHART, LATENCY_CHART):
        with Image.open(tmp_path / chart) as image:
            assert image.format == "PNG"
            assert image.size == (880, 495)
            # Something was drawn: far more than a blank canvas's single colour.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50
