"""Mono 16-bit PCM WAV files that stay readable while they grow.

A recording is written straight into its WAV file as the audio arrives, and the header's sizes
are rewritten after every append, so a crash or ``kill -9`` leaves a file that any player opens
with everything up to the last append. ``repair_wav`` then also recovers an append that landed
after the header was last updated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from menny.wav import BYTES_PER_FRAME, HEADER_BYTES, SAMPLE_RATE, parse_header, wav_header

# The RIFF sizes are 32-bit; stay well inside them.
MAX_DATA_BYTES = 2**32 - 1 - HEADER_BYTES


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class WavAppender:
    """Appends int16 samples to a new mono WAV file whose header is always valid.

    Owned by one thread; ``frames`` may be read from others (it only grows after the samples it
    counts are in the file).
    """

    def __init__(self, path: Path, rate: int = SAMPLE_RATE) -> None:
        self.path = path
        self.rate = rate
        self.frames = 0
        # O_EXCL: a new recording never overwrites a clip.
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        _pwrite_all(self._fd, wav_header(0, rate), 0)

    def append(self, pcm16: np.ndarray) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        data = pcm16.astype("<i2", copy=False).tobytes()
        if HEADER_BYTES + (self.frames * BYTES_PER_FRAME) + len(data) > MAX_DATA_BYTES:
            raise ValueError(f"{self.path} would exceed the 4 GiB WAV limit")
        _pwrite_all(self._fd, data, HEADER_BYTES + self.frames * BYTES_PER_FRAME)
        # The header goes after the samples: a kill in between leaves a header that undercounts
        # (repair_wav recovers the rest), never one that points past the end of the file.
        frames = self.frames + len(data) // BYTES_PER_FRAME
        _pwrite_all(self._fd, wav_header(frames, self.rate), 0)
        self.frames = frames

    def sync(self) -> None:
        """Pushes what was appended to the disk, so that it survives a machine crash too."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None


def repair_wav(path: Path) -> int | None:
    """Makes the header of an interrupted recording cover every whole sample in the file.

    Returns the number of frames, or None (and leaves the file alone) if the file is not a WAV of
    the layout this module writes.
    """
    with open(path, "r+b") as f:
        parsed = parse_header(f.read(HEADER_BYTES))
        if parsed is None:
            return None
        rate, header_frames = parsed
        size = os.fstat(f.fileno()).st_size
        frames = (size - HEADER_BYTES) // BYTES_PER_FRAME
        if frames != header_frames:
            f.seek(0)
            f.write(wav_header(frames, rate))
        if size != HEADER_BYTES + frames * BYTES_PER_FRAME:
            f.truncate(HEADER_BYTES + frames * BYTES_PER_FRAME)  # half a sample from a kill
    return frames


def read_wav_prefix(path: Path, frames: int, start: int = 0, rate: int = SAMPLE_RATE) -> bytes:
    """A complete WAV of samples ``start`` to ``frames`` of a file that may still be growing."""
    start = min(start, frames)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES + start * BYTES_PER_FRAME)
        data = f.read((frames - start) * BYTES_PER_FRAME)
    return wav_header(len(data) // BYTES_PER_FRAME, rate) + data
