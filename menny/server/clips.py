"""The folder of recorded clips: safe ids, listing, deletion and retention.

A clip is ``<id>.wav`` in the data folder, 16 kHz mono 16-bit. Ids are UTC timestamps with
microseconds (``20250102-130405-123456``), so sorting ids sorts clips oldest first. Only names of
exactly that form are ever turned into paths, so an id cannot reach outside the folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from menny.server.wav_file import repair_wav
from menny.wav import BYTES_PER_FRAME, HEADER_BYTES, SAMPLE_RATE

log = logging.getLogger(__name__)

CLIP_ID_PATTERN = r"^[0-9]{8}-[0-9]{6}-[0-9]{6}$"
_CLIP_ID = re.compile(CLIP_ID_PATTERN)
_ID_FORMAT = "%Y%m%d-%H%M%S-%f"


class ClipNotFound(LookupError):
    pass


class ClipBusy(RuntimeError):
    """The clip is still being recorded."""


@dataclass(frozen=True)
class ClipInfo:
    id: str
    path: Path
    size_bytes: int

    @property
    def frames(self) -> int:
        return max(0, self.size_bytes - HEADER_BYTES) // BYTES_PER_FRAME

    @property
    def duration_s(self) -> float:
        return self.frames / SAMPLE_RATE

    @property
    def created(self) -> dt.datetime:
        return dt.datetime.strptime(self.id, _ID_FORMAT).replace(tzinfo=dt.UTC)


def is_clip_id(text: str) -> bool:
    return bool(_CLIP_ID.fullmatch(text))


class ClipStore:
    """Clips in one folder, at most ``max_clips`` of them and ``max_bytes`` in all.

    When a limit is passed the oldest clips are removed first; the newest finished clip is always
    kept, so a recording is never lost before anyone could fetch it. Clips being recorded are
    ``busy``: not listed, not deletable, not counted. Thread-safe.
    """

    def __init__(self, root: Path, *, max_clips: int = 100, max_bytes: int = 1024**3) -> None:
        if max_clips < 1 or max_bytes < 1:
            raise ValueError("max_clips and max_bytes must be at least 1")
        self.root = root
        self.max_clips = max_clips
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self._scan()
        self._last_id = existing[-1].id if existing else ""
        # Clips left by a crash or kill: make their headers cover all the audio that reached disk.
        for clip in existing:
            if repair_wav(clip.path) is None:
                log.warning("%s is not a 16-bit mono WAV; left as it is", clip.path)
        self.enforce_retention()

    def path_for(self, clip_id: str) -> Path:
        """The file of ``clip_id``; ValueError for anything that is not a clip id."""
        if not is_clip_id(clip_id):
            raise ValueError(f"not a clip id: {clip_id!r} (expected YYYYMMDD-HHMMSS-ffffff)")
        return self.root / f"{clip_id}.wav"

    def reserve(self) -> tuple[str, Path]:
        """A fresh id and its path for a new recording, marked busy until ``release``."""
        with self._lock:
            clip_id = dt.datetime.now(dt.UTC).strftime(_ID_FORMAT)
            # Ids must grow even when the clock does not (two starts in one microsecond, or the
            # clock stepping back), because their order is the clips' age.
            if clip_id <= self._last_id:
                step = dt.datetime.strptime(self._last_id, _ID_FORMAT) + dt.timedelta(microseconds=1)
                clip_id = step.strftime(_ID_FORMAT)
            self._last_id = clip_id
            self._busy.add(clip_id)
            return clip_id, self.path_for(clip_id)

    def release(self, clip_id: str) -> None:
        """Marks a recording finished; from now on it is a clip like any other."""
        with self._lock:
            self._busy.discard(clip_id)

    def _scan(self) -> list[ClipInfo]:
        clips = []
        for path in self.root.glob("*.wav"):
            if not is_clip_id(path.stem):
                continue
            try:
                clips.append(ClipInfo(path.stem, path, path.stat().st_size))
            except FileNotFoundError:  # removed meanwhile
                continue
        return sorted(clips, key=lambda c: c.id)

    def _finished(self) -> list[ClipInfo]:
        return [c for c in self._scan() if c.id not in self._busy]

    def list(self) -> list[ClipInfo]:
        """Finished clips, oldest first."""
        with self._lock:
            return self._finished()

    def latest(self) -> ClipInfo | None:
        clips = self.list()
        return clips[-1] if clips else None

    def get(self, clip_id: str) -> ClipInfo:
        path = self.path_for(clip_id)
        with self._lock:
            if clip_id in self._busy:
                raise ClipBusy(clip_id)
            try:
                return ClipInfo(clip_id, path, path.stat().st_size)
            except FileNotFoundError:
                raise ClipNotFound(clip_id) from None

    def delete(self, clip_id: str) -> None:
        path = self.path_for(clip_id)
        with self._lock:
            if clip_id in self._busy:
                raise ClipBusy(clip_id)
            try:
                path.unlink()
            except FileNotFoundError:
                raise ClipNotFound(clip_id) from None

    def enforce_retention(self) -> list[str]:
        """Removes the oldest finished clips until both limits hold; returns the removed ids."""
        removed = []
        with self._lock:
            clips = self._finished()
            total = sum(c.size_bytes for c in clips)
            while len(clips) > 1 and (len(clips) > self.max_clips or total > self.max_bytes):
                oldest = clips.pop(0)
                oldest.path.unlink(missing_ok=True)
                total -= oldest.size_bytes
                removed.append(oldest.id)
        if removed:
            log.info("retention: removed %d old clip(s): %s", len(removed), ", ".join(removed))
        return removed
