"""From speech (file bytes) to a transcript in the library, in a thread of its own.

A `TranscriptionJob` decodes a clip, transcribes it window by window (its segments are there to
show as each window is decoded), and keeps the result in the library; Cancel stops it between
two windows and keeps what was done. A page session's `WorkQueue` runs its jobs one after
another. Errors a person can fix become messages that say what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

import whisper
from whisper.audio import SAMPLE_RATE, AudioError, load_audio
from whisper.transcribe import TranscribeOptions, transcribe_with

from .library import Library, Transcript, new_uid

log = logging.getLogger("menny.transcription")

# Shorter than this holds no word: a click on Stop right after Record, or a muted microphone.
MIN_DURATION_S = 0.2
# One transcription at a time in this process: page sessions share the model, and two at once
# would each take twice as long.
_MODEL_LOCK = threading.Lock()


class Cancelled(Exception):
    """Raised between windows to stop a transcription the person cancelled."""


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

    def transcribe_options(self) -> TranscribeOptions:
        """The engine's options for these choices, passed whole to the transcription."""
        return TranscribeOptions.from_keywords(
            language=self.language,
            task=self.task,
            word_timestamps=self.word_timestamps,
            beam_size=self.beam_size if self.beam_size > 1 else None,
        )


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


class TranscriptionJob:
    """One clip, from its file's bytes to a transcript in `library`, in a thread of its own."""

    def __init__(
        self,
        model: whisper.Whisper,
        settings: TranscriptionSettings,
        library: Library,
        data: bytes,
        *,
        name: str,
        source: str,
        clip_id: str | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.clip_id = clip_id
        self._model = model
        self._settings = settings
        self._library = library
        self._data = data
        self._segments: list[dict] = []
        self._cancel = threading.Event()
        self._started = time.monotonic()
        self.done_s = 0.0
        self.total_s: float | None = None  # known once decoded
        self.waiting = True  # for another session's transcription to finish
        self.error: str | None = None
        self.transcript: Transcript | None = None
        self._thread = threading.Thread(target=self._run, name=f"menny-transcribe-{name}", daemon=True)
        self._thread.start()

    @property
    def segments(self) -> list[dict]:
        """The segments decoded so far."""
        return list(self._segments)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop after the window under way; what is done is kept."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished

    def _progress(self, done: float, total: float) -> None:
        self.done_s = done
        if self._cancel.is_set():
            raise Cancelled

    def _run(self) -> None:
        try:
            audio = decode(self._data, self.name)
            self.total_s = audio.size / SAMPLE_RATE
            self.transcript = self._transcribe(audio)
        except ClipError as error:
            self.error = str(error)
        except Exception as error:  # the page must stay up; the log keeps the traceback
            log.exception("transcribing %s failed", self.name)
            self.error = (
                f"Something went wrong while transcribing “{self.name}” ({error.__class__.__name__}: {error}). "
                "Try again, or choose another model in the sidebar."
            )
        finally:
            self._data = b""  # the audio is in the library now; the page session need not hold it

    def _transcribe(self, audio: np.ndarray) -> Transcript | None:
        with _MODEL_LOCK:
            self.waiting = False
            started = time.perf_counter()
            cancelled_at_s = None
            try:
                if self._cancel.is_set():
                    raise Cancelled
                result = transcribe_with(
                    self._model,
                    audio,
                    self._settings.transcribe_options(),
                    progress_callback=self._progress,
                    segment_callback=self._segments.extend,
                )
            except Cancelled:
                cancelled_at_s = self.done_s
                language = self._settings.language or (None if self._model.is_multilingual else "en")
                result = {
                    "text": "".join(segment["text"] for segment in self._segments),
                    "segments": self.segments,
                    "language": language,
                }
            transcribe_s = time.perf_counter() - started
        if cancelled_at_s is not None and not result["segments"]:
            return None  # cancelled before the first window was done: nothing to keep
        uid = new_uid()
        transcript = Transcript(
            name=self.name,
            source=self.source,
            model=self._settings.model,
            settings=asdict(self._settings),
            result=result,
            audio=self._library.audio_path(uid),
            n_mels=self._model.dims.n_mels,
            duration_s=audio.size / SAMPLE_RATE,
            transcribe_s=transcribe_s,
            clip_id=self.clip_id,
            cancelled_at_s=cancelled_at_s,
            uid=uid,
        )
        return self._library.add(transcript, audio)


@dataclass
class Outcome:
    """How a finished job ended, for the message beside its file."""

    error: str | None
    transcript_uid: str | None


class WorkQueue:
    """A page session's transcriptions, one after another, in the order asked for."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self._lock = threading.Lock()
        self._pending: list[tuple[str, dict]] = []
        self.current: TranscriptionJob | None = None
        self._current_key: str | None = None
        self.outcomes: dict[str, Outcome] = {}

    def submit(
        self,
        key: str,
        *,
        model: whisper.Whisper,
        settings: TranscriptionSettings,
        data: bytes,
        name: str,
        source: str,
        clip_id: str | None = None,
    ) -> None:
        """Queue a clip's transcription; `key` names it in `outcomes`."""
        job = {"model": model, "settings": settings, "data": data, "name": name, "source": source, "clip_id": clip_id}
        with self._lock:
            self._pending.append((key, job))
        self.poll()

    @property
    def busy(self) -> bool:
        self.poll()
        return self.current is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self) -> None:
        """Record a finished job's outcome and start the next one."""
        with self._lock:
            if self.current is not None and self.current.finished:
                done, self.current = self.current, None
                self.outcomes[self._current_key] = Outcome(
                    done.error, done.transcript.uid if done.transcript else None
                )
            if self.current is None and self._pending:
                self._current_key, job = self._pending.pop(0)
                self.current = TranscriptionJob(library=self.library, **job)

    def cancel(self) -> None:
        """Stop the job under way (keeping what it did) and drop those waiting."""
        with self._lock:
            self._pending.clear()
            if self.current is not None:
                self.current.cancel()
