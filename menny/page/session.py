"""What one page session keeps: a record per transcribed clip, newest first, and its exports."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import PurePath

import numpy as np

from menny.wav import HEADER_BYTES, float_to_pcm16, parse_header, wav_header
from whisper.audio import SAMPLE_RATE
from whisper.writers import render

from . import visuals

EXPORT_FORMATS = {
    "txt": "text/plain",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
    "json": "application/json",
}


@dataclass(frozen=True)
class ClipResult:
    """One transcribed clip with everything its result view shows.

    Its pictures are drawn when first shown, not when transcribed, so the transcript reaches
    the page first; then they are kept, so reruns of the page only resend them.
    """

    name: str
    source: str  # where the speech came from, in words: "upload", "browser microphone", ...
    result: dict  # whisper.transcribe's result
    wav: bytes  # what the model heard: 16 kHz mono 16-bit WAV (wav_bytes), for the player
    model: str
    n_mels: int  # of the model's input, for the spectrogram
    transcribe_s: float  # wall time of the transcription alone
    created: datetime = field(default_factory=datetime.now)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def duration_s(self) -> float:
        return (len(self.wav) - HEADER_BYTES) / 2 / SAMPLE_RATE

    def samples(self) -> np.ndarray:
        return wav_samples(self.wav)

    @cached_property
    def waveform_png(self) -> bytes:
        return visuals.figure_png(visuals.waveform_figure(self.samples()))

    @cached_property
    def spectrogram_png(self) -> bytes:
        return visuals.figure_png(visuals.spectrogram_figure(self.samples(), self.n_mels))

    @property
    def text(self) -> str:
        return self.result["text"].strip()

    @property
    def language(self) -> str:
        return self.result.get("language") or "unknown"

    def export(self, fmt: str) -> str:
        return render(self.result, fmt)

    def export_name(self, fmt: str) -> str:
        return f"{PurePath(self.name).stem or 'transcript'}.{fmt}"


class History:
    """The session's transcripts, newest first, until cleared."""

    def __init__(self) -> None:
        self._records: list[ClipResult] = []

    def add(self, record: ClipResult) -> None:
        self._records.insert(0, record)

    def clear(self) -> None:
        self._records.clear()

    def __iter__(self):
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)


def wav_samples(wav: bytes) -> np.ndarray:
    """Float samples of a WAV laid out as wav_bytes and the server write it (44-byte header);
    read directly, because decoding a long recording on every poll would cost seconds."""
    if parse_header(wav) is None:
        raise ValueError("not a 16-bit mono WAV with a 44-byte header")
    return np.frombuffer(wav, "<i2", offset=HEADER_BYTES).astype(np.float32) / 32768.0


def wav_bytes(audio: np.ndarray) -> bytes:
    """16 kHz mono 16-bit WAV of float samples in [-1, 1]."""
    return wav_header(audio.size, SAMPLE_RATE) + float_to_pcm16(audio).tobytes()
