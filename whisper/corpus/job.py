"""What every worker of a corpus run needs to know, and the run's tally on the terminal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import tqdm

from ..batch import batch_options
from ..model import Whisper
from ..models import load_model
from ..transcribe import TranscribeOptions


@dataclass(frozen=True)
class Job:
    """The model and the options every file is transcribed with (picklable, for Ray)."""

    model: str
    options: TranscribeOptions = field(default_factory=batch_options)
    batch_size: int = 8
    quantize: int | None = None
    device: str | None = None

    def load_model(self) -> Whisper:
        return load_model(self.model, quantize=self.quantize, device=self.device)


class Tally:
    """Counts what a run did, and shows it as a progress bar: files, hours of audio, the rate."""

    def __init__(self, files: int, *, show: bool = True):
        self.transcribed = 0
        self.failed = 0
        self.audio_seconds = 0.0
        self._started = time.monotonic()
        self._bar = tqdm.tqdm(total=files, unit="file", desc="transcribing", disable=not show, smoothing=0.1)

    def transcribed_one(self, seconds: float) -> None:
        self.transcribed += 1
        self.audio_seconds += seconds
        self._advance()

    def failed_one(self) -> None:
        self.failed += 1
        self._advance()

    def close(self) -> None:
        self._bar.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    @property
    def speed(self) -> float:
        """Seconds of audio transcribed per second of wall time."""
        return self.audio_seconds / max(self.elapsed, 1e-9)

    def _advance(self) -> None:
        failed = f", {self.failed} failed" if self.failed else ""
        self._bar.set_postfix_str(f"{self.audio_seconds / 3600:.2f} h audio, {self.speed:.1f}x real time{failed}")
        self._bar.update(1)
