"""From speech (bytes or samples) to a `ClipResult`: decode, transcribe, draw.

Errors a person can fix come out as `ClipError` with a message that says what to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import whisper
from whisper.audio import SAMPLE_RATE, AudioError, load_audio

from .session import ClipResult, wav_bytes

# Shorter than this holds no word: a click on Stop right after Record, or a muted microphone.
MIN_DURATION_S = 0.2

ProgressCallback = Callable[[float, float], None]


class ClipError(ValueError):
    """Speech that cannot be transcribed, with a message a person can act on."""


@dataclass(frozen=True)
class TranscriptionSettings:
    """The sidebar's choices."""

    model: str = "base"
    language: str | None = None  # None: detect
    task: str = "transcribe"
    word_timestamps: bool = False
    beam_size: int = 1  # 1: greedy decoding

    def transcribe_options(self) -> dict:
        return {
            "language": self.language,
            "task": self.task,
            "word_timestamps": self.word_timestamps,
            "beam_size": self.beam_size if self.beam_size > 1 else None,
        }


def decode(data: bytes, name: str) -> np.ndarray:
    """16 kHz mono samples of an uploaded or recorded file."""
    try:
        audio = load_audio(data)
    except AudioError as error:
        # The engine's message names the formats it reads, and calls bytes "the upload".
        raise ClipError(f"Could not read “{name}”: {str(error).removeprefix('the upload: ')}") from None
    if not audio.size:
        raise ClipError(
            f"“{name}” holds no sound. If you recorded it, check that the microphone is allowed and not muted."
        )
    if audio.size < MIN_DURATION_S * SAMPLE_RATE:
        raise ClipError(
            f"“{name}” is only {audio.size / SAMPLE_RATE:.1f} s long, too short for a word: "
            f"record or choose at least {MIN_DURATION_S:g} s of speech."
        )
    return audio


def transcribe_clip(
    model: whisper.Whisper,
    audio: np.ndarray,
    *,
    name: str,
    source: str,
    settings: TranscriptionSettings,
    progress: ProgressCallback | None = None,
) -> ClipResult:
    """Transcribe samples into a record for the history."""
    started = time.perf_counter()
    result = whisper.transcribe(model, audio, progress_callback=progress, **settings.transcribe_options())
    transcribe_s = time.perf_counter() - started
    return ClipResult(
        name=name,
        source=source,
        result=result,
        wav=wav_bytes(audio),
        model=settings.model,
        n_mels=model.dims.n_mels,
        transcribe_s=transcribe_s,
    )
