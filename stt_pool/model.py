"""Checking and loading a Vosk model directory. Nothing here downloads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stt_pool.errors import InvalidModel

REQUIRED = ("am/final.mdl", "conf/mfcc.conf")
GRAPHS = ("graph/HCLG.fst", "graph/HCLr.fst")


def check_model_dir(path: Path) -> None:
    """Fail fast, with one line, on a directory that cannot be a Vosk model."""
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if not any((path / name).is_file() for name in GRAPHS):
        missing.append(" or ".join(GRAPHS))
    if missing:
        raise InvalidModel(f"not a Vosk model, missing {', '.join(missing)}; see model/README.md")


def load_model(path: Path) -> Any:
    import vosk

    vosk.SetLogLevel(-1)
    return vosk.Model(str(path))
